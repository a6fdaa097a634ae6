"""Run by test_moa_search.py under torchrun (2 CPU processes, gloo) and plainly: a MoA search on a tiny Qwen2 (profiling
samples and validation candidates split across processes); the main process writes the plan as JSON."""

import json
import logging
import sys

import torch
from transformers import AutoModelForCausalLM

from effalg.core.distributed import is_main_process, process_count
from effalg.transformers import search_moa

torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
logging.getLogger("effalg.core.distributed").setLevel(logging.INFO)
path, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path).eval()
g = torch.Generator().manual_seed(0)
cal = [torch.randint(0, 256, (128,), generator=g) for _ in range(4)]
plan = search_moa(model, calibration=cal, density=0.5, lengths=(32, 64), eval_length=128, show_progress=False)
if is_main_process():
    with open(out, "w") as f:
        json.dump({"processes": process_count(), "plan": plan.to_dict()}, f)
