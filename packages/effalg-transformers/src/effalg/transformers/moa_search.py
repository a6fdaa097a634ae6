"""MoA search for transformers causal LMs: attention-influence profiling, elastic-rule candidates, MILP selection,
and the final pick by loss at a longer, unseen length (evaluated with the MoA runtime).

    from effalg.transformers import search_moa
    plan = search_moa(model, tokenizer, calibration=texts, density=0.5, lengths=(2048, 4096), eval_length=8192)
    plan.save("plan.json")

    python -m effalg.transformers.moa_search --model PATH --out plan.json --density 0.5 --lengths 2048 4096 \\
        --eval-length 8192 --calibration data.jsonl

Profiling runs the dense model through a temporary attention function (registered with transformers'
``AttentionInterface``) that materializes the softmax probabilities of the profiled layers and, through a gradient
hook, keeps only the block sums of the influence ``|E|`` (see :func:`effalg.core.attention_search.attention_influence`).
One sequence at a time; ``layers_per_pass`` bounds the memory to that many layers' ``N x N`` probabilities.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from effalg.core.attention_plan import ElasticWindowPlan
from effalg.core.attention_search import (
    ElasticRule,
    RuleSelection,
    attention_influence,
    candidate_rules,
    rule_costs,
    select_rules,
)
from effalg.core.distributed import sharded_map
from effalg.core.memory import reports_peak_memory
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["generate_calibration", "moa_applied", "plan_table", "profile_attention_influence", "search_moa",
           "uniform_plan_like"]

_PROFILE_IMPL = "effalg_moa_profile"


# ---------------------------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Sample:
    input_ids: torch.Tensor  # long [T]
    labels: torch.Tensor | None  # long [T], -100 = not supervised (None: every token)

    def crop(self, n: int) -> _Sample:
        return _Sample(self.input_ids[:n], None if self.labels is None else self.labels[:n])


def _as_sample(item: Any, tokenizer: Any, where: str) -> _Sample:
    labels = None
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError(f"search_moa: {where} is a string; pass a tokenizer")
        ids = torch.tensor(tokenizer(item)["input_ids"], dtype=torch.long)
    elif isinstance(item, torch.Tensor):
        ids = item
    elif isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"search_moa: {where} is a dict without 'input_ids'")
        ids = torch.as_tensor(item["input_ids"])
        if item.get("labels") is not None:
            labels = torch.as_tensor(item["labels"]).reshape(-1).long()
        elif item.get("loss_mask") is not None:
            m = torch.as_tensor(item["loss_mask"]).reshape(-1).bool()
            labels = torch.where(m, ids.reshape(-1).long(), torch.full_like(ids.reshape(-1).long(), -100))
    elif isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
        ids = torch.tensor(item, dtype=torch.long)
    else:
        raise TypeError(
            f"search_moa: {where} must be a str, a LongTensor of token ids, a list of ints or a dict with "
            f"'input_ids' (and optional 'labels' / 'loss_mask'), got {type(item).__name__}"
        )
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point:
        raise ValueError(f"search_moa: {where} must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    ids = ids.long()
    if labels is not None and labels.shape != ids.shape:
        raise ValueError(f"search_moa: {where}: labels shape {tuple(labels.shape)} != input_ids {tuple(ids.shape)}")
    return _Sample(ids, labels)


def _samples_at(data: Any, n: int, tokenizer: Any, num_samples: int | None, what: str) -> list[_Sample]:
    """Samples of exactly ``n`` tokens: ``data[n]`` for a mapping, else items with >= n tokens cropped to n."""
    if isinstance(data, Mapping):
        items = data.get(n, data.get(str(n)))
        if items is None:
            raise ValueError(f"search_moa: {what} has no entry for length {n} (keys: {list(data)})")
        out = [_as_sample(x, tokenizer, f"{what}[{n}][{i}]") for i, x in enumerate(items)]
        bad = [i for i, s in enumerate(out) if s.input_ids.numel() < n]
        if bad:
            raise ValueError(f"search_moa: {what}[{n}] items {bad[:5]} are shorter than {n} tokens")
        out = [s.crop(n) for s in out]
    else:
        if isinstance(data, (str, torch.Tensor, Mapping)) or not isinstance(data, Sequence):
            raise TypeError(f"search_moa: {what} must be a list of samples or a mapping length -> list")
        out = [_as_sample(x, tokenizer, f"{what}[{i}]") for i, x in enumerate(data)]
        out = [s.crop(n) for s in out if s.input_ids.numel() >= n]
    if num_samples is not None:
        out = out[:num_samples]
    if not out:
        raise ValueError(f"search_moa: {what} has no sequence of at least {n} tokens")
    return out


@torch.no_grad()
def generate_calibration(
    model: Any,
    prompts: Sequence[Any],
    max_new_tokens: int,
    tokenizer: Any = None,
    *,
    do_sample: bool = False,
    show_progress: bool = True,
    **generate_kwargs: Any,
) -> list[dict[str, torch.Tensor]]:
    """Calibration text written by the dense model itself: ``[{"input_ids", "labels"}]`` per prompt, with the
    prompt tokens masked (``-100``) so the profiling loss covers the model's own response only."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_calibration: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    if model.config._attn_implementation == "moa":  # the calibration text is the *dense* model's
        from effalg.transformers.moa import dense_attention

        with dense_attention(model):
            return generate_calibration(model, prompts, max_new_tokens, tokenizer, do_sample=do_sample,
                                        show_progress=show_progress, **generate_kwargs)
    out = []
    for i, p in enumerate(tqdm(prompts, desc="MoA calibration (generate)", disable=not show_progress)):
        ids = _as_sample(p, tokenizer, f"prompts[{i}]").input_ids
        gen = model.generate(
            ids[None].to(device),
            attention_mask=torch.ones(1, ids.numel(), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            **generate_kwargs,
        )[0].cpu()
        labels = gen.clone()
        labels[: ids.numel()] = -100
        out.append({"input_ids": gen, "labels": labels})
    return out


# ---------------------------------------------------------------------------------------------------------------
# profiling
# ---------------------------------------------------------------------------------------------------------------
class _Profiler:
    def __init__(self, num_layers: int, num_kv_heads: int, n: int, block_size: int):
        nb = -(-n // block_size)
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.sums = torch.zeros(num_layers, num_kv_heads, nb, nb, dtype=torch.float64)
        self.active: set[int] = set()

    def hook(self, layer: int, probs: torch.Tensor):
        def on_grad(grad: torch.Tensor) -> None:
            infl = attention_influence(probs, grad.detach(), self.block_size)  # [Hq, nb, nb]
            hq = infl.shape[0]
            self.sums[layer] += infl.reshape(self.num_kv_heads, hq // self.num_kv_heads, *infl.shape[1:]).sum(1).cpu()

        return on_grad


_ACTIVE_PROFILER: _Profiler | None = None


def _profile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense causal attention with explicit probabilities for the profiled layers (sdpa for the others)."""
    prof = _ACTIVE_PROFILER
    layer = getattr(module, "layer_idx", None)
    if prof is None or layer not in prof.active:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
    b, hq, q_len, d = query.shape
    kv_len = key.shape[2]
    if q_len != kv_len:
        raise ValueError("MoA profiling: expected a full-sequence forward without a KV cache")
    n_rep = hq // key.shape[1]
    k = key.repeat_interleave(n_rep, 1).float()
    v = value.repeat_interleave(n_rep, 1)
    scale = scaling if scaling is not None else d**-0.5
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, -1)
    if not probs.requires_grad:  # first profiled layer of a pass: nothing upstream needs a gradient
        probs.requires_grad_(True)
    probs.register_hook(prof.hook(layer, probs.detach()))
    out = probs.to(v.dtype) @ v
    return out.transpose(1, 2).contiguous(), None


def _register_profile_impl() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_PROFILE_IMPL, _profile_attention)


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@contextlib.contextmanager
def _profiling_mode(model):
    """Switch to the profiling attention, freeze parameters, restore everything afterwards."""
    _register_profile_impl()
    prev_impl = model.config._attn_implementation
    prev_grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.set_attn_implementation(_PROFILE_IMPL)
        for p, _ in prev_grad:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        model.set_attn_implementation(prev_impl)
        for p, g in prev_grad:
            p.requires_grad_(g)
        model.train(was_training)


def _loss(logits: torch.Tensor, sample: _Sample) -> torch.Tensor:
    tgt = (sample.input_ids if sample.labels is None else sample.labels)[1:].to(logits.device)
    lg = logits[0, :-1].float()
    if not (tgt != -100).any():
        return lg.sum() * 0.0
    return torch.nn.functional.cross_entropy(lg, tgt, ignore_index=-100)


def profile_attention_influence(
    model: Any,
    samples: Sequence[_Sample],
    n: int,
    block_size: int,
    *,
    layers_per_pass: int | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Mean block-summed influence ``[num_layers, num_kv_heads, nb, nb]`` (float64) at length ``n``; GQA query heads of
    a KV group are summed."""
    global _ACTIVE_PROFILER
    cfg = _text_config(model)
    nl, nkv = cfg.num_hidden_layers, cfg.num_key_value_heads or cfg.num_attention_heads
    per = nl if layers_per_pass is None else max(1, int(layers_per_pass))
    groups = [set(range(i, min(nl, i + per))) for i in range(0, nl, per)]
    device = next(model.parameters()).device
    prof = _Profiler(nl, nkv, n, block_size)

    def one(s: _Sample) -> torch.Tensor:  # this sample's influence sums (summed over samples in order below)
        prof.sums = torch.zeros_like(prof.sums)
        for active in groups:
            prof.active = active
            with torch.enable_grad():
                logits = model(input_ids=s.input_ids[None].to(device), use_cache=False).logits
                loss = _loss(logits, s)
                if loss.requires_grad:
                    loss.backward()
            del logits, loss
        return prof.sums

    with _profiling_mode(model):
        _ACTIVE_PROFILER = prof
        try:  # samples split across the processes of an accelerate / torchrun launch, if any
            per_sample = sharded_map(one, samples, desc=f"MoA profile N={n}", progress=show_progress, unit="sample")
        finally:
            _ACTIVE_PROFILER = None
    total = torch.zeros_like(prof.sums)
    for t in per_sample:
        total += t.to(total.device)
    return total / len(samples)


# ---------------------------------------------------------------------------------------------------------------
# evaluation with the MoA runtime
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _eval_loss(model: Any, samples: Sequence[_Sample], plan: ElasticWindowPlan | None, batch_size: int = 4) -> float:
    """Mean supervised-token loss of ``model`` on equal-length ``samples`` (dense if ``plan`` is None, else with MoA
    applied temporarily), in batches of ``batch_size``."""
    device = next(model.parameters()).device
    with moa_applied(model, plan):
        tot, cnt = 0.0, 0
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            ids = torch.stack([s.input_ids for s in chunk]).to(device)
            tgt = torch.stack([s.input_ids if s.labels is None else s.labels for s in chunk])[:, 1:].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            m = tgt != -100
            if m.any():
                tot += float(torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction="sum"))
                cnt += int(m.sum())
    return tot / max(1, cnt)


_MISSING = object()


@contextlib.contextmanager
def moa_applied(model: Any, plan: ElasticWindowPlan | None):
    """Run ``model`` with MoA ``plan`` (:func:`effalg.transformers.apply_moa`) inside the block and restore its
    previous attention implementation and config attributes afterwards (``plan=None``: no change)."""
    if plan is None:
        yield model
        return
    from effalg.transformers.moa import apply_moa

    cfgs = {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values()
    saved = [(c, {k: vars(c).get(k, _MISSING) for k in ("moa_plan", "attn_implementation")}) for c in cfgs]
    prev_impl = model.config._attn_implementation
    prev_save = vars(model).get("save_pretrained", _MISSING)
    apply_moa(model, plan)
    try:
        yield model
    finally:
        if prev_save is _MISSING:
            vars(model).pop("save_pretrained", None)
        for c, attrs in saved:
            for k, v in attrs.items():
                if v is _MISSING:
                    vars(c).pop(k, None)
                else:
                    setattr(c, k, v)
        model.set_attn_implementation(prev_impl)


# ---------------------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------------------
def _default_grid(lengths: Sequence[int], eval_length: int | None) -> tuple[list[float], list[float]]:
    nmin = min(lengths)
    nmax = max([*lengths, *([eval_length] if eval_length else [])])
    step = max(1, nmin // 8)
    alphas = [float(a) for a in range(0, nmax + 1, step)]
    betas = [0.0, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0]
    return alphas, betas


def _plan_from_choice(rules: Sequence[ElasticRule], choice, model, metadata) -> ElasticWindowPlan:
    entries = [[rules[c].as_dict() for c in layer] for layer in choice]
    info = {"class": type(model).__name__, "name_or_path": getattr(model.config, "_name_or_path", "")}
    return ElasticWindowPlan.from_rules(entries, model=info, metadata=metadata)


@reports_peak_memory(logger, "MoA search")
def search_moa(
    model: Any,
    tokenizer: Any = None,
    calibration: Any = None,
    *,
    prompts: Sequence[Any] | None = None,
    max_new_tokens: int = 256,
    density: float = 0.5,
    lengths: Sequence[int] = (2048, 4096),
    eval_length: int | None = None,
    eval_data: Any = None,
    alphas: Sequence[float] | None = None,
    betas: Sequence[float] | None = None,
    sinks: Sequence[int] | None = None,
    block_size: int | None = None,
    num_samples: int | None = None,
    num_eval_samples: int | None = None,
    min_fraction: float | None = 0.9,
    density_lengths: Sequence[int] | None = None,
    include_uniform: bool = False,
    layers_per_pass: int | None = None,
    time_limit: float | None = None,
    influence_cache: str | os.PathLike | None = None,
    show_progress: bool = True,
    return_details: bool = False,
) -> ElasticWindowPlan | tuple[ElasticWindowPlan, dict]:
    """Search a per-(layer, KV head) elastic window plan at average ``density`` for a transformers causal LM.

    Args:
        calibration: a list of samples (str with ``tokenizer``, 1-D token-id tensors / lists, or dicts with
            ``input_ids`` and optional ``labels`` (-100 = not supervised, e.g. the prompt) or ``loss_mask``); items of
            at least ``N`` tokens are cropped to their first ``N`` for profiling at length ``N``. Or a mapping
            ``{length: samples}``. Alternatively give ``prompts`` (+ ``max_new_tokens``) to let the dense model write
            its own calibration text (:func:`generate_calibration`).
        density: average density budget: the kept fraction of the KV cache, mean over layers and KV heads of
            ``min(N, sink + window) / N`` (:meth:`ElasticWindowPlan.density`), enforced at every length of
            ``density_lengths`` (default: the profiling lengths and ``eval_length``, as in MoA), and
            ``>= min_fraction * density`` there.
        lengths: profiling lengths (one dense forward + backward per sample and length).
        eval_length: the longer, unseen length at which the final plan is chosen among the Pareto candidates (one per
            objective weighting of the lengths) by loss under the MoA runtime, on ``eval_data`` (default: the
            calibration data). ``None``: the longest calibration sequence (or mapping key) if longer than
            ``max(lengths)``, else the equally weighted solution is returned without validation.
        alphas, betas, sinks: the rule grid (defaults: alpha in ``0..max length`` step ``min(lengths) / 8``, beta in
            ``{0, 1/16, 1/8, 1/4, ..., 1}``, sink ``min(64, min(lengths) // 64)``, at least 1).
        block_size: influence block size (default ``min(64, min(lengths) // 16)``).
        include_uniform: also validate the densest single grid rule that meets the budget, applied to every head
            (a safeguard: the first-order influence cost can misrank plans at low density; it needs a selection set
            large enough to separate the candidates); the metadata's ``search.source`` says whether the final plan
            came from the MILP or is this uniform rule.
        layers_per_pass: profile this many layers per forward/backward (bounds memory; default all layers).
        influence_cache: a folder; the profile of each length is saved there (``influence_N{n}_bs{bs}.pt``) and reused
            when present, so an interrupted search resumes after the last finished length.
        return_details: also return a dict with the influence, candidates and their eval losses.
    """
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise ValueError(f"search_moa: density must be in (0, 1], got {density!r}")
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 2:
        raise ValueError(f"search_moa: lengths must be ints >= 2, got {lengths}")
    if calibration is None:
        if prompts is None:
            raise ValueError("search_moa: give calibration data or prompts (for self-generated calibration)")
        calibration = generate_calibration(model, prompts, max_new_tokens, tokenizer, show_progress=show_progress)
    cfg = _text_config(model)
    nl, nkv = cfg.num_hidden_layers, cfg.num_key_value_heads or cfg.num_attention_heads
    if eval_length is None:
        if isinstance(calibration, Mapping):
            longest = max(int(k) for k in calibration)
        else:
            longest = max(_as_sample(x, tokenizer, f"calibration[{i}]").input_ids.numel()
                          for i, x in enumerate(calibration))
        if longest > lengths[-1]:
            eval_length = longest
    elif eval_length <= lengths[-1]:
        raise ValueError(f"search_moa: eval_length ({eval_length}) must exceed the profiling lengths {lengths}")
    bs = block_size or max(1, min(64, lengths[0] // 16))
    sink_list = list(sinks) if sinks is not None else [max(1, min(64, lengths[0] // 64))]
    da, db = _default_grid(lengths, eval_length)
    all_lengths = lengths + ([eval_length] if eval_length else [])
    if density_lengths is None:
        constraint_lengths = all_lengths
    else:
        constraint_lengths = sorted({int(n) for n in density_lengths})
        if not constraint_lengths or constraint_lengths[0] < 1:
            raise ValueError(f"search_moa: density_lengths must be positive ints, got {density_lengths!r}")
    rules = candidate_rules(alphas if alphas is not None else da, betas if betas is not None else db, sink_list,
                            sorted({*all_lengths, *constraint_lengths}))
    logger.info("MoA search: %d candidate rules, lengths %s, eval length %s", len(rules), lengths, eval_length)

    influence = {}
    costs = []
    for n in lengths:
        cached = None if influence_cache is None else os.path.join(os.fspath(influence_cache), f"influence_N{n}_bs{bs}.pt")
        if cached is not None and os.path.isfile(cached):
            influence[n] = torch.load(cached, weights_only=True)
            nb = -(-n // bs)
            if tuple(influence[n].shape) != (nl, nkv, nb, nb):
                raise ValueError(f"search_moa: cached influence {cached} has shape {tuple(influence[n].shape)}, "
                                 f"expected {(nl, nkv, nb, nb)} (another model?)")
            logger.info("search_moa: reusing the profile at N=%d from %s", n, cached)
        else:
            samples = _samples_at(calibration, n, tokenizer, num_samples, "calibration")
            influence[n] = profile_attention_influence(
                model, samples, n, bs, layers_per_pass=layers_per_pass, show_progress=show_progress
            )
            if cached is not None:
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                torch.save(influence[n], cached)
        costs.append(rule_costs(influence[n], rules, n, bs))  # [L, Hkv, C]
    dens = [torch.tensor([r.density(n) for r in rules], dtype=torch.float64) for n in constraint_lengths]

    weightings = [[1.0] * len(lengths)]
    if len(lengths) > 1:
        weightings += [[1.0 if i == k else 0.0 for i in range(len(lengths))] for k in range(len(lengths))]
        weightings += [[float(2**i) for i in range(len(lengths))]]  # emphasise the long lengths
    candidates = []
    seen = set()
    for w in tqdm(weightings, desc="MoA MILP", disable=not show_progress):
        try:
            sel = select_rules(costs, dens, density, min_fraction=min_fraction, weights=w, time_limit=time_limit)
        except ValueError as e:
            if min_fraction is None or "lower bound" not in str(e) and "jointly" not in str(e):
                raise
            # Few heads and several lengths: the band [min_fraction * density, density] may hold no assignment.
            logger.warning("search_moa: %s; dropping the lower density bound", e)
            min_fraction = None
            sel = select_rules(costs, dens, density, min_fraction=None, weights=w, time_limit=time_limit)
        key = tuple(map(tuple, sel.choice))
        if key in seen:
            continue
        seen.add(key)
        candidates.append({"weights": w, "selection": sel, "source": "milp"})
    if include_uniform and eval_length is not None:
        ok = [c for c in range(len(rules)) if all(float(d[c]) <= density + 1e-12 for d in dens)]
        if ok:
            c = max(ok, key=lambda c: min(float(d[c]) for d in dens))
            choice = [[c] * nkv for _ in range(nl)]
            if tuple(map(tuple, choice)) not in seen:
                sel = RuleSelection(choice=choice, objective=float("nan"), densities=[float(d[c]) for d in dens])
                candidates.append({"weights": None, "selection": sel, "source": "uniform"})

    meta_base = {
        "search": {
            "density": density,
            "lengths": lengths,
            "eval_length": eval_length,
            "block_size": bs,
            "num_rules": len(rules),
            "min_fraction": min_fraction,
            "density_lengths": constraint_lengths,
        }
    }
    if eval_length is not None and len(candidates) > 1:
        data = eval_data if eval_data is not None else calibration
        ev = _samples_at(data, eval_length, tokenizer, num_eval_samples, "eval_data")
        losses = sharded_map(  # candidates split across the processes of a launch, if any
            lambda c: _eval_loss(model, ev, _plan_from_choice(rules, c["selection"].choice, model, {})),
            candidates, desc=f"MoA validate N={eval_length}", progress=show_progress, unit="plan",
        )  # fmt: skip
        for c, loss in zip(candidates, losses):
            c["eval_loss"] = loss
        best = min(candidates, key=lambda c: c["eval_loss"])
    else:
        if eval_length is None:
            logger.warning("search_moa: no eval_length (no calibration longer than the profiling lengths); "
                           "returning the equally weighted MILP solution without validation")
        best = candidates[0]
    meta = dict(meta_base)
    meta["search"]["source"] = best["source"]
    meta["search"]["objective_weights"] = best["weights"]
    meta["search"]["densities"] = {str(n): d for n, d in zip(constraint_lengths, best["selection"].densities)}
    if "eval_loss" in best:
        meta["search"]["eval_loss"] = best["eval_loss"]
        meta["search"]["candidate_eval_losses"] = [
            {"source": c["source"], "weights": c["weights"], "eval_loss": c["eval_loss"]} for c in candidates
        ]
    plan = _plan_from_choice(rules, best["selection"].choice, model, meta)
    plan.validate_against(nl, nkv)
    if return_details:
        return plan, {"influence": influence, "costs": costs, "rules": rules, "candidates": candidates}
    return plan


def uniform_plan_like(
    plan: ElasticWindowPlan, n: int, sink: int | None = None, *, elastic: bool = False
) -> ElasticWindowPlan:
    """The uniform (StreamingLLM-style) baseline: the same rule for every KV head, with ``sink`` (default: the plan's
    most common sink) and the density (kept KV-cache fraction) at length ``n`` closest to ``plan``'s: a fixed window
    ``alpha`` (``beta = 0``), or with ``elastic`` a window proportional to the length (``alpha = 0``,
    ``beta = window / n``)."""
    if sink is None:
        sink = int(torch.mode(plan.sinks().flatten()).values)
    target = plan.density(n)
    dens = lambda w: ElasticRule(float(w), 0.0, sink).density(n)  # noqa: E731  (non-decreasing in w)
    lo, hi = 1, n
    while lo < hi:  # smallest w with dens(w) >= target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if dens(mid) < target else (lo, mid)
    best = min({max(1, lo - 1), lo}, key=lambda w: abs(dens(w) - target))
    alpha, beta = (0.0, best / n) if elastic else (float(best), 0.0)
    return ElasticWindowPlan.uniform(
        plan.num_layers, plan.num_kv_heads, alpha, beta, sink, model=dict(plan.model),
        metadata={"baseline": "uniform elastic" if elastic else "uniform", "matched_density_at": n,
                  "target_density": target},
    )


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _read_jsonl(path: str) -> list[Any]:
    out = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{ln}: invalid JSON ({e})") from None
            if isinstance(obj, Mapping) and "text" in obj and "input_ids" not in obj:
                obj = obj["text"]
            out.append(obj)
    return out


def plan_table(plan: ElasticWindowPlan, n: int) -> str:
    """A short markdown table of the plan's rules and windows at length ``n``."""
    w = plan.windows(n)
    lines = [f"| layer | KV head | alpha | beta | sink | window@{n} |", "|---|---|---|---|---|---|"]
    for layer in range(plan.num_layers):
        for h in range(plan.num_kv_heads):
            r = plan.rule(layer, h)
            lines.append(f"| {layer} | {h} | {r['alpha']:g} | {r['beta']:g} | {r['sink']} | {int(w[layer, h])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m effalg.transformers.moa_search", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model path or Hub id (AutoModelForCausalLM)")
    p.add_argument("--out", required=True, help="where to write the plan JSON")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--eval-length", type=int, default=None)
    p.add_argument("--calibration", help="JSONL: one {'input_ids': [...], 'labels'?: [...]} or {'text': ...} a line")
    p.add_argument("--prompts", help="JSONL of prompts ({'text': ...}); the dense model writes the calibration text")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--sinks", type=int, nargs="+", default=None)
    p.add_argument("--alphas", type=float, nargs="+", default=None)
    p.add_argument("--betas", type=float, nargs="+", default=None)
    p.add_argument("--min-fraction", type=float, default=0.9)
    p.add_argument("--density-lengths", type=int, nargs="+", default=None,
                   help="lengths where the budget applies (default: --lengths and --eval-length)")
    p.add_argument("--uniform-candidate", action="store_true", help="also validate the densest uniform grid rule")
    p.add_argument("--layers-per-pass", type=int, default=None)
    p.add_argument("--influence-cache", default=None, help="folder to save/reuse per-length profiles (resume)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if (a.calibration is None) == (a.prompts is None):
        p.error("give exactly one of --calibration / --prompts")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(a.model)
    except Exception:  # a model folder without a tokenizer: token ids only
        tok = None
    kwargs = dict(
        density=a.density, lengths=a.lengths, eval_length=a.eval_length, num_samples=a.num_samples,
        block_size=a.block_size, sinks=a.sinks, alphas=a.alphas, betas=a.betas, min_fraction=a.min_fraction,
        density_lengths=a.density_lengths, include_uniform=a.uniform_candidate,
        layers_per_pass=a.layers_per_pass, influence_cache=a.influence_cache, show_progress=not a.no_progress,
    )
    if a.calibration:
        plan = search_moa(model, tok, _read_jsonl(a.calibration), **kwargs)
    else:
        plan = search_moa(model, tok, prompts=_read_jsonl(a.prompts), max_new_tokens=a.max_new_tokens, **kwargs)
    plan.save(a.out)
    n = a.eval_length or max(a.lengths)
    print(plan_table(plan, n))
    print(plan.summary(sorted({*a.lengths, n})))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
