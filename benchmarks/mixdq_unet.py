"""MixDQ W8A8 / W4A8 on the CPU on the Stable Diffusion 1.5 UNet, against fp32, bf16 and torchao, in one run.

A ``UNet2DConditionModel`` with SD 1.5's configuration (blocks 320 / 640 / 1280 / 1280, 2 layers per block,
cross-attention dim 768, 8 heads) on a 32x32 latent (256 px) with batch 2 (the two CFG branches) and 77 text tokens:
about a second per forward on a 2-core CPU. ``--latent 64`` is 512 px; ``--layers-per-block 1`` halves the depth.
The weights are random (diffusers' init); the UNet input is the one a ``StableDiffusionPipeline`` (tiny CLIP text
encoder of width 768, identity VAE) hands it at its first step, for a prompt outside the calibration set (with a
random UNet, later steps see latents of arbitrary scale).

    python benchmarks/mixdq_unet.py [--reps 5] [--latent 32] [--layers-per-block 2] [--skip-peers] [--skip-compile]
                                    [--skip-mixed] [--layers] [--threads N] [--json out.json]

MixDQ goes through the user-level API: ``effalg.diffusers.calibrate(pipe, prompts, MixDQConfig(...))`` on a bf16
pipeline for the static rows (static per-tensor activation ranges over prompts x steps x CFG branches, one step
each by default as for a one-step model; shortcut splits, BOS-aware ``attn2.to_k/to_v``; ``float_layers=0``: no
sensitivity search), and ``UNet2DConditionModel.from_pretrained(bf16_dir, quantization_config=MixDQConfig(...))``
(quantize-on-load: dynamic per-token activations) for the dynamic row. "mixed" is a hand plan of 8/4/2-bit layers
(not MixDQ's searched one, which needs per-layer sensitivities: hours here). torchao's int8 dynamic-activation
config quantizes ``nn.Linear`` layers only (it has no convolution support), so its convolutions stay bf16.

Timing: the variants run round-robin (one forward each per round, ``--reps`` rounds, after a warm-up round) so that
load from other processes hits all of them alike; the table gives the median. Columns: median ms, speed-up over
bf16 eager, UNet weight bytes (all parameters and buffers) and their ratio to bf16, relative error of the output
against fp32, and the share of the forward spent in the int8 GEMM (``aten::_int_mm``, torch.profiler).
``--layers`` adds a per-layer table at SD 1.5 shapes (conv, attention and feed-forward GEMMs). On a shared machine
``--threads 1`` gives steadier ratios (parallel regions wait for preempted threads).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, machine_summary, median_ms, module_bytes, relative_error  # noqa: E402

PROMPTS = ["a red circle", "a blue square on green", "a small yellow star", "two purple triangles"]
HELD_OUT = "a big orange circle on white"
GEMM_EVENTS = ("aten::_int_mm",)


def build_unet(latent: int, layers_per_block: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=latent,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=layers_per_block,
        cross_attention_dim=768,
        attention_head_dim=8,
    ).eval()


def build_pipeline(unet, seed: int = 0):
    """A ``StableDiffusionPipeline`` around ``unet``: tiny letter-level CLIP tokenizer (77 tokens), a one-layer CLIP
    text encoder of width 768, a one-level VAE (latent = image size; never decoded here), Euler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: 2 + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": 2 + len(letters) + i for i, c in enumerate(letters)})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(seed + 1)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=64,
            hidden_size=768,
            intermediate_size=1536,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )  # fmt: skip
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=8).eval()  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(unet.dtype)


def pipeline_kwargs(args) -> dict:
    return dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.latent, width=args.latent)


def capture_unet_input(pipe, args) -> dict:
    """The arguments of the pipeline's first UNet call (the pure-noise step) for a held-out prompt."""
    seen = {}

    def hook(_m, a, kw):
        if seen:
            return
        seen.update(sample=a[0] if a else kw["sample"], timestep=a[1] if len(a) > 1 else kw["timestep"],
                    encoder_hidden_states=kw.get("encoder_hidden_states", a[2] if len(a) > 2 else None))  # fmt: skip

    h = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(HELD_OUT, generator=torch.Generator().manual_seed(123), output_type="latent", **pipeline_kwargs(args))
    finally:
        h.remove()
    ts = seen["timestep"]
    ts = ts.reshape(-1).expand(seen["sample"].shape[0]) if torch.is_tensor(ts) else torch.tensor([ts] * 2)
    return dict(
        sample=seen["sample"].float(), timestep=ts.float(), encoder_hidden_states=seen["encoder_hidden_states"].float()
    )


