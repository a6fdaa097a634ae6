"""Fast checks of the synthetic tasks, the checker and the table (no trained weights needed)."""

import subprocess
import sys

import pytest
import torch

from effalg.core.eval import format_table, lm_tasks, shapes


def test_import_is_light():
    code = (
        "import sys, effalg.core.eval as e; e.format_table; "
        "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lm_batch_structure_and_determinism():
    a = lm_tasks.make_batch(3, 256, seed=5)
    b = lm_tasks.make_batch(3, 256, seed=5)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (3, 256)
    assert (a.input_ids[:, 0] == lm_tasks.BOS).all()
    ret = a.kinds == lm_tasks.KIND_RETRIEVAL
    assert (ret.sum(1) == lm_tasks.num_pairs_for_length(256)).all()
    for r in range(3):
        ids = a.input_ids[r].tolist()
        for t in torch.nonzero(ret[r]).flatten().tolist():
            k = ids[t - 1]
            d = next(i for i in range(t) if ids[i] == lm_tasks.DEF and ids[i + 1] == k)
            assert ids[d + 2] == ids[t] == a.labels[r, t]
            assert a.distance[r, t] == t - (d + 2) > 0
    loc = torch.nonzero(a.kinds == lm_tasks.KIND_LOCAL)
    assert len(loc) > 0
    for r, t in loc.tolist():
        ids = a.input_ids[r].tolist()
        eq = max(i for i in range(t - 3, t) if ids[i] == lm_tasks.EQ)  # the item's "="
        assert a.labels[r, t] == ids[t] == ids[2 * eq - t]  # mirrored around "="
        assert lm_tasks.DIGIT0 <= ids[t] < lm_tasks.DIGIT0 + 10


def test_checker_reads_rendered_shapes_exactly():
    gen = torch.Generator().manual_seed(0)
    imgs, caps, labels = shapes.sample_batch(120, gen)
    for im, cap, lab in zip(imgs, caps, labels):
        r = shapes.check_image(im)
        assert (r.shape, r.fg, r.bg) == lab == shapes.parse_caption(cap)
    # Flat noise / an empty image are not mistaken for a shape.
    assert shapes.check_image(torch.full((3, 32, 32), 0.5)).shape == "none"


def test_frechet_small_for_same_distribution_large_for_other():
    real = shapes.real_features(256, seed=1)
    same = shapes.real_features(256, seed=2)
    noise = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    other = torch.stack([shapes.check_image(x).features for x in noise])
    assert shapes.frechet_distance(real, same) < 0.1 < shapes.frechet_distance(real, other)


def test_data_score_ranks_real_images_first_and_counts_errors():
    from effalg.core.eval.t2i import check_images, data_score

    gen = torch.Generator().manual_seed(3)
    imgs, _, labels = shapes.sample_batch(48, gen)
    r = check_images(imgs, labels, shapes.real_features(256, seed=1))
    assert r["all_acc"] == 1.0 and r["frechet"] < 0.2
    score = data_score(labels, n_real=256)
    good = score(imgs, imgs)  # real images, equal to the reference: only the finite-sample FD is left
    assert good == pytest.approx(r["frechet"], abs=0.1)
    wrong = score(imgs, imgs.roll(1, 0))  # right distribution, other prompts' images: errors and MSE count
    noise = torch.rand(imgs.shape, generator=gen)
    assert good < wrong < score(noise, imgs)
    with pytest.raises(ValueError, match="47 images for 48 prompts"):
        score(imgs[:47], imgs[:47])


def test_format_table():
    lm = {
        "task": "lm",
        "retrieval_acc": 0.9,
        "local_acc": 1.0,
        "loss": 0.1,
        "by_length": {"256": {"retrieval_acc": 0.95}, "1024": {"retrieval_acc": 0.85}},
    }
    t2i = {
        "task": "t2i",
        "num_inference_steps": 4,
        "shape_acc": 0.9,
        "color_acc": 1.0,
        "bg_acc": 1.0,
        "all_acc": 0.9,
        "frechet": 0.2,
    }
    s = format_table({"fp32": lm, "w3": dict(lm, retrieval_acc=0.1), "pipe": t2i})
    assert "retr@1024" in s and "w3" in s and "FD" in s and "0.100" in s
