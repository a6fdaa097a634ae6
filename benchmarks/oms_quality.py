"""OMS-DPM model schedules on the reference DiTs: ``tiny-pixart-shapes`` (4 layers, the large member) and
``tiny-pixart-shapes-small`` (2 layers, same VAE, text encoder and recipe), quality against measured time.

* Search: ``search_model_schedule`` on ``--n-search`` calibration prompts (not the evaluation prompts), ``--steps``
  DPM-Solver++(2M) steps (the pipeline's scheduler), guidance 3.0, the budget a fraction of the large member's
  measured time, scored by latent MSE against 50 steps of the large member (``--metric latent``) or against the data
  (``--metric data``: ``effalg.core.eval.t2i.data_score``, the FD of the checker features to rendered real images of
  another seed than the evaluation's + 0.2 x the all-three error + the pixel MSE to the reference).
* Evaluation (``effalg.core.eval.evaluate_t2i``, ``--n-eval`` held-out prompts): Fréchet distance, all-three
  accuracy, and the measured seconds of the whole evaluation run (median of ``--reps``).

    python benchmarks/oms_quality.py [--steps 6] [--budgets 0.7,0.8,0.9] [--n-eval 96] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, report  # noqa: E402


def run(steps: int, budgets: list[float], n_eval: int, n_search: int, max_evals: int, reps: int,
        metric: str = "latent") -> dict:  # fmt: skip
    from diffusers import PixArtTransformer2DModel
    from diffusers.utils import logging as dlogging

    from effalg.core.eval import evaluate_t2i, reference_models_dir, shapes
    from effalg.core.eval.t2i import data_score, eval_prompts
    from effalg.core.model_schedule import ModelSchedule
    from effalg.diffusers import ModelScheduleRouter, search_model_schedule
    from effalg.diffusers.reference_models import load_reference_t2i

    dlogging.set_verbosity_error()
    pipe = load_reference_t2i()
    pipe.set_progress_bar_config(disable=True)
    small = PixArtTransformer2DModel.from_pretrained(reference_models_dir() / "tiny-pixart-shapes-small",
                                                     subfolder="transformer").eval()  # fmt: skip
    zoo = {"large": pipe.transformer, "small": small}
    pipe.scheduler.set_timesteps(steps)
    times = [float(t) for t in pipe.scheduler.timesteps]
    g = 3.0

    def evaluate(route: list[str]) -> dict:
        pipe.transformer = ModelScheduleRouter.from_members(zoo, ModelSchedule(list(zoo), route,
                                                                               metadata={"timesteps": times}))  # fmt: skip
        secs = []
        for _ in range(reps):
            t = time.perf_counter()
            r = evaluate_t2i(pipe, n_prompts=n_eval, num_inference_steps=steps, guidance_scale=g)
            secs.append(time.perf_counter() - t)
        pipe.transformer = zoo["large"]
        return {"frechet": r["frechet"], "all_acc": r["all_acc"], "seconds": statistics.median(secs)}

    rows = []
    for name in zoo:
        rows.append({"schedule": f"{name} alone", "budget": "-", "route": "".join(n[0].upper() for n in [name] * steps),
                     **evaluate([name] * steps)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    triples = eval_prompts(n_search, 777)
    calib = [shapes.caption(*c) for c in triples]
    schedules = {}
    for b in budgets:
        ms = search_model_schedule(zoo, pipe, calib, steps, b, guidance_scale=g, max_evals=max_evals, progress=False,
                                   metric=data_score(triples) if metric == "data" else None,
                                   use_resolution_binning=False, clean_caption=False)  # fmt: skip
        schedules[str(b)] = ms.to_dict()
        rows.append({"schedule": "OMS searched", "budget": f"{b:.2f}", "route": "".join(n[0].upper() for n in ms.route),
                     **evaluate(ms.route)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "schedules": schedules, "steps": steps, "n_eval": n_eval, "metric": metric}


def table(result: dict) -> str:
    base = next(r["seconds"] for r in result["rows"] if r["schedule"] == "large alone")
    rows = [[r["schedule"], r["budget"], r["route"], f"{r['frechet']:.3f}", f"{r['all_acc']:.3f}",
             f"{r['seconds']:.2f}", f"{r['seconds'] / base:.2f}"] for r in result["rows"]]  # fmt: skip
    return format_table(["schedule", "budget", "route (L/S per step)", "FD", "all-three acc", "seconds",
                         "time vs large"], rows)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--budgets", default="0.7,0.8,0.9")
    ap.add_argument("--n-eval", type=int, default=96)
    ap.add_argument("--n-search", type=int, default=32)
    ap.add_argument("--max-evals", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--metric", choices=["latent", "data"], default="latent")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    result = run(args.steps, [float(b) for b in args.budgets.split(",")], args.n_eval, args.n_search, args.max_evals,
                 args.reps, args.metric)  # fmt: skip
    report(f"OMS-DPM on tiny-pixart-shapes (+ small): {args.steps} DPM-Solver++ steps, {args.n_eval} held-out prompts",
           table(result), result, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
