"""The VLM evaluator's scoring logic and calibration samples, with a fake processor and fake models (no
transformers, no trained weights)."""

import torch

from effalg.core.eval import evaluate_vlm, format_table, shapes, vlm, vlm_samples

N_IMG = 4  # image tokens per <image>


class FakeTokenizer:
    """Word-level: ``<pad>`` 0, ``</s>`` 1, ``<image>`` 2, then :data:`vlm.WORDS`."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self):
        self.vocab = {"<pad>": 0, "</s>": 1, vlm.IMAGE_TOKEN: 2, **{w: i + 3 for i, w in enumerate(vlm.WORDS)}}
        self.inv = {i: w for w, i in self.vocab.items()}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.vocab[w] for w in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.inv[i] for i in ids if not (skip_special_tokens and i < 3))


class FakeProcessor:
    def __init__(self):
        self.tokenizer = FakeTokenizer()

    def __call__(self, text, images, return_tensors="pt"):
        assert return_tensors == "pt" and len(text) == len(images)
        expanded = [t.replace(vlm.IMAGE_TOKEN, " ".join([vlm.IMAGE_TOKEN] * N_IMG)) for t in text]
        ids = torch.tensor([self.tokenizer(t)["input_ids"] for t in expanded])
        assert all(im.dtype == torch.uint8 and im.shape == (3, 32, 32) for im in images)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.stack(images).float() / 255,
        }


class OracleModel:
    """Reads the image with the shapes checker and the question type from the prompt; answers, then ``</s>``.
    ``wrong`` maps a question type to a fixed (often wrong) answer word."""

    def __init__(self, tok, wrong=None):
        self.tok = tok
        self.wrong = wrong or {}
        self.calls = 0

    def __call__(self, input_ids, attention_mask=None, pixel_values=None):
        self.calls += 1
        v = self.tok.vocab
        logits = torch.zeros(*input_ids.shape, len(v))
        for b, row in enumerate(input_ids.tolist()):
            assert row.count(v[vlm.IMAGE_TOKEN]) == N_IMG
            if row[-1] != v["answer:"]:
                logits[b, -1, v["</s>"]] = 10.0
                continue
            q = "background" if v["background"] in row else "color" if v["color"] in row else "shape"
            c = shapes.check_image(pixel_values[b])
            word = self.wrong.get(q) or vlm.answer((c.shape, c.fg, c.bg), q)
            logits[b, -1, v[word]] = 10.0
        return type("Out", (), {"logits": logits})()


def test_oracle_scores_one_and_chance_levels():
    proc = FakeProcessor()
    model = OracleModel(proc.tokenizer)
    res = evaluate_vlm(model, proc, n_samples=20, seed=3, batch_size=8)
    assert res["task"] == "vlm" and res["n_samples"] == 20
    assert res["shape_acc"] == res["color_acc"] == res["bg_acc"] == res["all_acc"] == 1.0
    assert res["loss"] < 0.01
    assert model.calls == 3 * 3  # one forward per batch (single-token answers): 3 questions x ceil(20 / 8)
    assert res["chance"] == {"shape_acc": 1 / 3, "color_acc": 1 / 6, "bg_acc": 1 / 6, "all_acc": 2 / 9}
    # greedy decoding past the answer stops at </s> and gives the same scores
    res3 = evaluate_vlm(OracleModel(proc.tokenizer), proc, n_samples=20, seed=3, max_new_tokens=3, return_logits=True)
    assert res3["answer_logits"].shape == (3 * 20, len(proc.tokenizer.vocab)) and "answer_logits" not in res
    assert res3["all_acc"] == 1.0 and abs(res3["loss"] - res["loss"]) < 1e-6


def test_wrong_answers_are_counted_per_question_type():
    proc = FakeProcessor()
    model = OracleModel(proc.tokenizer, wrong={"shape": "circle", "background": "red"})
    res = evaluate_vlm(model, proc, n_samples=30, seed=0, return_predictions=True)
    items = vlm.eval_items(30, seed=0)
    circles = sum(lab[0] == "circle" for lab, _ in items) / 30
    red_bg = sum(lab[2] == "red" for lab, _ in items) / 30
    assert 0 < circles < 1 and 0 < red_bg < 1
    assert res["shape_acc"] == circles and res["bg_acc"] == red_bg and res["color_acc"] == 1.0
    assert abs(res["all_acc"] - (circles + red_bg + 1.0) / 3) < 1e-12
    assert res["loss"] > 1.0  # the wrong answers cost ~10 nats each
    preds = res["predictions"]
    assert len(preds) == 30 and all(p["shape"] == "circle" for p in preds)
    assert [p["label"] for p in preds] == [lab for lab, _ in items]
    assert "vlm" not in format_table({"x": res}) and "bg" in format_table({"fp32": res, "w3": res})


def test_eval_items_deterministic_and_cover_all_combinations():
    a, b, c = vlm.eval_items(90, seed=5), vlm.eval_items(90, seed=5), vlm.eval_items(90, seed=6)
    assert [x[0] for x in a] == [x[0] for x in b] and all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))
    assert sorted(x[0] for x in a) == sorted(shapes.all_combinations())
    for lab, img in a:  # the rendered uint8 images read back exactly
        r = shapes.check_image(img.float() / 255)
        assert (r.shape, r.fg, r.bg) == lab


def test_vlm_samples_label_only_the_answer():
    proc = FakeProcessor()
    tok = proc.tokenizer
    samples = vlm_samples(proc, n=6, seed=1)
    assert len(samples) == 6
    items = vlm.eval_items(6, seed=1)
    for i, (s, (lab, _)) in enumerate(zip(samples, items)):
        q = vlm.QUESTION_TYPES[i % 3]
        assert set(s) == {"input_ids", "attention_mask", "pixel_values", "labels"}
        ids, labels = s["input_ids"][0], s["labels"][0]
        assert s["pixel_values"].shape == (1, 3, 32, 32) and ids.shape == labels.shape == s["attention_mask"][0].shape
        sup = labels != -100
        assert sup.sum() == 2 and sup[-2:].all()  # the answer word and </s>, nothing else
        assert labels[-2:].tolist() == [tok.vocab[vlm.answer(lab, q)], tok.eos_token_id] == ids[-2:].tolist()
        img = ids == tok.vocab[vlm.IMAGE_TOKEN]
        assert img.sum() == N_IMG and not (img & sup).any()
        assert tok.decode(ids[:-2].tolist()).endswith(vlm.QUESTIONS[q] + " answer:")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, vlm_samples(proc, 6, seed=1)))


def test_encode_vlm_right_pads_mixed_question_types():
    proc = FakeProcessor()
    items = vlm.eval_items(4, seed=2)
    qs = ["shape", "background", "color", "shape"]
    b = vlm.encode_vlm(proc, [im for _, im in items], qs, [vlm.answer(lab, q) for (lab, _), q in zip(items, qs)])
    lens = [
        len(proc.tokenizer(vlm.prompt(q).replace(vlm.IMAGE_TOKEN, (vlm.IMAGE_TOKEN + " ") * N_IMG))["input_ids"])
        for q in qs
    ]
    assert b["input_ids"].shape == (4, max(lens) + 2)
    for r, n in enumerate(lens):
        assert b["attention_mask"][r].sum() == n + 2 and (b["attention_mask"][r, : n + 2] == 1).all()
        assert (b["labels"][r] != -100).sum() == 2 and (b["input_ids"][r, n + 2 :] == 0).all()
    assert torch.equal(b["pixel_values"], torch.stack([im for _, im in items]).float() / 255)  # row order kept
