"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) with no GPU: effalg.kernels.triton.aot.

Two sets of launches, compiled to cubins in a subprocess without ``TRITON_INTERPRET`` (the interpreter accepts
programs GPUs reject):

* production: what the launchers choose on a GPU over the shape classes (``production_launches``, the covering
  set: every block configuration, and every dtype / bit-width variant at its largest tile);
* tests: the manifest ``triton_launches.json`` of every launch the kernel tests make (conftest.py fails a test that
  launches anything outside it).

A launch fails on a compile error, on register spills in a production configuration, or when a GEMM / attention
kernel's PTX lacks the tensor-core instruction of its operand type (int8 MMA for the int8/int4/int2 GEMMs, bf16/fp16 MMA
for the weight-only GEMM and MoA attention). The table printed on failure (and by
``python -m effalg.kernels.triton.aot report``) lists registers, spills, shared memory and mma/wgmma per launch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed; nothing to compile", allow_module_level=True)

from effalg.kernels.triton.aot import CompileResult, expected_mma, format_table, load_manifest  # noqa: E402
from effalg.kernels.triton.launch import Launch, describe  # noqa: E402

MANIFEST = Path(__file__).with_name("triton_launches.json")
KERNELS = [
    "_quantize_kernel",
    "_int8_mm_kernel",
    "_w4a8_kernel",
    "_wxa8_kernel",
    "_wo_gemm_kernel",
    "_wo_gemv_kernel",
    "_smooth_hadamard_kernel",
    "_prefill_kernel",
    "_decode_kernel",
]
MMA_KERNELS = {"_int8_mm_kernel", "_w4a8_kernel", "_wxa8_kernel", "_wo_gemm_kernel", "_prefill_kernel"}


def _compile_in_subprocess(kernel: str, tmp_path: Path) -> list[CompileResult]:
    out = tmp_path / f"{kernel}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "effalg.kernels.triton.aot", "report", "--kernel", kernel,
         "--manifest", str(MANIFEST), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    if not out.is_file():
        pytest.fail(f"AOT compile of {kernel} crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [CompileResult(**r) for r in json.loads(out.read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_sm80_and_sm90(kernel, tmp_path):
    results = _compile_in_subprocess(kernel, tmp_path)
    sources = {r.source for r in results}
    assert "production" in sources, f"no production launch of {kernel} was enumerated"
    assert {r.arch for r in results} == {80, 90}
    table = format_table(results)
    failed = [r for r in results if not r.ok]
    assert not failed, f"{len(failed)} of {len(results)} compiles of {kernel} failed:\n{table}"
    spills = [r for r in results if r.source == "production" and r.spills]
    assert not spills, f"register spills in production configurations of {kernel}:\n{table}"
    no_mma = [r for r in results if not r.mma_ok]
    assert not no_mma, f"{kernel}: PTX without the expected tensor-core instructions:\n{table}"
    if kernel in MMA_KERNELS:
        # The production GEMMs and attention run on tensor cores, and on sm_90 every tile of 64 rows or more gets
        # wgmma (Triton needs a warpgroup's 64 rows; the BLOCK_M = 16 / 32 decode tiles use mma.sync).
        prod = [r for r in results if r.source == "production" and r.expected_mma]
        assert prod and all(r.mma for r in prod)
        tall = [r for r in prod if r.arch == 90 and int(re.search(r"BLOCK_M=(\d+)", r.config).group(1)) >= 64]
        assert tall and all(r.wgmma for r in tall), f"{kernel}: sm_90 tiles of >= 64 rows without wgmma:\n{table}"


def test_manifest_entries_are_known_kernels():
    launches = load_manifest(MANIFEST)
    assert launches, "empty AOT manifest"
    assert {launch.short_name for launch in launches} <= set(KERNELS)
    assert len({launch.key for launch in launches}) == len(launches)


def test_expected_mma_follows_the_operand_type():
    def mk(name, **cx):
        return Launch(f"m:{name}", (("x", "*bf16", 16),), tuple(cx.items()), 4, 3)

    assert expected_mma(mk("_int8_mm_kernel")) == "int8"
    assert expected_mma(mk("_w4a8_kernel")) == "int8"
    assert expected_mma(mk("_wxa8_kernel", W_BITS=2)) == "int8"
    assert expected_mma(mk("_wo_gemm_kernel", DOT_DTYPE="tl.bf16")) == "bf16"
    assert expected_mma(mk("_prefill_kernel", DOT_DTYPE="tl.fp16")) == "fp16"
    assert expected_mma(mk("_prefill_kernel", DOT_DTYPE="tl.fp32", INPUT_PRECISION="ieee")) is None
    assert expected_mma(mk("_quantize_kernel")) is None


def test_launch_description_roundtrips_through_json():
    import torch

    from effalg.kernels.triton.int8_mm import _int8_mm_kernel

    a = torch.zeros(4, 64, dtype=torch.int8)
    launch = describe(
        _int8_mm_kernel,
        (a, torch.ones(4), a, torch.ones(4), torch.ones(4), torch.empty(4, 4), 4, 4, 64, 64, 64, 4),
        dict(HAS_BIAS=True, OUT_DTYPE=__import__("triton.language").language.bfloat16, BLOCK_M=16, BLOCK_N=16,
             BLOCK_K=32, GROUP_M=8),
        num_warps=4,
        num_stages=2,
    )  # fmt: skip
    assert dict(launch.constexprs)["OUT_DTYPE"] == "tl.bf16"
    assert ("a_ptr", "*i8", 16) in launch.signature and ("M", "i32", 1) in launch.signature
    assert Launch.from_json(json.loads(json.dumps(launch.to_json()))) == launch