def cast_inputs(x: dict, dtype: torch.dtype) -> dict:
    return dict(sample=x["sample"].to(dtype), timestep=x["timestep"], encoder_hidden_states=x["encoder_hidden_states"].to(dtype),
                return_dict=False)  # fmt: skip


def mixed_plan(unet) -> dict:
    """Hand plan (8/4/2 bits): the highest-resolution blocks at 8 bits, the 1280-wide feed-forward input
    projections at 2 bits, everything else at 4 bits."""
    plan = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if name.startswith(("down_blocks.0.", "up_blocks.3.")):
            plan[name] = 8
        elif name.endswith("ff.net.0.proj") and getattr(m, "in_features", 0) == 1280:
            plan[name] = 2
    return plan


def average_bits(model) -> float:
    """Parameter-weighted average weight bits over the MixDQ (``WxA8*``) layers."""
    from effalg.core.modules._wxa8 import WxA8Mixin

    num = den = 0
    for m in model.modules():
        if isinstance(m, WxA8Mixin):
            n = m.qweight.shape[0] * m._k
            num, den = num + n * m.weight_bits, den + n
    return num / den if den else float("nan")


def mixdq_variants(base, inputs16, args, add) -> None:
    """MixDQ through the user API: calibrate (static) and quantize-on-load (dynamic)."""
    from diffusers import UNet2DConditionModel

    import effalg.diffusers as ed
    from effalg.diffusers import MixDQConfig

    def calibrated(name, **cfg):
        unet = copy.deepcopy(base).to(torch.bfloat16)
        pipe = build_pipeline(unet)
        t0 = time.perf_counter()
        ed.calibrate(pipe, PROMPTS[: args.prompts], MixDQConfig(float_layers=0, **cfg), progress=False,
                     **pipeline_kwargs(args))  # fmt: skip
        print(f"  {name}: calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
        add(name, pipe.unet, inputs16, f"static, {average_bits(pipe.unet):.2f} avg bits")

    calibrated("MixDQ W8A8 static", weight_bits=8)
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(base).to(torch.bfloat16).save_pretrained(tmp)
        unet = UNet2DConditionModel.from_pretrained(tmp, quantization_config=MixDQConfig(weight_bits=8),
                                                    torch_dtype=torch.bfloat16)  # fmt: skip
        add("MixDQ W8A8 dynamic", unet.eval(), inputs16, "dynamic per token")
    calibrated("MixDQ W4A8 static", weight_bits=4)
    if not args.skip_mixed:
        calibrated("MixDQ mixed 8/4/2 static", weight_bits=4, plan=mixed_plan(base))


def manual_variants(base, inputs16, args, add) -> None:
    """Without ``MixDQConfig``: swap every Linear/Conv2d (except MixDQ's float defaults) for WxA8 modules, static
    ranges from min/max of each layer's input over one bf16 forward."""
    from effalg.core.calibration import static_act_qparams
    from effalg.core.modules import WxA8Conv2d, WxA8Linear

    skip = ("conv_in", "conv_out", "time_embedding")
    ref16 = copy.deepcopy(base).to(torch.bfloat16)
    targets = {n: m for n, m in ref16.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not n.startswith(skip)}  # fmt: skip
    ranges, hooks = {}, []
    for n, m in targets.items():

        def hook(_m, a, _n=n):
            lo, hi = float(a[0].min()), float(a[0].max())
            old = ranges.get(_n, (lo, hi))
            ranges[_n] = (min(lo, old[0]), max(hi, old[1]))

        hooks.append(m.register_forward_pre_hook(hook))
    with torch.inference_mode():
        ref16(**inputs16)
    for h in hooks:
        h.remove()

    def swapped(bits, static):
        model = copy.deepcopy(ref16)
        for n, m in list(model.named_modules()):
            if n not in targets:
                continue
            sa, za = static_act_qparams(*ranges[n]) if static and n in ranges else (None, None)
            cls = WxA8Conv2d if isinstance(m, torch.nn.Conv2d) else WxA8Linear
            q = cls.from_float(m.float(), weight_bits=bits, act_scale=sa, act_zero=za).to(torch.bfloat16)
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q)
        return model

    add("MixDQ W8A8 static (manual swap)", swapped(8, True), inputs16, "static")
    add("MixDQ W8A8 dynamic (manual swap)", swapped(8, False), inputs16, "dynamic per token")
    add("MixDQ W4A8 static (manual swap)", swapped(4, True), inputs16, "static")


