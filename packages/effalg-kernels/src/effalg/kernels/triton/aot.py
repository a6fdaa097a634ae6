"""Ahead-of-time compilation of every effalg Triton kernel for real GPUs (sm_80, sm_90), with no GPU at hand.

The Triton interpreter (``TRITON_INTERPRET=1``, how the tests run without a GPU) accepts programs that real GPUs
reject, e.g. an int8 ``tl.dot`` with a K tile below 32. This module compiles launches all the way to a cubin with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reports, per launch and target:
registers, spill stores/loads (``ptxas -v``), shared memory, and the tensor-core instructions in the PTX
(``mma.sync`` / sm_90 ``wgmma``).

Two sources of launches:

* **production**: :func:`production_launches` calls the public launchers on ``meta`` tensors of every shape class
  under :func:`~effalg.kernels.triton.launch.dry_run`, so the block configurations are exactly the ones the launchers
  choose on a GPU;
* **tests**: the manifest ``tests/kernels/triton_launches.json``, every launch the kernel tests make (the tests
  check at run time that they launch nothing outside it).

Command line (run it *without* ``TRITON_INTERPRET=1``; it sets nothing on a GPU and needs none)::

    python -m effalg.kernels.triton.aot report [--source production|manifest|all] [--manifest PATH]
        [--kernel NAME] [--arch 80,90] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .launch import Launch, constexpr_to_triton, dry_run

__all__ = [
    "ARCHS",
    "CompileResult",
    "compile_launch",
    "expected_mma",
    "production_launches",
    "load_manifest",
    "write_manifest",
    "format_table",
]

#: Compute capabilities every kernel must compile for: Ampere (A100) and Hopper (H100/H200).
ARCHS = (80, 90)

_MMA_TYPES = {"int8": r"\.s32\.s8\.s8", "bf16": r"\.bf16\.bf16", "fp16": r"\.f16\.f16", "tf32": r"\.tf32\.tf32"}


def expected_mma(launch: Launch) -> str | None:
    """The tensor-core operand type a launch must compile to (``"int8"``, ``"bf16"``, ``"fp16"``, ``"tf32"``), or
    ``None`` for kernels without a matrix product on tensor cores (elementwise, reductions, IEEE fp32 dots)."""
    name = launch.short_name
    if name in ("_int8_mm_kernel", "_w4a8_kernel", "_wxa8_kernel"):
        return "int8"
    if name in ("_wo_gemm_kernel", "_prefill_kernel"):
        dot = launch.constexpr("DOT_DTYPE")
        if dot == "tl.bf16":
            return "bf16"
        if dot == "tl.fp16":
            return "fp16"
        if dot == "tl.fp32" and launch.constexpr("INPUT_PRECISION") == "tf32":
            return "tf32"
    return None


@dataclass
class CompileResult:
    """One launch compiled for one target."""

    kernel: str
    config: str
    arch: int
    ok: bool
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    mma: list[str] = field(default_factory=list)  # distinct tensor-core instructions in the PTX
    wgmma: bool = False
    expected_mma: str | None = None
    source: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def mma_ok(self) -> bool:
        """The expected tensor-core instruction type is in the PTX (trivially true when none is expected)."""
        if self.expected_mma is None:
            return True
        pat = _MMA_TYPES[self.expected_mma]
        return any(re.search(pat, ins) for ins in self.mma)


def _kernel_object(kernel: str):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("effalg.kernels.triton.aot needs TRITON_INTERPRET unset (the interpreter cannot compile)")
    module, name = kernel.split(":")
    return getattr(importlib.import_module(module), name)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    log = proc.stderr + proc.stdout
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return (
        int(regs.group(1)) if regs else -1,
        int(stores.group(1)) if stores else 0,
        int(loads.group(1)) if loads else 0,
    )


def compile_launch(launch: Launch, arch: int, source: str = "") -> CompileResult:
    """Compile ``launch`` to a cubin for ``sm_<arch>`` and inspect it. Never raises for a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = CompileResult(
        kernel=launch.short_name, config=launch.describe(), arch=arch, ok=False,
        expected_mma=expected_mma(launch), source=source,
    )  # fmt: skip
    fn = _kernel_object(launch.kernel)
    signature = {name: ty for name, ty, _ in launch.signature}
    constexprs = {name: constexpr_to_triton(v) for name, v in launch.constexprs}
    for name in constexprs:
        signature[name] = "constexpr"
    signature = {name: signature[name] for name in fn.arg_names}  # the kernel's parameter order
    attrs = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, _, div in launch.signature if div == 16
    }
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
            )
    except Exception as e:  # noqa: BLE001 - the report carries the compiler's message
        msg = str(e).strip().splitlines()
        res.error = f"{type(e).__name__}: " + " | ".join(line.strip() for line in msg[-6:] if line.strip())
        return res
    ptx = compiled.asm["ptx"]
    res.ok = True
    res.shared = int(compiled.metadata.shared)
    res.mma = sorted(set(re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)\.\S+?)[\s;]", ptx)))
    res.wgmma = any(i.startswith("wgmma") for i in res.mma)
    res.registers, res.spill_stores, res.spill_loads = _ptxas_usage(ptx, arch)
    return res


