"""Run by the sharding tests under torchrun (2 CPU processes, gloo) and plainly: ``vidit_q`` (mixed-precision
calibration: per-layer sensitivity split across processes), ``ditfastattn`` (the search: each layer's candidates
split), ``usf`` (solver-schedule candidates split) or ``oms`` (model-schedule candidates split) on a tiny PixArt
pipeline; the main process writes the result as JSON, every process its own copy as ``<out>.<rank>``."""

import json
import logging
import os
import sys

import torch
from diffusers import DiffusionPipeline

import effalg.diffusers as ED
from effalg.core.distributed import is_main_process, process_count
from effalg.diffusers import ViDiTQConfig
from effalg.diffusers import testing as T

torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
logging.getLogger("effalg.core.distributed").setLevel(logging.INFO)
what, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(path)
pipe.set_progress_bar_config(disable=True)
kw = T.calibration_kwargs(pipe)
if what == "vidit_q":
    cfg = ViDiTQConfig(balance_layers=None, mixed_precision={"avg_bits": 6.0})
    ED.calibrate(pipe, ["a cat", "a dog"], cfg, num_inference_steps=2, progress=False, **kw)
    qc = pipe.transformer.config.quantization_config
    result = {"plan": qc.plan, "calibration": qc.to_dict()}
elif what == "usf":
    result = {"plan": ED.search_solver_schedule(pipe, ["a cat", "a dog"], nfe=3, max_evals=24, reference_steps=10,
                                                 progress=False, **kw).to_dict()}  # fmt: skip
elif what == "oms":
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(5)
    small = PixArtTransformer2DModel.from_config({**dict(pipe.transformer.config), "num_layers": 1}).eval()
    ms = ED.search_model_schedule({"large": pipe.transformer, "small": small}, pipe, ["a cat", "a dog"], steps=4,
                                  time_budget=0.8, max_evals=12, reference_steps=8, progress=False, **kw)  # fmt: skip
    result = {"plan": ms.to_dict()}
else:
    plan = ED.search_ditfastattn(pipe, ["a cat", "a dog"], threshold=0.2, num_inference_steps=6, window=3,
                                 progress=False, **{**kw, "guidance_scale": 4.5})  # fmt: skip
    result = {"plan": plan.to_dict()}
with open(f"{out}.{os.environ.get('RANK', '0')}", "w") as f:
    json.dump({"processes": process_count(), **result}, f, default=str)
if is_main_process():
    with open(out, "w") as f:
        json.dump({"processes": process_count(), **result}, f, default=str)