def gemm_share(model, inputs) -> float:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**inputs)
    events = prof.events()
    gemm_us = sum(e.cpu_time_total for e in events if e.name in GEMM_EVENTS)
    top = [e for e in events if e.cpu_parent is None]
    wall_us = max(e.time_range.end for e in top) - min(e.time_range.start for e in top)
    return gemm_us / wall_us if wall_us else float("nan")


LAYER_CASES = [  # name, kind, in, out, kernel (conv) or tokens (linear), spatial size
    ("conv3x3 320->320, 2x320x64x64", "conv", 320, 320, 3, 64),
    ("conv3x3 640->640, 2x640x32x32", "conv", 640, 640, 3, 32),
    ("conv3x3 1280->1280, 2x1280x8x8", "conv", 1280, 1280, 3, 8),
    ("conv1x1 320->320, 2x320x64x64", "conv", 320, 320, 1, 64),
    ("linear 320->320, 2x4096 tokens", "lin", 320, 320, 8192, 0),
    ("ff 320->2560, 2x4096 tokens", "lin", 320, 2560, 8192, 0),
    ("ff 1280->320, 2x4096 tokens", "lin", 1280, 320, 8192, 0),
    ("attn2 to_k 768->320, 2x77 tokens", "lin", 768, 320, 154, 0),
]
LAYER_COLS = ["fp32", "bf16", "W8A8 static", "W8A8 dynamic", "W4A8 static", "W2A8 static", "int8 GEMM", "bf16 GEMM"]


