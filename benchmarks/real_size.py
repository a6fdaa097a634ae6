"""Real-size smoke benchmark: quantize-on-load of full-width models with random weights, in a default environment.

For each model a bf16 checkpoint of its published configuration is written once (random weights, ``--dir``), then
every row loads it in a fresh subprocess (``effalg.core.testing.memory.measure_in_subprocess``):

* **load s**: ``from_pretrained(..., quantization_config=...)`` wall time (float rows: plain bf16 load);
* **peak / after MiB**: anonymous memory (``RssAnon``; the file-backed safetensors mmap does not count) above the
  import-only baseline, sampled every 5 ms during the load / after it;
* **model MiB**: the loaded model's parameters and buffers; **quantized MiB**: those of its quantized layers (the
  float layers' weights stay file-backed mmap pages, so a bf16 row's anonymous figures sit far below its model bytes);
* **peak - quantized**: the issue's criterion (at most 300 MiB for PixArt-alpha);
* **forward s**: one forward after the load (2 threads), on the inputs listed per model.

Models: PixArt-alpha (28 blocks, hidden 1152; 1024 image tokens, i.e. 512 px), the SD 1.5 UNet (64x64 latent), a
Llama-7B-shaped decoder (hidden 4096, MLP 11008; ``--llama-layers`` layers since 24 GiB is the limit; a 128-token
prefill) and a Flux-shaped transformer (hidden 3072; ``--flux-blocks`` double + single blocks; 256 image + 64 text
tokens). The issue's criterion: peak at most the quantized model + 300 MiB; after the load near the model bytes.

    python benchmarks/real_size.py [--dir /tmp/effalg_real_size] [--only pixart_alpha,llama] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, report  # noqa: E402

DIFFUSERS_SETUP = """
import time, torch
import diffusers
from effalg.diffusers import EffalgLinearConfig, ViDiTQConfig
torch.set_num_threads(2)
"""
TRANSFORMERS_SETUP = """
import time, torch
from transformers import AutoModelForCausalLM
from effalg.transformers import EffalgLinearConfig
torch.set_num_threads(2)
"""

FORWARD = {
    "pixart_alpha": """
g = torch.Generator().manual_seed(0)
kw = dict(hidden_states=torch.randn(1, 4, 64, 64, generator=g), encoder_hidden_states=torch.randn(1, 120, 4096, generator=g),
          timestep=torch.tensor([500]), added_cond_kwargs={"resolution": torch.tensor([[512.0, 512.0]]), "aspect_ratio": torch.tensor([[1.0]])})
""",
    "sd15_unet": """
g = torch.Generator().manual_seed(0)
kw = dict(sample=torch.randn(1, 4, 64, 64, generator=g), timestep=torch.tensor([500]),
          encoder_hidden_states=torch.randn(1, 77, 768, generator=g))
""",
    "flux": """
g = torch.Generator().manual_seed(0)
kw = dict(hidden_states=torch.randn(1, 256, 64, generator=g), encoder_hidden_states=torch.randn(1, 64, 4096, generator=g),
          pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.tensor([0.5]), img_ids=torch.zeros(256, 3),
          txt_ids=torch.zeros(64, 3), guidance=torch.tensor([3.5]))
""",
    "llama": """
kw = dict(input_ids=torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(0)))
""",
}
TIMED = """
from effalg.core.modules import QuantModuleBase, memory_footprint
extra["quantized_mib"] = sum(memory_footprint(m) for m in model.modules() if isinstance(m, QuantModuleBase)) / 2**20
dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
kw = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k not in ("timestep",) else v) for k, v in kw.items()}
with torch.no_grad():
    t = time.perf_counter()
    out = model(**kw)
    extra["forward_s"] = time.perf_counter() - t
