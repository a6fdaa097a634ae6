"""Run by the sharding tests under torchrun (2 CPU processes, gloo) and plainly: ``vidit_q`` (mixed-precision
calibration: per-layer sensitivity split across processes) or ``ditfastattn`` (the search: each layer's candidates
split) on a tiny PixArt pipeline; the main process writes the result as JSON."""

import json
import logging
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
else:
    plan = ED.search_ditfastattn(pipe, ["a cat", "a dog"], threshold=0.2, num_inference_steps=6, window=3,
                                 progress=False, **{**kw, "guidance_scale": 4.5})  # fmt: skip
    result = {"plan": plan.to_dict()}
if is_main_process():
    with open(out, "w") as f:
        json.dump({"processes": process_count(), **result}, f, default=str)
