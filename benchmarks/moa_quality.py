"""MoA quality on the trained reference LM (tiny-qwen2-mqar): dense vs. searched MoA plan vs. uniform window.

The search profiles attention influence at 256 and 512 tokens on MQAR sequences (loss on the supervised tokens only),
solves the MILP at each density (budget at 256, 512 and 1024), and picks the final plan among the Pareto candidates by
loss at 1024 tokens on a separate selection set. The uniform baseline (StreamingLLM-style: fixed window, beta = 0,
the same sink) has the window whose density at 1024 is closest to the searched plan's. All variants are scored by
``effalg.core.eval.evaluate_lm`` at 1024 tokens (its own held-out sequences), MoA through ``apply_moa``.

**Density** is the kept fraction of the KV cache, ``plan.density(N)`` (mean over layers and KV heads of
``min(N, sink + window) / N``): the searched and uniform rows of one budget have equal KV density. The table also gives
the score density (``plan.score_density(N)``) and the real ``MoACache`` bytes after a prefill of N tokens divided by
``density x`` a dense cache's bytes.

    python benchmarks/moa_quality.py [--densities 0.5 0.25] [--n-cal 8] [--n-eval 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table  # noqa: E402


def mqar_samples(n: int, length: int, seed: int) -> list[dict]:
    from effalg.core.eval import lm_tasks

    b = lm_tasks.make_batch(n, length, seed=seed)
    return [{"input_ids": b.input_ids[i], "labels": b.labels[i]} for i in range(n)]


def run(
    densities=(0.5, 0.25),
    lengths=(256, 512),
    eval_length=1024,
    n_cal=8,
    n_select=8,
    n_eval=16,
    model_path=None,
    show_progress=True,
    budget_at=("all", "eval"),
) -> dict:
    """Search and score every variant; returns ``{"rows": [...], "plans": {...}}``.

    ``budget_at``: where the search's density budget holds: ``"all"`` = the profiling lengths and ``eval_length`` (MoA's
    default, a plan valid at every length), ``"eval"`` = only at ``eval_length``, the one length the uniform window is
    matched at and every variant is scored at.
    """
    from effalg.core.eval import evaluate_lm
    from effalg.transformers.moa_search import moa_applied, search_moa, uniform_plan_like
    from effalg.transformers.reference_models import load_reference_lm

    torch.manual_seed(0)
    model, tok = load_reference_lm(model_path)
    cal = {n: mqar_samples(n_cal, n, seed=1000 + n) for n in lengths}
    select = mqar_samples(n_select, eval_length, seed=2000 + eval_length)
    score = lambda: evaluate_lm(model, tok, lengths=(eval_length,), n_seqs=n_eval)  # noqa: E731
    rows, plans = [], {}

    def kv_ratio(plan) -> float:
        """Real MoACache bytes after a prefill of eval_length tokens / (density x dense cache bytes)."""
        from effalg.transformers import MoACache

        if plan is None:
            return 1.0
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elem = next(model.parameters()).element_size()
        dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * eval_length * head_dim * elem
        cache = MoACache(plan)
        with moa_applied(model, plan), torch.no_grad():
            model(input_ids=select[0]["input_ids"][None, :eval_length], past_key_values=cache, use_cache=True)
        return cache.kv_cache_bytes() / (plan.density(eval_length) * dense)

    def add(name, plan, res, seconds=None):
        by = res["by_length"][str(eval_length)]
        rows.append({
            "variant": name,
            "density": 1.0 if plan is None else plan.density(eval_length),
            "score_density": 1.0 if plan is None else plan.score_density(eval_length),
            "kv_vs_density": kv_ratio(plan),
            "loss": by["loss"],
            "retrieval_acc": by["retrieval_acc"],
            "local_acc": by.get("local_acc", by.get("arith_acc", float("nan"))),
            "search_s": seconds,
        })

    add("dense", None, score())
    where = {"all": (None, f"budget at {'/'.join(map(str, [*lengths, eval_length]))}"),
             "eval": ([eval_length], f"budget at {eval_length}")}
    for d in densities:
        for b in budget_at:
            t0 = time.perf_counter()
            plan = search_moa(model, tok, cal, density=d, lengths=lengths, eval_length=eval_length, eval_data=select,
                              density_lengths=where[b][0], show_progress=show_progress)
            secs = time.perf_counter() - t0
            uni = uniform_plan_like(plan, eval_length)  # the same KV density at eval_length as this plan
            with moa_applied(model, plan):
                add(f"MoA searched @{d:g}, {where[b][1]}", plan, score(), secs)
            with moa_applied(model, uni):
                add(f"  uniform window, same density (w={int(uni.windows(eval_length)[0, 0])})", uni, score())
            plans[f"{d}/{b}"] = {"searched": plan.to_dict(), "uniform": uni.to_dict()}
    return {"rows": rows, "plans": plans, "eval_length": eval_length, "lengths": list(lengths)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    p.add_argument("--eval-length", type=int, default=1024)
    p.add_argument("--n-cal", type=int, default=8, help="calibration sequences per profiling length")
    p.add_argument("--n-select", type=int, default=8, help="sequences at eval-length for picking the plan")
    p.add_argument("--n-eval", type=int, default=16, help="held-out sequences for the final scores")
    p.add_argument("--model", default=None, help="default: reference_models/tiny-qwen2-mqar")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--budget-at", nargs="+", choices=["all", "eval"], default=["all", "eval"],
                   help="where the density budget holds: all profiling lengths + eval length (MoA), or eval only")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = run(a.densities, tuple(a.lengths), a.eval_length, a.n_cal, a.n_select, a.n_eval, a.model,
              budget_at=tuple(a.budget_at))
    n = out["eval_length"]
    print(f"\nMoA quality on tiny-qwen2-mqar at {n} tokens (profiled at {out['lengths']}):\n")
    heads = ["variant", f"density (KV kept) @{n}", f"score density @{n}", "KV bytes / (density x dense)", "loss",
             "retrieval acc", "local acc", "search s"]
    print(format_table(heads, [
        [r["variant"], f"{r['density']:.4f}", f"{r['score_density']:.4f}", f"{r['kv_vs_density']:.4f}",
         f"{r['loss']:.4f}", f"{r['retrieval_acc']:.3f}", f"{r['local_acc']:.3f}",
         "" if r["search_s"] is None else f"{r['search_s']:.1f}"]
        for r in out["rows"]
    ]))
    for d, pl in out["plans"].items():
        rules = [(e["alpha"], e["beta"]) for layer in pl["searched"]["entries"].values() for e in layer]
        print(f"searched @{d}: (alpha, beta) per layer x KV head: {rules}")
        search = pl["searched"].get("metadata", {}).get("search", {})
        print(f"  selection-set losses of the candidates: {search.get('candidate_eval_losses')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
