"""Score a causal LM on the synthetic MQAR + digit-reversal task (see :mod:`effalg.core.eval.lm_tasks`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from effalg.core.eval import lm_tasks


@torch.no_grad()
def evaluate_lm(
    model: Any,
    tokenizer: Any = None,
    lengths: tuple[int, ...] = (256, 1024),
    n_seqs: int = 8,
    batch_size: int = 4,
    seed: int = 1234,
) -> dict[str, Any]:
    """Retrieval accuracy (value after ``qry k``), local (digit-reversal) accuracy and supervised-token loss, per context length.

    ``model`` is any callable returning ``.logits`` (B, L, V) for ``input_ids`` (e.g. a ``Qwen2ForCausalLM``, fake-
    or really quantized). ``tokenizer`` is optional: when given, its ids for the task vocabulary are checked against
    the built-in ones. Deterministic for a given ``seed``. Chance levels: retrieval 1/32, local 1/10.
    """
    if tokenizer is not None:
        ids = tokenizer.convert_tokens_to_ids(lm_tasks.VOCAB)
        if list(ids) != list(range(len(lm_tasks.VOCAB))):
            raise ValueError("tokenizer does not match the task vocabulary")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        param = next(model.parameters()) if hasattr(model, "parameters") else None
    except StopIteration:
        param = None
    device = param.device if param is not None else torch.device("cpu")
    per_len: dict[str, dict[str, float]] = {}
    tot = {"ret_ok": 0, "ret_n": 0, "loc_ok": 0, "loc_n": 0, "nll": 0.0, "n": 0}
    for li, length in enumerate(lengths):
        gen = torch.Generator().manual_seed(seed + 7919 * li + length)
        c = {"ret_ok": 0, "ret_n": 0, "loc_ok": 0, "loc_n": 0, "nll": 0.0, "n": 0}
        done = 0
        while done < n_seqs:
            bs = min(batch_size, n_seqs - done)
            b = lm_tasks.make_batch(bs, length, gen=gen)
            logits = model(input_ids=b.input_ids.to(device)).logits.float().cpu()
            lg = logits[:, :-1]
            tgt = b.labels[:, 1:]
            kinds = b.kinds[:, 1:]
            pred = lg.argmax(-1)
            sup = tgt != -100
            nll = torch.nn.functional.cross_entropy(lg[sup], tgt[sup], reduction="sum").item()
            for kind, k in ((lm_tasks.KIND_RETRIEVAL, "ret"), (lm_tasks.KIND_LOCAL, "loc")):
                m = kinds == kind
                c[f"{k}_ok"] += int((pred[m] == tgt[m]).sum())
                c[f"{k}_n"] += int(m.sum())
            c["nll"] += nll
            c["n"] += int(sup.sum())
            done += bs
        for k in tot:
            tot[k] += c[k]
        per_len[str(length)] = {
            "retrieval_acc": c["ret_ok"] / max(1, c["ret_n"]),
            "local_acc": c["loc_ok"] / max(1, c["loc_n"]),
            "loss": c["nll"] / max(1, c["n"]),
        }
    if was_training and hasattr(model, "train"):
        model.train()
    loss = tot["nll"] / max(1, tot["n"])
    return {
        "task": "lm",
        "retrieval_acc": tot["ret_ok"] / max(1, tot["ret_n"]),
        "local_acc": tot["loc_ok"] / max(1, tot["loc_n"]),
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "by_length": per_len,
        "chance": {"retrieval_acc": 1 / lm_tasks.NUM_VALUES, "local_acc": 0.1},
    }
