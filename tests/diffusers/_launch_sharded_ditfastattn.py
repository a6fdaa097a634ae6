"""Run by test_ditfastattn_search.py under torchrun (2 CPU processes, gloo) and plainly: the DiTFastAttn search on a
tiny PixArt pipeline (each layer's candidates split across processes); the main process writes the plan as JSON."""

import json
import logging
import sys

import torch
from diffusers import DiffusionPipeline

import effalg.diffusers as ED
from effalg.core.distributed import is_main_process, process_count
from effalg.diffusers import testing as T

torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
logging.getLogger("effalg.core.distributed").setLevel(logging.INFO)
path, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(path)
pipe.set_progress_bar_config(disable=True)
kw = {**T.calibration_kwargs(pipe), "guidance_scale": 4.5}
plan = ED.search_ditfastattn(pipe, ["a cat", "a dog"], threshold=0.2, num_inference_steps=6, window=3, progress=False,
                             **kw)  # fmt: skip
if is_main_process():
    with open(out, "w") as f:
        json.dump({"processes": process_count(), "plan": plan.to_dict()}, f)
