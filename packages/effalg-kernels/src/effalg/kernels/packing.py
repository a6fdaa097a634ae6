"""Bit-packing layouts for low-bit weight codes.

Layout (shared with the Triton kernels and the serialized format): codes are packed along the last dim as a
little-endian bit stream. Code ``k`` occupies bits ``[k * bits, (k + 1) * bits)`` of the stream, and byte ``b`` of
the output holds stream bits ``[8 * b, 8 * b + 8)`` (bit 0 = least significant bit). Hence:

* 8 bits: identity; 4 bits: two codes per byte, low nibble = even ``k``; 2 bits: four codes per byte, code
  ``k`` at bits ``2 * (k % 4)``;
* 3 bits: eight codes in three bytes (a 24-bit little-endian word, code ``j`` at bits ``3 * j``); ``K`` is
  padded with zero codes to a multiple of 8, and the trailing all-zero padding bytes are dropped.

The packed length is always ``ceil(K * bits / 8)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SUPPORTED_BITS",
    "packed_size",
    "pack_bits",
    "unpack_bits",
    "pack_int4_symmetric",
    "unpack_int4_symmetric",
    "pack_int2_symmetric",
    "unpack_int2_symmetric",
]

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int, fn: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{fn}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def packed_size(K: int, bits: int) -> int:
    """Number of bytes holding ``K`` codes of ``bits`` bits: ``ceil(K * bits / 8)``."""
    _check_bits(bits, "packed_size")
    return (K * bits + 7) // 8


def _group(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte group: 2 -> (4, 1), 3 -> (8, 3), 4 -> (2, 1), 8 -> (1, 1)."""
    lcm = bits * 8 // math.gcd(bits, 8)
    return lcm // bits, lcm // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8[..., K]`` codes (each ``< 2**bits``) into ``uint8[..., ceil(K * bits / 8)]``."""
    _check_bits(bits, "pack_bits")
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"pack_bits: codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_bits: codes must be uint8, got {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("pack_bits: codes must have at least 1 dim")
    if codes.numel() and bits < 8 and int(codes.max()) >= (1 << bits):
        raise ValueError(f"pack_bits: codes must be < 2**{bits} = {1 << bits}, got max {int(codes.max())}")
    if bits == 8:
        return codes.contiguous().clone()
    K = codes.shape[-1]
    lead = codes.shape[:-1]
    n_codes, n_bytes = _group(bits)
    n_groups = (K + n_codes - 1) // n_codes
    pad = n_groups * n_codes - K
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    out_len = (K * bits + 7) // 8
    if n_bytes == 1:  # 2 or 4 bits: OR the shifted codes of each byte together, in uint8
        c = codes.reshape(*lead, n_groups, n_codes)
        out = c[..., 0].clone()
        for j in range(1, n_codes):
            out |= c[..., j] << (bits * j)
        return out[..., :out_len].contiguous()
    # 3 bits: build 24-bit words in int32, then split them into 3 little-endian bytes.
    c = codes.reshape(*lead, n_groups, n_codes).to(torch.int32)
    shifts = torch.arange(n_codes, device=codes.device, dtype=torch.int32) * bits
    word = (c << shifts).sum(-1, dtype=torch.int32)  # disjoint bit fields: sum == bitwise or
    byte_shifts = torch.arange(n_bytes, device=codes.device, dtype=torch.int32) * 8
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, n_groups * n_bytes)
    return out[..., :out_len].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8[..., ceil(K * bits / 8)]`` -> ``uint8[..., K]`` codes."""
    _check_bits(bits, "unpack_bits")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"unpack_bits: packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits: packed must be uint8, got {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("unpack_bits: packed must have at least 1 dim")
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"unpack_bits: K must be a non-negative int, got {K!r}")
    expected = (K * bits + 7) // 8
    if packed.shape[-1] != expected:
        raise ValueError(
            f"unpack_bits: packed last dim must be ceil(K * bits / 8) = {expected} for K={K}, bits={bits}, "
            f"got {packed.shape[-1]}"
        )
    if bits == 8:
        return packed.contiguous().clone()
    lead = packed.shape[:-1]
    n_codes, n_bytes = _group(bits)
    n_groups = (K + n_codes - 1) // n_codes
    mask = (1 << bits) - 1
    if n_bytes == 1:  # 2 or 4 bits, in uint8
        fields = [packed & mask] + [(packed >> (bits * j)) & mask for j in range(1, n_codes)]
        codes = torch.stack(fields, dim=-1).reshape(*lead, n_groups * n_codes)
        return codes[..., :K].contiguous()
    pad = n_groups * n_bytes - packed.shape[-1]
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    b = packed.reshape(*lead, n_groups, n_bytes).to(torch.int32)
    byte_shifts = torch.arange(n_bytes, device=packed.device, dtype=torch.int32) * 8
    word = (b << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(n_codes, device=packed.device, dtype=torch.int32) * bits
    codes = ((word.unsqueeze(-1) >> shifts) & mask).to(torch.uint8).reshape(*lead, n_groups * n_codes)
    return codes[..., :K].contiguous()


def pack_int4_symmetric(q: torch.Tensor) -> torch.Tensor:
    """Pack symmetric int4 values ``int8[..., K]`` in ``[-8, 7]`` as codes ``u = q + 8`` (4-bit layout)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"pack_int4_symmetric: q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4_symmetric: q must be int8, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4_symmetric: q must be in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    return pack_bits((q + 8).to(torch.uint8), 4)


def unpack_int4_symmetric(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_symmetric`: ``uint8[..., ceil(K / 2)]`` -> ``int8[..., K]`` in ``[-8, 7]``."""
    u = unpack_bits(packed, 4, K)
    return u.view(torch.int8).sub_(8)  # codes < 16, so the int8 view reads the same values


def pack_int2_symmetric(q: torch.Tensor) -> torch.Tensor:
    """Pack symmetric int2 values ``int8[..., K]`` in ``[-2, 1]`` as codes ``u = q + 2`` (2-bit layout: four per
    byte, code ``k`` at bits ``2 * (k % 4)``)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"pack_int2_symmetric: q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int2_symmetric: q must be int8, got {q.dtype}")
    if q.numel() and (int(q.min()) < -2 or int(q.max()) > 1):
        raise ValueError(f"pack_int2_symmetric: q must be in [-2, 1], got [{int(q.min())}, {int(q.max())}]")
    return pack_bits((q + 2).to(torch.uint8), 2)


def unpack_int2_symmetric(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_int2_symmetric`: ``uint8[..., ceil(K / 4)]`` -> ``int8[..., K]`` in ``[-2, 1]``."""
    u = unpack_bits(packed, 2, K)
    return u.view(torch.int8).sub_(2)
