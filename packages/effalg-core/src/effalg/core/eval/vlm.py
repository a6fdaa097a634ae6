"""Visual question answering on the shapes images (see :mod:`effalg.core.eval.shapes`) for a LLaVA-style VLM.

Each image (one circle / square / triangle of one palette colour on a background of another) is asked three
questions, each answered by one word::

    "<image> question: what shape is it ? answer:"            -> " circle"
    "<image> question: what color is the shape ? answer:"      -> " red"
    "<image> question: what color is the background ? answer:" -> " blue"

:func:`evaluate_vlm` greedy-decodes the answers and reports exact-match accuracy per question type (chance 1/3,
1/6, 1/6); :func:`vlm_samples` gives calibration samples (image + question + answer, labels on the answer tokens
only) for quantizing a VLM's language decoder; :func:`encode_vlm` builds the (right-padded) batches both use and
``reference_models/train_vlm.py`` trains on.

Framework-free: the model and processor are duck-typed. ``processor(text=[...], images=[...],
return_tensors="pt")`` must return a dict of tensors (``input_ids``, ``attention_mask``, ``pixel_values``, ...),
expanding :data:`IMAGE_TOKEN` itself (as ``LlavaProcessor`` does); ``processor.tokenizer`` must encode text
(``tokenizer(text, add_special_tokens=False)["input_ids"]``), decode ids (``decode(ids, skip_special_tokens=True)``)
and have ``eos_token_id`` (and ``pad_token_id``); ``model(**inputs)`` must return ``.logits`` ``(B, L, V)``.
Images are passed as ``(3, 32, 32)`` ``uint8`` tensors. The reference model and its processor are loaded by
:func:`effalg.transformers.reference_models.load_reference_vlm`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from effalg.core.eval import shapes

#: The placeholder the processor expands into the image's tokens.
IMAGE_TOKEN = "<image>"
#: Question types, in the order reported.
QUESTION_TYPES = ("shape", "color", "background")
QUESTIONS = {
    "shape": "what shape is it ?",
    "color": "what color is the shape ?",
    "background": "what color is the background ?",
}
#: Exact-match chance level per question type (uniform guess among the possible answers), and their mean.
CHANCE = {
    "shape": 1 / len(shapes.SHAPES),
    "color": 1 / len(shapes.COLOR_NAMES),
    "background": 1 / len(shapes.COLOR_NAMES),
}
CHANCE["all"] = sum(CHANCE[q] for q in QUESTION_TYPES) / len(QUESTION_TYPES)
#: Every word of the prompts and answers (the vocabulary of the reference model's word-level tokenizer).
_QUESTION_WORDS = " ".join(QUESTIONS.values()).split()
WORDS = list(dict.fromkeys(["question:", "answer:", *_QUESTION_WORDS, *shapes.SHAPES, *shapes.COLOR_NAMES]))
#: Result keys per question type (``bg_acc`` as in :func:`effalg.core.eval.evaluate_t2i`).
_KEYS = {"shape": "shape_acc", "color": "color_acc", "background": "bg_acc"}


def prompt(qtype: str) -> str:
    """The text fed to the processor for a question type (answer not included)."""
    return f"{IMAGE_TOKEN} question: {QUESTIONS[qtype]} answer:"


def answer(label: tuple[str, str, str], qtype: str) -> str:
    """The one-word answer to ``qtype`` for an image of ``label = (shape, fg, bg)``."""
    shape, fg, bg = label
    return {"shape": shape, "color": fg, "background": bg}[qtype]


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """A rendered ``(3, H, W)`` float image in [0, 1] as ``uint8`` (what image processors expect)."""
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def eval_items(n: int, seed: int = 1234) -> list[tuple[tuple[str, str, str], torch.Tensor]]:
    """``n`` ``(label, uint8 image)`` pairs: a seeded permutation of the 90 (shape, fg, bg) combinations, cycled,
    each rendered with a random size and position (a generator seeded with ``seed``)."""
    combos = shapes.all_combinations()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(combos), generator=gen).tolist()
    labels = [combos[order[i % len(order)]] for i in range(n)]
    return [(lab, to_uint8(shapes.render(*lab, gen))) for lab in labels]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_ids(processor: Any, text: str) -> list[int]:
    """Token ids of an answer as the model must produce them: ``" " + text`` then the end token."""
    tok = processor.tokenizer
    return _ids(tok, " " + text) + [tok.eos_token_id]


def encode_vlm(
    processor: Any,
    images: list[torch.Tensor],
    qtypes: list[str],
    answers: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """A batch of image + question prompts (``answers`` given: followed by the answer tokens and the end token, with
    ``labels`` on those only, ``-100`` elsewhere).

    The processor is called once per question type (same-length prompts), so rows are only padded, on the right
    (``pad_token_id``, attention mask 0, label -100), when question types or answer lengths differ. Row order
    follows the inputs.
    """
    if len(images) != len(qtypes) or (answers is not None and len(answers) != len(images)):
        raise ValueError("encode_vlm: images, qtypes (and answers) must have the same length")
    tok = processor.tokenizer
    pad_id = getattr(tok, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    rows: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    for q in dict.fromkeys(qtypes):
        idx = [i for i, t in enumerate(qtypes) if t == q]
        enc = processor(text=[prompt(q)] * len(idx), images=[images[i] for i in idx], return_tensors="pt")
        enc = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
        seq = enc["input_ids"].shape[1]
        for j, i in enumerate(idx):
            row = {k: v[j : j + 1] for k, v in enc.items()}
            if answers is not None:
                a = torch.tensor([answer_ids(processor, answers[i])], dtype=row["input_ids"].dtype)
                for k, v in row.items():
                    if v.dim() == 2 and v.shape[1] == seq:  # per-token tensors
                        ext = a if k == "input_ids" else torch.ones_like(a) if k == "attention_mask" else a * 0
                        row[k] = torch.cat([v, ext.to(v.dtype)], dim=1)
                row["labels"] = torch.cat([torch.full((1, seq), -100, dtype=a.dtype), a], dim=1)
            rows[i] = row
    return _collate(rows, pad_id)  # type: ignore[arg-type]


def _collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for k in rows[0]:
        parts = []
        for r in rows:
            v = r[k]
            per_token = v.dim() == 2 and v.shape[1] == r["input_ids"].shape[1]
            if per_token and v.shape[1] < length:
                fill = pad_id if k == "input_ids" else -100 if k == "labels" else 0
                v = torch.cat([v, torch.full((1, length - v.shape[1]), fill, dtype=v.dtype)], dim=1)
            parts.append(v)
        out[k] = torch.cat(parts)
    return out


def vlm_samples(processor: Any, n: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` calibration samples (e.g. for MBQ): one dict of batch-1 tensors each, the processor's model inputs
    (``input_ids``, ``attention_mask``, ``pixel_values``, ...) of an image + question + answer + end token, and
    ``labels`` (the answer and end tokens; ``-100`` on the image tokens and the question). The question types cycle
    shape, color, background; images from :func:`eval_items` with ``seed`` (use a different seed than the
    evaluation's). ``model(**sample).loss`` is the answer loss."""
    items = eval_items(n, seed)
    qtypes = [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(n)]
    out = []
    for (lab, img), q in zip(items, qtypes):
        b = encode_vlm(processor, [img], [q], [answer(lab, q)])
        out.append(b)
    return out


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


