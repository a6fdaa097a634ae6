"""Synthetic LM task: multi-query associative recall (long range) interleaved with digit reversal (local).

A sequence of exactly ``length`` tokens starts with ``<bos>``. Its first half holds ``def k v`` items (bind key
``k`` to value ``v``) shuffled among local items ``a b c = c b a ;`` (three random digits, then reversed); its second
half holds ``qry k v`` items, one per bound key, again among local items. Predicting ``v`` after ``qry k`` needs a
look-up across up to ``length`` tokens; each reversed digit needs only the previous six tokens. Only those two
kinds of position are supervised (labels elsewhere are ``-100``).

Pure torch; the same generator is used by ``reference_models/train_lm.py`` and by :func:`effalg.core.eval.evaluate_lm`.
The word-level tokenizer over :data:`VOCAB` (a transformers object) is built by
:func:`effalg.transformers.reference_models.build_lm_tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_KEYS = 64
NUM_VALUES = 32
SPECIALS = ["<pad>", "<bos>", "def", "qry", "=", ";"]
DIGITS = [str(i) for i in range(10)]
KEYS = [f"k{i}" for i in range(NUM_KEYS)]
VALUES = [f"v{i}" for i in range(NUM_VALUES)]
VOCAB: list[str] = SPECIALS + DIGITS + KEYS + VALUES
TOKEN_TO_ID = {t: i for i, t in enumerate(VOCAB)}
PAD, BOS, DEF, QRY, EQ, SEMI = (TOKEN_TO_ID[t] for t in SPECIALS)
DIGIT0 = TOKEN_TO_ID["0"]
KEY0 = TOKEN_TO_ID["k0"]
VALUE0 = TOKEN_TO_ID["v0"]

# Kinds of supervised position (``kinds`` tensor of :func:`make_batch`).
KIND_NONE, KIND_RETRIEVAL, KIND_LOCAL = 0, 1, 2
LOCAL_ITEM = 8  # tokens of one ``a b c = c b a ;`` item


def num_pairs_for_length(length: int) -> int:
    """Key-value pairs per sequence: one per 16 tokens, between 8 and ``NUM_KEYS`` (dense supervision)."""
    return max(8, min(NUM_KEYS, length // 16))


@dataclass
class LMBatch:
    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 where unsupervised
    kinds: torch.Tensor  # (B, L) uint8, KIND_* of the position (label position, not the predicting one)
    distance: torch.Tensor  # (B, L) long, for retrieval labels: tokens between the ``def`` value and this value


def _local(gen: torch.Generator) -> list[int]:
    d = [DIGIT0 + int(x) for x in torch.randint(0, 10, (3,), generator=gen)]
    return d + [EQ] + d[::-1] + [SEMI]


def _half(items: list[list[int]], budget: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffle ``items`` among local items so that the total is ``budget`` tokens (``;`` pads the rest)."""
    used = sum(len(it) for it in items)
    if used > budget:
        raise ValueError("sequence too short for its key-value items")
    n_local = (budget - used) // LOCAL_ITEM
    all_items = items + [_local(gen) for _ in range(n_local)]
    order = torch.randperm(len(all_items), generator=gen).tolist()
    out = [all_items[i] for i in order]
    pad = budget - used - LOCAL_ITEM * n_local
    if pad:
        out.append([SEMI] * pad)
    return out


def make_sequence(length: int, gen: torch.Generator) -> tuple[list[int], list[int], list[int], list[int]]:
    n = num_pairs_for_length(length)
    keys = torch.randperm(NUM_KEYS, generator=gen)[:n].tolist()
    values = torch.randint(0, NUM_VALUES, (n,), generator=gen).tolist()
    first = (length - 1) // 2
    second = length - 1 - first
    defs = [[DEF, KEY0 + k, VALUE0 + v] for k, v in zip(keys, values)]
    q_order = torch.randperm(n, generator=gen).tolist()
    qrys = [[QRY, KEY0 + keys[i], VALUE0 + values[i]] for i in q_order]
    ids = [BOS]
    for it in _half(defs, first, gen) + _half(qrys, second, gen):
        ids.extend(it)
    labels = [-100] * length
    kinds = [KIND_NONE] * length
    dist = [0] * length
    def_pos: dict[int, int] = {}
    for t in range(2, length):
        tok, prev, prev2 = ids[t], ids[t - 1], ids[t - 2]
        if prev2 == DEF and KEY0 <= prev < KEY0 + NUM_KEYS:
            def_pos[prev] = t
        elif prev2 == QRY and KEY0 <= prev < KEY0 + NUM_KEYS:
            labels[t], kinds[t], dist[t] = tok, KIND_RETRIEVAL, t - def_pos[prev]
        elif EQ in (prev, prev2, ids[t - 3] if t >= 3 else PAD):  # the reversed digits follow ``=``
            labels[t], kinds[t] = tok, KIND_LOCAL
    return ids, labels, kinds, dist


def make_batch(batch_size: int, length: int, seed: int | None = None, gen: torch.Generator | None = None) -> LMBatch:
    """``batch_size`` sequences of exactly ``length`` tokens; deterministic for a given ``seed`` (or generator)."""
    if gen is None:
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
    rows = [make_sequence(length, gen) for _ in range(batch_size)]
    return LMBatch(
        input_ids=torch.tensor([r[0] for r in rows], dtype=torch.long),
        labels=torch.tensor([r[1] for r in rows], dtype=torch.long),
        kinds=torch.tensor([r[2] for r in rows], dtype=torch.uint8),
        distance=torch.tensor([r[3] for r in rows], dtype=torch.long),
    )