# --------------------------------------------------------------------------------------------- launch sources


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


#: (N, K) shape classes of the GEMM launchers: DiT/UNet blocks (PixArt 1152, SD 320/1280) and LLM MLPs.
GEMM_NK = ((320, 320), (1152, 1152), (4608, 1152), (1152, 4608), (11008, 4096))
#: Token counts: decode, small batches, a DiT block (2 x 1024 image tokens), long prefill.
GEMM_M = (1, 4, 16, 64, 256, 2048, 8192)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def production_launches(full: bool = False) -> list[Launch]:
    """The launches the launchers choose on a GPU over the shape classes above (no GPU needed).

    ``full=True``: every distinct launch (hundreds). Default: a covering subset, per kernel every block
    configuration (tiles, warps, stages) at least once, and every variant (dtypes, bit width, bias, ...) at its
    largest tile, the configuration most likely to spill; this is what CI compiles.
    """
    from . import band_attention as ba
    from .hadamard import triton_smooth_hadamard
    from .int8_mm import triton_w8a8_linear
    from .quantize import triton_quantize_per_token
    from .w4a8 import triton_w4a8_linear
    from .weight_only import triton_weight_only_linear
    from .wxa8 import triton_wxa8_linear

    with dry_run() as sink:
        for dtype in FLOAT_DTYPES:
            for N, K in GEMM_NK:
                bias = _meta(N, dtype=dtype)
                for M in GEMM_M:
                    x = _meta(M, K, dtype=dtype)
                    triton_w8a8_linear(x, _meta(N, K, dtype=torch.int8), _meta(N), bias)
                    for gs in (0, 32, 64, 128):
                        G = 1 if gs == 0 else K // gs
                        triton_w4a8_linear(x, _meta(N, K // 2, dtype=torch.uint8), _meta(N, G), gs, bias)
                        for bits in (2, 3, 4, 8):
                            wp = _meta(N, (K * bits + 7) // 8, dtype=torch.uint8)
                            sz = _meta(N, G, dtype=dtype)
                            triton_weight_only_linear(x, wp, sz, sz, bits, gs, bias)
                    for bits in (2, 4, 8):
                        wq = _meta(N, (K * bits + 7) // 8, dtype=torch.int8 if bits == 8 else torch.uint8)
                        triton_wxa8_linear(x, wq, _meta(N), bits, None, None, None, bias)  # dynamic
                        a_s, a_z, rs = _meta(1), _meta(1, dtype=torch.int32), _meta(N, dtype=torch.int32)
                        triton_wxa8_linear(x, wq, _meta(N), bits, a_s, a_z, rs, bias)  # static, zero point
                    triton_quantize_per_token(x, 0)
                    triton_quantize_per_token(x, 128)
            for K in (1152, 4096, 16384):
                x = _meta(256, K, dtype=dtype)
                triton_quantize_per_token(x, 0)
                s = _meta(K)
                for b in (0, 16, 32, 64, 128, 256):
                    if b == 0 or K % b == 0:
                        triton_smooth_hadamard(x, s, s, b)
                        triton_smooth_hadamard(x, None, s, b)
            for D in (64, 128):
                q = _meta(1, 8, 4096, D, dtype=dtype)
                kv = _meta(1, 2, 4096, D, dtype=dtype)
                w = torch.tensor([512, 64]).to("meta")
                for causal in (True, False):  # MoA prefill, DiTFastAttn
                    ba.triton_band_attention(q, kv, kv, w, w, _meta(1, dtype=torch.int64), 0.1, causal)
                qd = _meta(4, 32, D, dtype=dtype)
                cache = _meta(4, 8192, D, dtype=dtype)
                hs = torch.tensor([0, 2048, 4096, 6144, 8192])
                ba.triton_band_decode_attention(qd, cache, cache, hs, torch.full((4, 4), 2048), 0.1)
    launches = _unique(sink)
    return launches if full else _covering(launches)


def _is_block_param(name: str) -> bool:
    return name.startswith("BLOCK") or name in ("GROUP_M", "SINGLE_PASS", "ALIGNED")


def _tile_size(launch: Launch) -> int:
    size = launch.num_stages
    for name, value in launch.constexprs:
        if name.startswith("BLOCK") and isinstance(value, int):
            size *= value
    return size


def _covering(launches: list[Launch]) -> list[Launch]:
    """Per kernel: each block configuration once, and each variant at its largest tile."""
    chosen: dict[str, Launch] = {}
    by_kernel: dict[str, list[Launch]] = {}
    for launch in launches:
        by_kernel.setdefault(launch.kernel, []).append(launch)
    for group in by_kernel.values():
        blocks: dict[tuple, Launch] = {}
        variants: dict[tuple, Launch] = {}
        for launch in group:
            block = tuple((k, v) for k, v in launch.constexprs if _is_block_param(k))
            block += (launch.num_warps, launch.num_stages)
            variant = tuple((k, v) for k, v in launch.constexprs if not _is_block_param(k))
            variant += tuple(t for _, t, _ in launch.signature)
            blocks.setdefault(block, launch)
            if variant not in variants or _tile_size(launch) > _tile_size(variants[variant]):
                variants[variant] = launch
        for launch in (*blocks.values(), *variants.values()):
            chosen.setdefault(launch.key, launch)
    return list(chosen.values())


def _unique(launches) -> list[Launch]:
    seen: dict[str, Launch] = {}
    for launch in launches:
        seen.setdefault(launch.key, launch)
    return list(seen.values())


def load_manifest(path: str | os.PathLike) -> list[Launch]:
    """Launches from a manifest file (a JSON list of :meth:`Launch.to_json` records)."""
    return [Launch.from_json(d) for d in json.loads(Path(path).read_text())]


def write_manifest(path: str | os.PathLike, launches) -> None:
    """Write the distinct ``launches``, sorted, as a manifest."""
    records = sorted((launch.to_json() for launch in _unique(launches)), key=lambda d: json.dumps(d, sort_keys=True))
    Path(path).write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- report


def format_table(results: list[CompileResult]) -> str:
    """A Markdown table, one row per (launch, arch)."""
    rows = [
        "| kernel | source | sm | ok | regs | spill st/ld B | smem KiB | tensor cores | config |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.ok:
            tc = "wgmma " if r.wgmma else ("mma " if r.mma else "-")
            if r.expected_mma:
                tc += r.expected_mma + ("" if r.mma_ok else " MISSING")
            rows.append(
                f"| {r.kernel} | {r.source} | {r.arch} | yes | {r.registers} | {r.spill_stores}/{r.spill_loads} "
                f"| {r.shared / 1024:.1f} | {tc} | {r.config} |"
            )
        else:
            rows.append(f"| {r.kernel} | {r.source} | {r.arch} | **no** | | | | | {r.config}: {r.error[:300]} |")
    return "\n".join(rows)


def _default_manifest() -> Path | None:
    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        cand = base / "tests" / "kernels" / "triton_launches.json"
        if cand.is_file():
            return cand
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m effalg.kernels.triton.aot", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="compile launches for real GPU targets and print a table")
    r.add_argument("--source", choices=["production", "manifest", "all"], default="all")
    r.add_argument("--full", action="store_true", help="every distinct production launch, not the covering set")
    r.add_argument("--manifest", default=None, help="manifest of test launches (default: tests/kernels/...)")
    r.add_argument("--kernel", default=None, help="only launches of this kernel (e.g. _int8_mm_kernel)")
    r.add_argument("--arch", default=",".join(map(str, ARCHS)))
    r.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    work: list[tuple[str, Launch]] = []
    if args.source in ("production", "all"):
        work += [("production", launch) for launch in production_launches(full=args.full)]
    if args.source in ("manifest", "all"):
        path = args.manifest or _default_manifest()
        if path is None:
            p.error("no manifest found; pass --manifest")
        work += [("tests", launch) for launch in load_manifest(path)]
    if args.kernel:
        work = [(s, launch) for s, launch in work if launch.short_name == args.kernel]
    archs = [int(a) for a in args.arch.split(",")]
    results = []
    for i, (source, launch) in enumerate(work):
        print(f"[{i + 1}/{len(work)}] {launch.short_name} {launch.describe()}", file=sys.stderr, flush=True)
        results += [compile_launch(launch, arch, source) for arch in archs]
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    bad = [r for r in results if not r.ok or not r.mma_ok or (r.source == "production" and r.spills)]
    print(f"\n{len(results)} compiles, {len(bad)} failing (compile error, missing tensor cores, production spills)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