def time_layer(kind: str, ci: int, co: int, k: int, hw: int, reps: int) -> dict:
    """Median ms of one layer: float, the MixDQ modules (bf16 activations), and the bare int8 / bf16 GEMMs."""
    import torch.nn.functional as F

    from effalg.core.modules import WxA8Conv2d, WxA8Linear

    if kind == "conv":
        m, x = torch.nn.Conv2d(ci, co, k, padding=k // 2), torch.randn(2, ci, hw, hw)
        kd, rows = ci * k * k, 2 * hw * hw
    else:
        m, x = torch.nn.Linear(ci, co), torch.randn(2, k // 2, ci)
        kd, rows = ci, k
    lo, hi = float(x.min()), float(x.max())
    s, z = (hi - lo) / 255, int(round(-128 - lo * 255 / (hi - lo)))
    cls = WxA8Conv2d if kind == "conv" else WxA8Linear
    fns = {"fp32": (m, x), "bf16": (copy.deepcopy(m).to(torch.bfloat16), x.bfloat16())}
    for name, bits, static in [("W8A8 static", 8, True), ("W8A8 dynamic", 8, False), ("W4A8 static", 4, True),
                               ("W2A8 static", 2, True)]:  # fmt: skip
        act = dict(act_scale=s, act_zero=z) if static else {}
        fns[name] = (cls.from_float(m, weight_bits=bits, **act).to(torch.bfloat16), x.bfloat16())
    t = {name: median_ms(lambda f=f, a=a: f(a), reps=reps) for name, (f, a) in fns.items()}
    a8 = torch.randint(-128, 128, (rows, kd), dtype=torch.int8)
    w8 = torch.randint(-127, 128, (co, kd), dtype=torch.int8)
    t["int8 GEMM"] = median_ms(lambda: torch._int_mm(a8, w8.t()), reps=reps)
    a16, w16 = a8.bfloat16(), w8.bfloat16()
    t["bf16 GEMM"] = median_ms(lambda: F.linear(a16, w16), reps=reps)
    return t


def layer_table(reps: int) -> str:
    """Per-layer times (ms, median) at SD 1.5 shapes."""
    rows = []
    torch.manual_seed(0)
    for name, *case in LAYER_CASES:
        t = time_layer(*case, reps=reps)
        rows.append([name, *(f"{t[c]:.2f}" for c in LAYER_COLS), f"{t['bf16'] / t['W8A8 static']:.2f}x"])
    return format_table(["layer (batch 2)", *(c + " ms" for c in LAYER_COLS), "W8A8 static vs bf16"], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=32, help="latent height = width (32: 256 px, 64: 512 px)")
    ap.add_argument("--layers-per-block", type=int, default=2, help="SD 1.5: 2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="pipeline steps per calibration prompt (1: one-step model)")
    ap.add_argument("--prompts", type=int, default=4, help="calibration prompts")
    ap.add_argument("--skip-peers", action="store_true", help="skip torchao")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-mixed", action="store_true")
    ap.add_argument("--layers", action="store_true", help="also print the per-layer table")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's default mmap threshold")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()

    import effalg.kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_malloc:  # applies to every variant alike
        effalg.kernels.configure_allocator()
    print(machine_summary(), flush=True)

    base = build_unet(args.latent, args.layers_per_block)
    inputs = capture_unet_input(build_pipeline(copy.deepcopy(base).to(torch.bfloat16)), args)
    x32, x16 = cast_inputs(inputs, torch.float32), cast_inputs(inputs, torch.bfloat16)
    with torch.inference_mode():
        ref = base(**x32)[0]

    variants = {}  # name -> (model, inputs, note)

    def add(name, model, inp, note=""):
        variants[name] = (model, inp, note)

    add("fp32 eager", base, x32)
    add("bf16 eager", copy.deepcopy(base).to(torch.bfloat16), x16)
    if not args.skip_peers:
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            tao = copy.deepcopy(base).to(torch.bfloat16)
            quantize_(tao, Int8DynamicActivationInt8WeightConfig())  # every nn.Linear; no conv support
            add("torchao int8 dyn eager", tao, x16, "Linear only")
            if not args.skip_compile:
                add("torchao int8 dyn compiled", torch.compile(tao), x16, "Linear only, torch.compile")
        except Exception as e:  # a missing or failing peer must not hide effalg's numbers
            print(f"  torchao skipped: {type(e).__name__}: {e}", flush=True)
    try:
        from effalg.diffusers import MixDQConfig  # noqa: F401

        have_mixdq = True
    except ImportError:
        have_mixdq = False
    (mixdq_variants if have_mixdq else manual_variants)(base, x16, args, add)

    results = {}
    for name, (model, inp, note) in variants.items():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(**inp)[0]  # warm-up (compiles the torch.compile'd ones)
        results[name] = dict(times=[], bytes=module_bytes(model), rel_err=relative_error(ref, out), note=note)
        print(f"  {name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(args.reps):
        for name, (model, inp, _) in variants.items():
            with torch.inference_mode():
                t0 = time.perf_counter()
                model(**inp)
                results[name]["times"].append((time.perf_counter() - t0) * 1e3)
        print(f"  round {r + 1}/{args.reps}: " + ", ".join(f"{n} {v['times'][-1]:.0f}" for n, v in results.items()),
              flush=True)  # fmt: skip
    for name, (model, inp, _) in variants.items():
        results[name]["ms"] = statistics.median(results[name]["times"])
        if name.startswith("MixDQ"):
            results[name]["gemm_share"] = gemm_share(model, inp)

    b_ms, b_bytes = results["bf16 eager"]["ms"], results["bf16 eager"]["bytes"]
    rows = [
        [name, round(r["ms"], 1), round(b_ms / r["ms"], 2), f"{r['bytes'] / 2**20:.1f}", round(b_bytes / r["bytes"], 2),
         f"{r['rel_err']:.2e}", f"{100 * r['gemm_share']:.0f}%" if "gemm_share" in r else "", r["note"]]
        for name, r in results.items()
    ]  # fmt: skip
    print()
    print(
        f"SD 1.5 UNet (320/640/1280/1280, {args.layers_per_block} layer(s) per block), batch 2 x "
        f"{args.latent}x{args.latent} latent + 77 text tokens, CPU, median of {args.reps} round-robin rounds"
    )
    print(format_table(["variant", "median ms", "speed-up vs bf16", "UNet weights MiB", "bytes ratio vs bf16",
                        "rel err vs fp32", "int8 GEMM share", "note"], rows))  # fmt: skip
    for name in list(results):
        if "static" in name and name.replace("static", "dynamic") in results:
            dyn = results[name.replace("static", "dynamic")]["ms"]
            print(f"static vs dynamic activations ({name}): dynamic costs {dyn / results[name]['ms']:.2f}x the time")
    if args.layers:
        print()
        print(layer_table(max(3, args.reps)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
