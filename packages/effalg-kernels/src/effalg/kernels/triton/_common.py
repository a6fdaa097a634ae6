"""Shared helpers for the Triton kernels (block-size choice, launch configs, rounding)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_gpu

#: Smallest K tile ``tl.dot`` accepts on NVIDIA GPUs, by operand width in bits (Triton's ``min_dot_size``): int8
#: needs 32, fp16/bf16 16, fp32 (TF32 or IEEE) 8. The interpreter accepts smaller tiles; launchers reject them.
MIN_DOT_K_BY_BITS = {8: 32, 16: 16, 32: 8}
#: The K-tile floor of the int8 GEMMs (int8 x int8 -> int32 ``tl.dot``).
MIN_INT8_DOT_K = MIN_DOT_K_BY_BITS[8]

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype: torch.dtype):
    """Triton dtype for a float torch dtype."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"triton kernels: unsupported float dtype {dtype}") from None


def min_dot_k(dtype: torch.dtype) -> int:
    """Smallest K tile of a ``tl.dot`` on ``dtype`` operands that compiles for sm_80 / sm_90."""
    return MIN_DOT_K_BY_BITS[dtype.itemsize * 8]


def dot_config(x: torch.Tensor):
    """``(DOT_DTYPE, INPUT_PRECISION)`` of a float ``tl.dot`` on ``x``'s dtype: IEEE fp32 dots for fp32 inputs (exact,
    no TF32); fp16/bf16 on tensor cores; bf16 in fp32 under the interpreter (its bf16 ``tl.dot`` is wrong)."""
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not on_gpu(x)):
        return tl.float32, "ieee"
    return tl_dtype(x.dtype), "tf32"


def check_dot_k(op: str, block_k: int, dtype: torch.dtype, name: str = "block_k") -> None:
    """Raise if the K tile ``block_k`` (argument ``name``) is not a power of two of at least :func:`min_dot_k`."""
    floor = min_dot_k(dtype)
    if block_k < floor or block_k & (block_k - 1):
        raise ValueError(
            f"{op}: {name}={block_k} must be a power of two >= {floor} for {dtype} tl.dot on GPUs "
            "(the interpreter accepts smaller tiles, sm_80/sm_90 do not)"
        )


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is ``<= cap`` (``n > 0``)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


# GPU tile configurations ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``, one table per GEMM kernel. Each was
# chosen from the AOT report (``python -m effalg.kernels.triton.aot report``): it compiles for sm_80 and sm_90 with no
# register spills, and the BLOCK_M >= 64 tiles get wgmma on sm_90. tests/kernels/test_triton_aot.py keeps them so.


def gemm_blocks(M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """Tiles of the int8 x int8 GEMM (``int8_scaled_mm`` / ``w8a8_linear``) for an ``[M, K] x [K, N]`` problem."""
    if M <= 16:
        return 16, 64, 128, 4, 4
    if M <= 256 or N <= 1024:
        return 64, 128, 64, 8, 3
    return 128, 128, 32, 8, 3


def w4a8_gemm_blocks(M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """Tiles of the int4-weight x int8-activation GEMM (the nibble unpack costs registers: at most 64 x 128)."""
    if M <= 16:
        return 16, 64, 128, 4, 4
    return 64, 128, 64, 8, 3


def weight_only_gemm_blocks(M: int, N: int, K: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """Tiles of the weight-only GEMM: fp16/bf16 run on tensor cores; fp32 (IEEE FMA dots) needs small tiles."""
    if dtype == torch.float32:
        return 32, 32, 32, 8, 3
    if M <= 32:
        return 32, 128, 64, 8, 3
    return 64, 128, 32, 8, 3


@triton.jit
def round_half_even(v):
    """``rint`` for fp32 ``|v| < 2**22``: adding and subtracting ``1.5 * 2**23`` rounds half to even exactly."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n), walking GROUP_M row-tiles at a time for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