"""

ROWS = {  # model: [(label, quantization_config expression or None)]
    "pixart_alpha": [("bf16", None), ("ViDiT-Q W8A8", "ViDiTQConfig(8, 8)"), ("ViDiT-Q W4A8", "ViDiTQConfig(4, 8)"),
                     ("effalg linear W8A8", "EffalgLinearConfig(8, 8)")],
    "sd15_unet": [("bf16", None), ("effalg linear W8A8", "EffalgLinearConfig(8, 8)")],
    "llama": [("bf16", None), ("effalg linear W8A8", "EffalgLinearConfig(8, 8)"),
              ("effalg linear W4 g128", "EffalgLinearConfig(4, None, weight_group_size=128)")],  # fmt: skip
    "flux": [("bf16", None), ("ViDiT-Q W8A8", "ViDiTQConfig(8, 8)"), ("ViDiT-Q W4A8", "ViDiTQConfig(4, 8)")],
}
CLASSES = {"pixart_alpha": "PixArtTransformer2DModel", "sd15_unet": "UNet2DConditionModel",
           "flux": "FluxTransformer2DModel"}  # fmt: skip


def checkpoint(kind: str, root: str, llama_layers: int, flux_blocks: tuple[int, int]) -> tuple[str, int]:
    path = os.path.join(root, kind if kind != "flux" else f"flux_{flux_blocks[0]}_{flux_blocks[1]}")
    if kind == "llama":
        path += f"_{llama_layers}"
    stamp = os.path.join(path, "effalg_params.txt")
    if os.path.exists(stamp):
        return path, int(open(stamp).read())
    if kind == "llama":
        from effalg.transformers.testing import llama_7b_shaped

        _, n = llama_7b_shaped(path, num_layers=llama_layers, max_shard_size="2GB")
    else:
        from effalg.diffusers.testing import make_full_size

        _, n = make_full_size(kind, path, layers=flux_blocks if kind == "flux" else None, max_shard_size="2GB")
    with open(stamp, "w") as f:
        f.write(str(n))
    return path, n


def run(root: str, only: list[str], llama_layers: int, flux_blocks: tuple[int, int]) -> list[dict]:
    from effalg.core.testing.memory import measure_in_subprocess

    rows = []
    for kind in only:
        path, n = checkpoint(kind, root, llama_layers, flux_blocks)
        for label, cfg in ROWS[kind]:
            q = "" if cfg is None else f", quantization_config={cfg}"
            if kind == "llama":
                setup, load = TRANSFORMERS_SETUP, f"AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.bfloat16{q})"
            else:
                setup = DIFFUSERS_SETUP
                load = f"diffusers.{CLASSES[kind]}.from_pretrained({path!r}, torch_dtype=torch.bfloat16{q})"
            r = measure_in_subprocess(f"model = {load}", setup, after=FORWARD[kind] + TIMED, timeout=3600)
            row = {"name": kind, "params_M": n / 1e6, "variant": label, **r}
            rows.append(row)
            print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        quantized = r["variant"] != "bf16"
        out.append([
            f"{r['name']} ({r['params_M']:.0f} M)", r["variant"], f"{r['seconds']:.1f}", f"{r['peak']:.0f}",
            f"{r['after']:.0f}", f"{r['model']:.0f}", f"{r['extra'].get('quantized_mib', 0):.0f}",
            f"{r['peak'] - r['extra'].get('quantized_mib', 0):+.0f}" if quantized else "-",
            f"{r['extra'].get('forward_s', float('nan')):.2f}",
        ])  # fmt: skip
    head = ["model", "variant", "load s", "peak MiB", "after MiB", "model MiB", "quantized MiB", "peak - quantized",
            "forward s"]  # fmt: skip
    return format_table(head, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/effalg_real_size", help="where the random-weight checkpoints are cached")
    ap.add_argument("--only", default="pixart_alpha,sd15_unet,llama,flux")
    ap.add_argument("--llama-layers", type=int, default=4)
    ap.add_argument("--flux-blocks", default="2,4", help="double,single blocks (FLUX.1: 19,38)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(only) - set(ROWS))
    if unknown:
        ap.error(f"--only: unknown model(s) {unknown}; known: {sorted(ROWS)}")
    flux = tuple(int(x) for x in args.flux_blocks.split(","))
    rows = run(args.dir, only, args.llama_layers, flux)
    report("Real-size quantize-on-load (random weights, bf16 checkpoints, default glibc settings):", table(rows), rows,
           args.json)  # fmt: skip


if __name__ == "__main__":
    main()
