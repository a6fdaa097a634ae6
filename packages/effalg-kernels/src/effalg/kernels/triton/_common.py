"""Shared helpers for the Triton kernels (block-size choice, launch configs, rounding)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Smallest K tile ``tl.dot`` accepts on GPUs; smaller tiles only run under the interpreter.
MIN_DOT_K = 16

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype: torch.dtype):
    """Triton dtype for a float torch dtype."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"triton kernels: unsupported float dtype {dtype}") from None


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is ``<= cap`` (``n > 0``)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def gemm_blocks(M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """Default ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` for a GPU GEMM, from the problem shape."""
    if M <= 16:
        return 16, 64, 128, 4, 4
    if M <= 64:
        return 64, 64, 128, 4, 4
    if M <= 256 or N <= 1024:
        return 64, 128, 64, 4, 4
    return 128, 128, 64, 8, 3


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
