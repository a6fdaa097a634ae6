"""One-command check of effalg on a CUDA GPU: ``bash scripts/dev.sh gpu-check [--quick] [--skip-tests] [--out DIR]``.

Sections (each in its own try/except, and each shape / variant too: a failure is recorded as its error text and
the remaining ones still run). Budget: under 10 minutes on one H100/H200-class GPU (``--quick``: a few).

1. ``tests``: ``pytest -m cuda tests/kernels`` (tests/kernels/test_cuda.py: every op through the public wrappers on
   CUDA against the CPU references) and the Triton kernel tests on the real GPU (``test_triton.py``,
   ``test_attention.py``, ``test_hadamard.py``), both with ``TRITON_INTERPRET=0`` (tests/conftest.py would
   otherwise default it to 1). Pass / fail / error / skip counts from JUnit XML; logs next to the results.
2. ``gemm``: W8A8 / W4A8 (``int8_scaled_mm``, ``w8a8_linear``, ``w4a8_linear`` group 0 and 128) against cuBLAS bf16
   (``F.linear``) and ``torch._int_mm`` at M in {16, 2048, 8192} and (N, K) in {(1152, 1152), (4608, 1152),
   (1152, 4608), (4096, 4096)}: ms, TFLOP/s, speed-up vs bf16.
3. ``weight_only``: W4 group-128 ``weight_only_linear`` (decode GEMV / small GEMM) at M in {1, 16} vs bf16.
4. ``moa_decode``: ``band_decode_attention`` over the compact cache (batch 4, 32 query / 8 KV heads, head_dim 128, bf16,
   context N in {16384, 65536}, each KV head keeping density * N slots, density 0.5 and 0.25) vs SDPA on the dense
   cache (default backend and FLASH_ATTENTION; native GQA where SDPA accepts it, else KV heads repeated).
5. ``moa_prefill``: causal band+sink ``band_attention`` (L 8192 / 16384, window 512 / 2048, sink 64) vs causal SDPA.
6. ``dit_band``: non-causal ``band_attention`` (DiTFastAttn) at PixArt dims (batch 2, 16 heads, head_dim 72, L 4096 /
   16384, a band of L / 8 per side, without and with 120 global text tokens) vs full SDPA.
7. ``pixart``: benchmarks/w8a8_pixart.py's PixArt-alpha-dimension transformer (4 blocks, 2 x 1024 tokens), bf16
   eager vs ViDiT-Q W8A8 / W4A8 (with and without rotation), quantized exactly as its ``vidit_q_variants`` does
   (quantize-on-load on the CPU), then moved to CUDA.

Timing: ``triton.testing.do_bench`` (median ms, L2 flushed between runs), under ``torch.inference_mode``.
Results: ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (printed at the end), rewritten after every section.
Exit status: 0 if everything ran and every test passed, 1 otherwise, 2 without CUDA. ``--sections a,b`` runs a
subset; ``--dry-run-cpu`` (hidden) runs the benchmark sections at toy shapes on the CPU to check this script only.
All benchmarks share one process: a sticky CUDA error (illegal address) makes the later ones fail too (recorded).

Environment: the virtualenv needs a CUDA build of torch 2.13 (and its triton). ``bash scripts/dev.sh setup`` installs
the CPU wheel when the venv's torch is not 2.13, so on a GPU machine install ``torch==2.13.*`` for your CUDA first,
or point ``EFFALG_VENV`` at an existing CUDA venv.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before anything imports triton: real GPU kernels, never the interpreter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import format_table, relative_error  # noqa: E402

NK = ((1152, 1152), (4608, 1152), (1152, 4608), (4096, 4096))
SHAPES = {
    "full": dict(gemm_m=(16, 2048, 8192), nk=NK, wo_m=(1, 16), decode_b=4, decode_n=(16384, 65536),
                 densities=(0.5, 0.25), prefill_l=(8192, 16384), windows=(512, 2048), sink=64, band_l=(4096, 16384),
                 blocks=4),
    "quick": dict(gemm_m=(16, 2048), nk=NK[::3], wo_m=(1, 16), decode_b=4, decode_n=(16384,), densities=(0.5,),
                  prefill_l=(8192,), windows=(512,), sink=64, band_l=(4096,), blocks=4),
    # CPU smoke run of this script's own logic (--dry-run-cpu): tiny shapes, wall-clock timing, numbers meaningless.
    "dry": dict(gemm_m=(16, 32), nk=((64, 128),), wo_m=(1,), decode_b=1, decode_n=(512,), densities=(0.5,),
                prefill_l=(256,), windows=(64,), sink=16, band_l=(256,), blocks=1),
}  # fmt: skip
HQ, HKV, HEAD_DIM = 32, 8, 128  # Llama-style GQA
DIT_B, DIT_H, DIT_D, DIT_TEXT = 2, 16, 72, 120  # PixArt-alpha attention: batch 2 (CFG), 16 heads of 72, 120 text
TEST_RUNS = (  # (name, pytest arguments, timeout in s)
    ("pytest -m cuda tests/kernels", ["-m", "cuda", "tests/kernels"], 150),
    ("Triton kernel tests", ["tests/kernels/test_triton.py", "tests/kernels/test_attention.py",
                             "tests/kernels/test_hadamard.py"], 210),
)  # fmt: skip
TITLES = {
    "tests": "Tests on the GPU (TRITON_INTERPRET=0)",
    "gemm": "W8A8 / W4A8 GEMM vs cuBLAS bf16 and torch._int_mm (x vs bf16 = bf16 ms / ms; > 1 is faster)",
    "weight_only": "Weight-only W4 (group 128) vs cuBLAS bf16 (GB/s: weight bytes read per second)",
    "moa_decode": f"MoA decode vs SDPA on the dense cache ({HQ} q / {HKV} kv heads, d {HEAD_DIM}, bf16; "
    "x vs R = R ms / ms; GB/s: unique K+V bytes read per second)",
    "moa_prefill": f"MoA prefill (band + sink) vs causal SDPA ({HQ} q / {HKV} kv heads, d {HEAD_DIM}, bf16, batch 1)",
    "dit_band": f"DiTFastAttn non-causal band attention vs full SDPA ({DIT_H} heads, d {DIT_D}, bf16, batch {DIT_B}, "
    "window L / 8 per side)",
    "pixart": "PixArt-alpha-dimension transformer (benchmarks/w8a8_pixart.py), batch 2 x 1024 tokens",
}


def err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def make_bench(dev: str):
    if dev == "cuda":
        from triton.testing import do_bench

        def bench(fn) -> float:
            with torch.inference_mode():
                return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    else:  # --dry-run-cpu: one warm-up and one timed call

        def bench(fn) -> float:
            with torch.inference_mode():
                fn()
                t0 = time.perf_counter()
                fn()
            return (time.perf_counter() - t0) * 1e3

    return bench


def attempt(setup):
    """``setup()`` (a callable to time, or ``(callable, note)``), or the exception it raised."""
    try:
        return setup()
    except Exception as e:
        return e


@contextlib.contextmanager
def guard(rows, ident):
    """Record an exception raised while setting up or timing one shape as that shape's error row."""
    try:
        yield
    except Exception as e:
        rows.append({**ident, "error": err(e)})
        print(f"  {ident}: {err(e)}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def timed(rows, ident, variants, bench, *, refs=None, flop=None, nbytes=None) -> dict:
    """Time each variant (a callable, ``(callable, note)``, an exception or an "n/a" string), one row each.

    ``refs``: ``{label: variant name in this group, or ms}``; rows get ``x vs <label>`` = reference ms / ms.
    ``flop`` (per call) adds TFLOP/s; ``nbytes`` (``{variant: bytes}``) adds GB/s. Returns ``{variant: ms}``.
    """
    out, group = {}, []
    for name, v in variants.items():
        row = {**ident, "variant": name}
        if isinstance(v, tuple):
            v, row["note"] = v
        if isinstance(v, str):
            row["note"] = v
        elif isinstance(v, BaseException):
            row["error"] = err(v)
        else:
            try:
                ms = out[name] = row["ms"] = bench(v)
                if flop:
                    row["TFLOP/s"] = flop / ms / 1e9
                if nbytes and name in nbytes:
                    row["GB/s"] = nbytes[name] / ms / 1e6
            except Exception as e:
                row["error"] = err(e)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        group.append(row)
    for row in group:
        for label, ref in (refs or {}).items():
            ref_ms = out.get(ref) if isinstance(ref, str) else ref
            if ref_ms and "ms" in row:
                row[f"x vs {label}"] = ref_ms / row["ms"]
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    rows.extend(group)
    return out


# ---------------------------------------------------------------------------------------------------- sections


def sec_tests(rows, cfg, dev, bench, args):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    for i, (name, targs, timeout) in enumerate(TEST_RUNS):
        xml, log = args.out / f"junit_{i}.xml", args.out / f"pytest_{i}.log"
        xml.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               f"--junitxml={xml}", *targs]  # fmt: skip
        cmd += ["-n", str(args.workers)] if args.workers > 0 else []
        row, t0 = {"run": name}, time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            text, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and its xdist workers (their own process group)
            text, _ = proc.communicate()
            row["error"] = f"timed out after {timeout} s (partial log)"
        log.write_text(text)
        row.update(rc=proc.returncode, seconds=time.time() - t0, log=str(log))
        try:
            root = ET.parse(xml).getroot()
            suites = list(root.iter("testsuite"))
            n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                   if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
            row = {"run": name, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                   "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"],
                   **row, "failing": bad[:30]}  # fmt: skip
        except Exception as e:  # no XML: pytest died before writing it
            row.setdefault("error", f"no JUnit results ({err(e)}); log tail: {text[-1000:]}")
        if proc.returncode not in (0, None) and not row.get("failed") and not row.get("errors"):
            row.setdefault("error", f"pytest exited {proc.returncode}; log tail: {text[-1000:]}")
        print(f"  {name}: " + ", ".join(f"{k}={row.get(k)}" for k in ("passed", "failed", "errors", "skipped", "rc")))
        rows.append(row)