@torch.no_grad()
def evaluate_vlm(
    model: Any,
    processor: Any,
    n_samples: int = 96,
    seed: int = 1234,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    return_predictions: bool = False,
    return_logits: bool = False,
) -> dict[str, Any]:
    """Ask each of ``n_samples`` held-out images the three questions; exact-match accuracy of the greedy answers.

    Decoding is greedy with plain forwards (no cache; ``max_new_tokens`` defaults to the longest answer's token
    count, so one forward for the reference model's word-level tokenizer), stopping at the end token; the decoded
    text (special tokens skipped, stripped) must equal the answer word. Returns ``shape_acc``, ``color_acc``,
    ``bg_acc``, ``all_acc`` (the mean over the three question types), ``loss`` (mean negative log-likelihood of the
    first answer token, at the last prompt position) and ``chance`` (1/3, 1/6, 1/6, 2/9). Deterministic for a
    given ``seed`` (images from :func:`eval_items`). ``return_logits`` adds ``answer_logits``: the float32 logits of
    the first answer token, ``[3 * n_samples, vocab]`` in question-type order (compare two models with
    :func:`effalg.core.metrics.kl_divergence`).
    """
    tok = processor.tokenizer
    if max_new_tokens is None:
        words = [*shapes.SHAPES, *shapes.COLOR_NAMES]
        max_new_tokens = max(len(answer_ids(processor, w)) - 1 for w in words)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    device = _device(model)
    items = eval_items(n_samples, seed)
    eos = getattr(tok, "eos_token_id", None)
    correct = {q: 0 for q in QUESTION_TYPES}
    nll = 0.0
    preds: list[dict[str, str]] = [{} for _ in items]
    first_logits: list[torch.Tensor] = []
    for q in QUESTION_TYPES:
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            enc = encode_vlm(processor, [im for _, im in chunk], [q] * len(chunk))
            enc = {k: v.to(device) for k, v in enc.items()}
            gold = [answer(lab, q) for lab, _ in chunk]
            first = torch.tensor([answer_ids(processor, g)[0] for g in gold])
            gen: list[list[int]] = [[] for _ in chunk]
            done = torch.zeros(len(chunk), dtype=torch.bool)
            for step in range(max_new_tokens):
                logits = model(**enc).logits[:, -1].float().cpu()
                if step == 0:
                    first_logits.append(logits)
                    nll += torch.nn.functional.cross_entropy(logits, first, reduction="sum").item()
                nxt = logits.argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        if t == eos:
                            done[i] = True
                        else:
                            gen[i].append(t)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                ids = nxt.view(-1, 1).to(device)
                enc["input_ids"] = torch.cat([enc["input_ids"], ids], dim=1)
                if "attention_mask" in enc:
                    enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(ids)], dim=1)
            for i, g in enumerate(gold):
                text = tok.decode(gen[i], skip_special_tokens=True).strip()
                preds[s + i][q] = text
                correct[q] += int(text == g)
    if was_training and hasattr(model, "train"):
        model.train()
    n = max(1, len(items))
    res: dict[str, Any] = {"task": "vlm", "n_samples": len(items)}
    for q in QUESTION_TYPES:
        res[_KEYS[q]] = correct[q] / n
    res["all_acc"] = sum(res[_KEYS[q]] for q in QUESTION_TYPES) / len(QUESTION_TYPES)
    loss = nll / (n * len(QUESTION_TYPES))
    res["loss"] = loss
    res["ppl"] = math.exp(min(loss, 50.0))
    res["chance"] = {**{_KEYS[q]: CHANCE[q] for q in QUESTION_TYPES}, "all_acc": CHANCE["all"]}
    if return_logits:
        res["answer_logits"] = torch.cat(first_logits)
    if return_predictions:
        res["predictions"] = [{"label": lab, **p} for (lab, _), p in zip(items, preds)]
    return res
