"""MoA search end to end: profiling (vs. an independent eager/autograd reference), plan validity, CLI, quality."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import effalg.transformers  # noqa: F401  (registers "moa")
from effalg.core.attention_plan import ElasticWindowPlan
from effalg.core.attention_search import attention_influence
from effalg.core.plans import load_plan
from effalg.transformers import search_moa
from effalg.transformers.moa_search import (
    _Sample,
    generate_calibration,
    main,
    moa_applied,
    profile_attention_influence,
    uniform_plan_like,
)


@pytest.fixture()
def qwen2(tiny_qwen2_ckpt):
    path, _ = tiny_qwen2_ckpt
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


def _random_calibration(n: int, length: int, seed: int = 0, vocab: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def test_profile_matches_eager_autograd_reference(qwen2):
    """Block-summed influence (GQA groups summed) equals one computed from eager attention's probabilities."""
    _, model = qwen2
    ids = _random_calibration(1, 24, seed=3)[0]
    labels = ids.clone()
    labels[:8] = -100  # response-only loss
    got = profile_attention_influence(model, [_Sample(ids, labels)], 24, 4, show_progress=False)

    ref_model = AutoModelForCausalLM.from_pretrained(qwen2[0], attn_implementation="eager").eval()
    out = ref_model(input_ids=ids[None], output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    logits = out.logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100).backward()
    cfg = ref_model.config
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, a in enumerate(out.attentions):
        e = attention_influence(a.detach()[0], a.grad[0], 4)
        ref = e.reshape(cfg.num_key_value_heads, n_rep, *e.shape[1:]).sum(1)
        torch.testing.assert_close(got[layer].float(), ref, rtol=2e-3, atol=1e-7)
    # profiling one layer per pass gives the same numbers
    got1 = profile_attention_influence(model, [_Sample(ids, labels)], 24, 4, layers_per_pass=1, show_progress=False)
    torch.testing.assert_close(got1, got, rtol=1e-4, atol=1e-9)


def test_search_tiny_qwen2_meets_budget(qwen2):
    _, model = qwen2
    impl = model.config._attn_implementation
    cal = _random_calibration(3, 128)
    plan, det = search_moa(model, calibration=cal, density=0.5, lengths=(32, 64), eval_length=128,
                           show_progress=False, return_details=True)
    assert isinstance(plan, ElasticWindowPlan)
    plan.validate_against_config(model.config)
    for n in (32, 64, 128):
        assert plan.density(n) <= 0.5 + 1e-9
    assert plan.metadata["search"]["eval_length"] == 128
    assert all("eval_loss" in c for c in det["candidates"]) or len(det["candidates"]) == 1
    # with the uniform safeguard candidate the pick is recorded
    plan2 = search_moa(model, calibration=cal, density=0.5, lengths=(32, 64), eval_length=128, include_uniform=True,
                       show_progress=False)
    assert plan2.metadata["search"]["source"] in ("milp", "uniform")
    assert any(c["source"] == "uniform" for c in plan2.metadata["search"]["candidate_eval_losses"])
    assert all(plan2.density(n) <= 0.5 + 1e-9 for n in (32, 64, 128))
    # the model is left as it was
    assert model.config._attn_implementation == impl
    assert getattr(model.config, "moa_plan", None) is None
    assert all(p.requires_grad for p in model.parameters())
    # the plan runs through the MoA runtime
    with moa_applied(model, plan):
        assert model.config._attn_implementation == "moa"
        with torch.no_grad():
            model(input_ids=cal[0][None, :64])
    assert model.config._attn_implementation == impl


def test_search_errors(qwen2):
    _, model = qwen2
    with pytest.raises(ValueError, match="calibration data or prompts"):
        search_moa(model, lengths=(32,))
    with pytest.raises(ValueError, match="density"):
        search_moa(model, calibration=_random_calibration(1, 64), density=1.5, lengths=(32,))
    with pytest.raises(ValueError, match="pass a tokenizer"):
        search_moa(model, calibration=["some text"], lengths=(32,))
    with pytest.raises(ValueError, match="at least 64 tokens"):
        search_moa(model, calibration=_random_calibration(2, 40), lengths=(32, 64))
    with pytest.raises(ValueError, match="minimum achievable density"):
        search_moa(model, calibration=_random_calibration(1, 64), density=0.01, lengths=(32, 64),
                   show_progress=False)


def test_generate_calibration_masks_prompt(qwen2):
    _, model = qwen2
    prompts = [torch.tensor([1, 5, 7, 9]), [3, 4, 5]]
    cal = generate_calibration(model, prompts, max_new_tokens=6, show_progress=False)
    assert len(cal) == 2
    for p, c in zip(prompts, cal):
        n = len(p)
        assert c["input_ids"].shape == c["labels"].shape
        assert c["input_ids"].numel() == n + 6
        assert (c["labels"][:n] == -100).all() and (c["labels"][n:] == c["input_ids"][n:]).all()
        assert c["input_ids"][:n].tolist() == list(p if isinstance(p, list) else p.tolist())
    # on a MoA model the text still comes from the dense model
    tiny = ElasticWindowPlan.uniform(2, 2, 1.0, 0.0, 0)
    with moa_applied(model, tiny):
        again = generate_calibration(model, prompts, max_new_tokens=6, show_progress=False)
        assert model.config._attn_implementation == "moa"
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(cal, again))