def _gemm_case(rows, bench, K, x, wb, w8, ws, w4, ws4):
    (M, Kd), N = x.shape, w8.shape[0]
    a, a_scale = K.quantize_per_token(x)  # int8 [M, K], float32 [M, 1]
    variants = {
        "cuBLAS bf16 (F.linear)": lambda: F.linear(x, wb),
        "torch._int_mm (int32 out)": (lambda: torch._int_mm(a, w8.t())) if M > 16 else "n/a: _int_mm needs M > 16",
        "effalg int8_scaled_mm": lambda: K.int8_scaled_mm(a, a_scale, w8, ws, None, torch.bfloat16),
        "effalg w8a8_linear": lambda: K.w8a8_linear(x, w8, ws),
        "effalg w4a8_linear g0": lambda: K.w4a8_linear(x, w4, ws4[0], 0),
        "effalg w4a8_linear g128": lambda: K.w4a8_linear(x, w4, ws4[128], 128),
    }
    timed(rows, dict(M=M, N=N, K=Kd), variants, bench, refs={"bf16": "cuBLAS bf16 (F.linear)"}, flop=2 * M * N * Kd)


def sec_gemm(rows, cfg, dev, bench, args):
    import effalg.kernels as K

    for N, Kd in cfg["nk"]:
        with guard(rows, dict(N=N, K=Kd)):
            w8 = torch.randint(-127, 128, (N, Kd), dtype=torch.int8, device=dev)
            ws = torch.rand(N, device=dev) * 0.01 + 1e-4
            wb = (w8.float() * ws[:, None]).bfloat16()
            w4 = K.pack_int4_symmetric(torch.randint(-8, 8, (N, Kd), dtype=torch.int8)).to(dev)
            ws4 = {g: torch.rand(N, 1 if g == 0 else Kd // g, device=dev) * 0.02 + 1e-3 for g in (0, 128)}
            for M in cfg["gemm_m"]:
                with guard(rows, dict(M=M, N=N, K=Kd)):
                    x = torch.randn(M, Kd, device=dev, dtype=torch.bfloat16)
                    _gemm_case(rows, bench, K, x, wb, w8, ws, w4, ws4)


def _weight_only_case(rows, bench, K, x, wb, wp, scale, zero, gs):
    (M, Kd), N = x.shape, wb.shape[0]
    variants = {
        "cuBLAS bf16 (F.linear)": lambda: F.linear(x, wb),
        "effalg weight_only W4 g128": lambda: K.weight_only_linear(x, wp, scale, zero, 4, gs),
    }
    nbytes = {"cuBLAS bf16 (F.linear)": wb.nbytes, "effalg weight_only W4 g128": wp.nbytes + 2 * scale.nbytes}
    timed(rows, dict(M=M, N=N, K=Kd), variants, bench, refs={"bf16": "cuBLAS bf16 (F.linear)"},
          flop=2 * M * N * Kd, nbytes=nbytes)  # fmt: skip


def sec_weight_only(rows, cfg, dev, bench, args):
    import effalg.kernels as K

    gs = 128
    for N, Kd in cfg["nk"]:
        for M in cfg["wo_m"]:
            with guard(rows, dict(M=M, N=N, K=Kd)):
                wp = K.pack_bits(torch.randint(0, 16, (N, Kd), dtype=torch.uint8), 4).to(dev)
                scale = torch.rand(N, Kd // gs, device=dev) * 0.02 + 1e-3
                zero = torch.rand(N, Kd // gs, device=dev) * 15
                wb = torch.randn(N, Kd, device=dev, dtype=torch.bfloat16) * Kd**-0.5
                x = torch.randn(M, Kd, device=dev, dtype=torch.bfloat16)
                _weight_only_case(rows, bench, K, x, wb, wp, scale, zero, gs)


def sdpa(q, k, v, causal: bool, backend=None):
    """A callable running SDPA with native GQA (``enable_gqa=True``), or with the KV heads repeated where the
    backend refuses that; the note says which. Raises if the backend cannot run these inputs at all."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(kk, vv, **kw):
        with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **kw)

    try:
        call(k, v, enable_gqa=True)
        return (lambda: call(k, v, enable_gqa=True)), "native GQA"
    except Exception as e:
        n_rep = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        call(kr, vr)
        return (lambda: call(kr, vr)), f"KV heads repeated (enable_gqa: {type(e).__name__})"


def _decode_case(rows, bench, K, q, kd, vd, densities):
    """SDPA over the dense cache ``kd, vd [B, Hkv, N, D]``, then MoA over compact caches keeping ``density * N``
    slots per KV head (head ``h`` owns slots ``h * cap .. (h + 1) * cap``, all live)."""
    B, _, N, D = kd.shape
    dense = {
        "SDPA default": attempt(lambda: sdpa(q.unsqueeze(2), kd, vd, False)),
        "SDPA flash": attempt(lambda: sdpa(q.unsqueeze(2), kd, vd, False, "FLASH_ATTENTION")),
    }
    ref = timed(rows, dict(B=B, N=N, density=1.0), dense, bench, refs={"SDPA": "SDPA default"},
                nbytes=dict.fromkeys(dense, 2 * kd.nbytes))  # fmt: skip
    for density in densities:
        cap = int(density * N)
        with guard(rows, dict(B=B, N=N, density=density)):
            kc, vc = (t[:, :, :cap].reshape(B, HKV * cap, D) for t in (kd, vd))
            head_start = torch.arange(HKV + 1, device=q.device, dtype=torch.int64) * cap
            length = torch.full((B, HKV), cap, device=q.device, dtype=torch.int64)
            args = (q, kc, vc, head_start, length)
            variants = {
                "effalg band_decode_attention": lambda a=args: K.band_decode_attention(*a),
                "torch.ops.effalg (no checks)": lambda a=args: torch.ops.effalg.band_decode_attention(*a, D**-0.5),
            }
            timed(rows, dict(B=B, N=N, density=density), variants, bench,
                  refs={"SDPA": ref.get("SDPA default"), "flash": ref.get("SDPA flash")},
                  nbytes=dict.fromkeys(variants, 2 * kc.nbytes))  # fmt: skip


def sec_moa_decode(rows, cfg, dev, bench, args):
    import effalg.kernels as K

    B, dt = cfg["decode_b"], torch.bfloat16
    for N in cfg["decode_n"]:
        with guard(rows, dict(B=B, N=N)):
            q = torch.randn(B, HQ, HEAD_DIM, device=dev, dtype=dt)
            kd, vd = (torch.randn(B, HKV, N, HEAD_DIM, device=dev, dtype=dt) for _ in range(2))
            _decode_case(rows, bench, K, q, kd, vd, cfg["densities"])


def _prefill_case(rows, bench, K, q, k, v, windows, sink):
    L = q.shape[2]
    dense = {
        "SDPA causal default": attempt(lambda: sdpa(q, k, v, True)),
        "SDPA causal flash": attempt(lambda: sdpa(q, k, v, True, "FLASH_ATTENTION")),
    }
    ref = timed(rows, dict(L=L, window="causal"), dense, bench, refs={"SDPA": "SDPA causal default"})
    snk = torch.full((HKV,), sink, dtype=torch.int64, device=q.device)
    for W in windows:
        win = torch.full((HKV,), W, dtype=torch.int64, device=q.device)
        variants = {"effalg band_attention causal": lambda w=win: K.band_attention(q, k, v, w, snk, causal=True)}
        timed(rows, dict(L=L, window=W, sink=sink), variants, bench,
              refs={"SDPA": ref.get("SDPA causal default"), "flash": ref.get("SDPA causal flash")})  # fmt: skip


def sec_moa_prefill(rows, cfg, dev, bench, args):
    import effalg.kernels as K

    for L in cfg["prefill_l"]:
        with guard(rows, dict(L=L)):
            q = torch.randn(1, HQ, L, HEAD_DIM, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(1, HKV, L, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
            _prefill_case(rows, bench, K, q, k, v, cfg["windows"], cfg["sink"])


def _dit_band_case(rows, bench, K, q, k, v):
    L = q.shape[2]
    dense = {
        "SDPA default": attempt(lambda: sdpa(q, k, v, False)),
        "SDPA flash": attempt(lambda: sdpa(q, k, v, False, "FLASH_ATTENTION")),
    }
    ref = timed(rows, dict(L=L, window="full"), dense, bench, refs={"SDPA": "SDPA default"})
    W = L // 8 + 1
    variants = {
        "effalg band_attention": lambda: K.band_attention(q, k, v, W),
        f"effalg band_attention + {DIT_TEXT} global": lambda: K.band_attention(q, k, v, W, DIT_TEXT),
    }
    timed(rows, dict(L=L, window=W), variants, bench,
          refs={"SDPA": ref.get("SDPA default"), "flash": ref.get("SDPA flash")})  # fmt: skip


def sec_dit_band(rows, cfg, dev, bench, args):
    import effalg.kernels as K

    for L in cfg["band_l"]:
        with guard(rows, dict(L=L)):
            q, k, v = (torch.randn(DIT_B, DIT_H, L, DIT_D, device=dev, dtype=torch.bfloat16) for _ in range(3))
            _dit_band_case(rows, bench, K, q, k, v)


def sec_pixart(rows, cfg, dev, bench, args):
    import w8a8_pixart as wp  # benchmarks/, on sys.path

    import effalg.kernels  # noqa: F401  (registers the ops' device kernels)

    def to_dev(inputs):
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    base = wp.build_model(cfg["blocks"])  # on the CPU: vidit_q_variants saves and re-loads it from there
    x32, x16 = to_dev(wp.make_inputs(torch.float32)), to_dev(wp.make_inputs(torch.bfloat16))
    with torch.inference_mode():
        ref = copy.deepcopy(base).to(dev)(**x32)[0]
    ms = {}

    def record(name, model, inputs, note=""):
        row = {"variant": name, "blocks": cfg["blocks"]}
        try:
            model = model.to(dev)  # CPU-prepacked int8 weights are unpacked on the way
            with torch.inference_mode():
                out = model(**inputs)[0]
            ms[name] = row["ms"] = bench(lambda: model(**inputs))
            if "bf16 eager" in ms:
                row["x vs bf16"] = ms["bf16 eager"] / ms[name]
            row["rel err vs fp32"] = relative_error(ref, out)
        except Exception as e:
            row["error"] = err(e)
        print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                        if k != "variant"))  # fmt: skip
        rows.append(row)

    record("bf16 eager", copy.deepcopy(base).to(torch.bfloat16), x16)
    wp.vidit_q_variants(base, x16, record, argparse.Namespace(skip_compile=True))


SECTIONS = {"tests": sec_tests, "gemm": sec_gemm, "weight_only": sec_weight_only, "moa_decode": sec_moa_decode,
            "moa_prefill": sec_moa_prefill, "dit_band": sec_dit_band, "pixart": sec_pixart}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- output


def environment(dev: str) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = err(e)
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    else:
        env["device"] = "cpu (--dry-run-cpu: checks this script only, the numbers mean nothing)"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        env["git"] = sha.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except Exception:
        pass
    return env


def cell(v) -> object:
    if isinstance(v, list):
        v = ", ".join(map(str, v)) or ""
    if isinstance(v, str):
        return v.replace("|", "\\|").replace("\n", " ")[:300]
    return v


def rank(col: str) -> int:
    if col in ("ms", "TFLOP/s", "GB/s") or col.startswith(("x vs", "rel err")):
        return 2
    return {"variant": 1, "note": 3, "failing": 3, "error": 4}.get(col, 0)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# effalg GPU check", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    for name, sec in results["sections"].items():
        lines += [f"## {name}: {TITLES[name]}", "", f"{sec['seconds']:.0f} s", ""]
        if sec["error"]:
            lines += [f"**section failed**: {cell(sec['error'])}", ""]
        if sec["rows"]:
            cols = sorted(dict.fromkeys(k for r in sec["rows"] for k in r), key=rank)  # stable: first-seen order
            lines += [format_table(cols, [[cell(r.get(c, "")) for c in cols] for r in sec["rows"]]), ""]
    return "\n".join(lines)


def write(results: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    try:
        md = markdown(results)
    except Exception as e:  # the JSON above holds everything
        md = f"# effalg GPU check\n\nmarkdown failed: {err(e)}"
    (out / "gpu_check.md").write_text(md + "\n")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/gpu_check"), help="results folder")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a few minutes)")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--workers", type=int, default=4, help="pytest-xdist workers for the tests (0: none)")
    ap.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run_cpu:
        dev, mode = "cpu", "dry"
    elif not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    else:
        dev, mode = "cuda", "quick" if args.quick else "full"
    names = [s for s in args.sections.split(",") if s]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    if args.skip_tests or dev == "cpu":
        names = [s for s in names if s != "tests"]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if dev == "cuda":
        from effalg.kernels import triton as tk

        assert tk.register(), "effalg's Triton kernels did not register (is triton importable?)"
    cfg, bench = SHAPES[mode], make_bench(dev)
    results = {"environment": environment(dev), "mode": mode, "shapes": cfg, "sections": {}}
    t_start = time.time()
    for name in names:
        print(f"== {name}: {TITLES[name]}", flush=True)
        sec = results["sections"][name] = {"rows": [], "error": None}
        t0 = time.time()
        try:
            SECTIONS[name](sec["rows"], cfg, dev, bench, args)
        except Exception as e:
            sec["error"] = err(e)
            print(f"  section failed: {sec['error']}", flush=True)
        sec["seconds"] = time.time() - t0
        if dev == "cuda":
            torch.cuda.empty_cache()
        write(results, args.out)
    results["seconds"] = time.time() - t_start
    md = write(results, args.out)
    print("\n" + md)
    print(f"\nwritten: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} ({results['seconds']:.0f} s)")
    bad = any(
        sec["error"] or any("error" in r or r.get("failed") or r.get("errors") for r in sec["rows"])
        for sec in results["sections"].values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
