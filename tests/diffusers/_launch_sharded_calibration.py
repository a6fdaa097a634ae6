"""Run by test_pipeline_calibration.py under torchrun (2 CPU processes, gloo) and plainly: ViDiT-Q mixed precision
calibration of a tiny PixArt pipeline; the main process writes the plan and sensitivities as JSON."""

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
path, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(path)
pipe.set_progress_bar_config(disable=True)
cfg = ViDiTQConfig(balance_layers=None, mixed_precision={"avg_bits": 6.0})
ED.calibrate(pipe, ["a cat", "a dog"], cfg, num_inference_steps=2, progress=False, **T.calibration_kwargs(pipe))
qc = pipe.transformer.config.quantization_config
if is_main_process():
    with open(out, "w") as f:
        json.dump({"processes": process_count(), "plan": qc.plan, "calibration": qc.to_dict()}, f, default=str)