def test_uniform_plan_like_matches_density():
    plan = ElasticWindowPlan.from_rules([[{"alpha": 0, "beta": 1.0, "sink": 4}, {"alpha": 8, "beta": 0, "sink": 4}]])
    uni = uniform_plan_like(plan, 256)
    assert uni.betas().eq(0).all() and uni.sinks().eq(4).all()
    assert abs(uni.density(256) - plan.density(256)) < 2 / 256


def test_cli_writes_valid_plan(qwen2, tmp_path, capsys):
    path, model = qwen2
    data = tmp_path / "cal.jsonl"
    with open(data, "w") as f:
        for t in _random_calibration(2, 96):
            f.write(json.dumps({"input_ids": t.tolist()}) + "\n")
    out = tmp_path / "plan.json"
    args = ["--model", path, "--out", str(out), "--density", "0.5", "--lengths", "32", "64", "--eval-length", "96",
            "--calibration", str(data), "--no-progress", "--influence-cache", str(tmp_path / "prof")]
    assert main(args) == 0
    saved = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert saved == ["influence_N32_bs2.pt", "influence_N64_bs2.pt"]
    first = out.read_text()
    assert main(args) == 0  # resumes from the saved profiles: same plan
    assert json.loads(out.read_text())["entries"] == json.loads(first)["entries"]
    plan = load_plan(out)
    assert isinstance(plan, ElasticWindowPlan)
    plan.validate_against_config(model.config)
    assert plan.density(64) <= 0.5 + 1e-9
    text = capsys.readouterr().out
    assert "| layer | KV head |" in text and "wrote" in text


@pytest.mark.parametrize("density, density_lengths", [(0.5, None), (0.25, [1024])])
def test_searched_beats_uniform_on_reference_lm(density, density_lengths):
    """On the trained MQAR model, the searched plan's loss at an unseen length (1024) is <= a uniform window's at equal
    density (kept KV-cache fraction at 1024), the issue's quality criterion (benchmarks/moa_quality.py): at 50% with
    MoA's budget at every length (0.831 vs 0.846), at 25% with the budget at the scored length (0.962 vs 0.973; with
    the budget also at 256/512 the searched plan loses there, 1.010 vs 0.978, as the benchmark reports)."""
    from effalg.core.eval import evaluate_lm, lm_tasks
    from effalg.transformers.reference_models import load_reference_lm

    try:
        model, tok = load_reference_lm()
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"reference LM not available: {e}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~10x faster than two on a busy 2-core machine
    try:
        _searched_vs_uniform(model, tok, lm_tasks, evaluate_lm, density, density_lengths)
    finally:
        torch.set_num_threads(threads)


def _searched_vs_uniform(model, tok, lm_tasks, evaluate_lm, density, density_lengths):
    cal = {}
    for n in (256, 512):
        b = lm_tasks.make_batch(8, n, seed=1000 + n)
        cal[n] = [{"input_ids": b.input_ids[i], "labels": b.labels[i]} for i in range(8)]
    sel = lm_tasks.make_batch(8, 1024, seed=2000 + 1024)
    select = [{"input_ids": sel.input_ids[i], "labels": sel.labels[i]} for i in range(8)]
    plan = search_moa(model, tok, cal, density=density, lengths=(256, 512), eval_length=1024, eval_data=select,
                      density_lengths=density_lengths, show_progress=False)
    uni = uniform_plan_like(plan, 1024)
    assert plan.density(1024) <= density + 1e-9
    assert abs(uni.density(1024) - plan.density(1024)) < 0.01
    scores = {}
    for name, p in (("searched", plan), ("uniform", uni)):
        with moa_applied(model, p):
            scores[name] = evaluate_lm(model, tok, lengths=(1024,), n_seqs=16)["loss"]
    assert scores["searched"] <= scores["uniform"], scores


def test_search_sharded_over_two_processes_gives_the_same_plan(tiny_qwen2_ckpt, tmp_path):
    """torchrun with 2 CPU processes (gloo): profiling samples and validation candidates are split between them
    (accelerate) and the plan equals the single-process one."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from effalg.core.testing.launch import torchrun

    script = Path(__file__).with_name("_launch_sharded_moa.py")
    log = torchrun(script, tiny_qwen2_ckpt[0], tmp_path / "two.json", nproc=2)
    shares = re.findall(r"MoA profile N=\d+: process (\d)/2 takes (\d+) of 4 items", log)
    assert {p for p, _ in shares} == {"1", "2"} and all(k == "2" for _, k in shares)
    subprocess.run([sys.executable, str(script), tiny_qwen2_ckpt[0], str(tmp_path / "one.json")], check=True,
                   capture_output=True)  # fmt: skip
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["plan"] == one["plan"]
