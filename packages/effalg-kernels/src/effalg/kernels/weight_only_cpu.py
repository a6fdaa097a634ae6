"""Fast CPU weight-only linear (W3 / W4 decode and prefill) and the CPU runtime layouts of weight-only weights.

``effalg::weight_only_linear`` on CPU (canonical serialized layout, :func:`weight_only_linear_cpu`) and
``effalg::weight_only_linear_packed`` (runtime layouts made by :func:`prepack_weight_only`, used by prepacked
``WeightOnlyLinear`` modules) run native kernels from ``csrc/weight_only_cpu.cpp``, JIT-built with
``torch.utils.cpp_extension`` at first use and cached (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
Where it cannot be built (no C++ compiler / ninja) a warning is logged once and the pure-PyTorch path runs:
dequantize the weight in fp32, round it to the activation dtype, ``F.linear``.

Native paths (AVX-512 VBMI + BF16 kernels where the CPU has them, portable C++ loops otherwise):

* canonical layout (the default, also for prepacked modules): a fused GEMV / small-M GEMM for ``M <= GEMV_MAX_M``
  rows, above that per-thread dequantized tiles of output channels (kept in cache; one lookup table per row and group)
  multiplied by the library's bf16 GEMM;
* ``"blocked"`` layout (opt-in, 3/4-bit, native only): channels in blocks of 16, each k-pair's 32 codes packed as
  one 3/4-bit chunk, so that one expanded chunk is a vector of 16 channels x 2 bf16 weights; a fused kernel (register
  tiles of up to 4 x 16 channels x 12 tokens, faster than the canonical one from 2 to ``FUSED_MAX_M`` tokens) for
  ``M <= FUSED_MAX_M``, dequantized K-major tiles above (slower than the canonical tiles);
* ``"int4pack"`` layout (4-bit, chosen where the native fast kernels are unavailable): torch's
  ``aten::_weight_int4pack_mm_for_cpu`` with effalg's asymmetric groups mapped exactly onto torch's convention
  ``W = (q - 8) * scale + zero_t``: ``zero_t = (8 - zero) * scale`` (scales and zeros in the activation dtype).

Environment: ``EFFALG_CPU_WEIGHT_ONLY_NATIVE=0`` forces the pure-PyTorch path (no build);
``EFFALG_CPU_WEIGHT_ONLY_PORTABLE=1`` forces the portable native loops (testing);
``EFFALG_CPU_WEIGHT_ONLY_LAYOUT=canonical|blocked|int4pack`` overrides the layout :func:`weight_only_cpu_layout`
picks (``canonical``: do not prepack).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .packing import pack_bits, packed_size, unpack_bits
from .reference import weight_only_linear_ref

logger = logging.getLogger(__name__)

__all__ = [
    "FUSED_MAX_M",
    "GEMV_MAX_M",
    "PACKED_LAYOUTS",
    "blocked_layout_ok",
    "native_available",
    "prepack_weight_only",
    "register",
    "unpack_weight_only",
    "weight_only_cpu_layout",
    "weight_only_linear_cpu",
    "weight_only_linear_packed",
    "weight_only_linear_torch",
]

#: Runtime layouts of :func:`prepack_weight_only`.
PACKED_LAYOUTS = ("blocked", "int4pack")
#: Canonical layout: rows (tokens) up to which the fused GEMV runs; dequantized tiles + GEMM above (measured
#: crossover on an AVX-512 CPU, one thread: 16-24 rows).
GEMV_MAX_M = 20
#: Blocked layout: rows up to which the fused kernel runs; dequantized tiles + GEMM above (crossover: 48-64 rows).
FUSED_MAX_M = 48
#: Bytes of one dequantized tile of output channels (per thread; 256 channels of K = 4096 in bf16).
TILE_BYTES = 2 << 20

_SRC = Path(__file__).with_name("csrc") / "weight_only_cpu.cpp"
_EXT_NAME = "effalg_weight_only_cpu_v1"
_lock = threading.Lock()
_native: Optional[bool] = None  # None: not tried yet


def _env_flag(name: str) -> Optional[bool]:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    return v.strip().lower() not in ("0", "false", "no", "off")


def native_available() -> bool:
    """Whether the native kernels are usable (built on first call; ``EFFALG_CPU_WEIGHT_ONLY_NATIVE=0``: never)."""
    global _native
    if _env_flag("EFFALG_CPU_WEIGHT_ONLY_NATIVE") is False:
        return False
    if _native is None:
        with _lock:
            if _native is None:
                _native = _build()
    return _native


#: A build lock older than this was left by a killed build (a build takes about a minute); torch would wait on it
#: forever.
STALE_LOCK_S = 600


def _clear_stale_lock() -> None:
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private; guarded

        lock = Path(_get_build_directory(_EXT_NAME, False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            logger.warning("effalg: removing the stale build lock %s (left by a killed build)", lock)
            lock.unlink(missing_ok=True)
    except Exception:  # no private helper in this torch, permissions, ...: torch's own locking applies
        pass


def _build() -> bool:
    try:
        from torch.utils import cpp_extension

        _clear_stale_lock()

        flags = [] if os.name == "nt" else ["-O3", "-fopenmp"]
        logger.info("effalg: loading the native CPU weight-only kernels (built once, cached by torch)")
        cpp_extension.load(
            name=_EXT_NAME,
            sources=[str(_SRC)],
            extra_cflags=flags,
            extra_ldflags=[] if os.name == "nt" else ["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        torch.ops.effalg_wo_native.fast_available()
        return True
    except Exception as e:  # no compiler, no ninja, read-only cache, ...: stay correct, just slower
        logger.warning(
            "effalg: native CPU weight-only kernels unavailable (%s: %s); W3/W4 weight-only linears use the "
            "PyTorch path (dequantize + F.linear), and 4-bit modules torch's int4pack kernel where possible",
            type(e).__name__,
            str(e).strip().splitlines()[-1] if str(e).strip() else "",
        )
        return False


def _native_ops():
    return torch.ops.effalg_wo_native


def _portable() -> bool:
    return bool(_env_flag("EFFALG_CPU_WEIGHT_ONLY_PORTABLE"))


def _fast_isa() -> bool:
    return native_available() and not _portable() and bool(_native_ops().fast_available())


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _tile(K: int, dtype: torch.dtype, unit: int) -> int:
    """Output channels per dequantized tile: about ``TILE_BYTES`` (at most 256 channels; measured best from 16 to 512
    tokens), a multiple of ``unit``."""
    per = K * torch.empty((), dtype=dtype).element_size()
    return max(unit, min(256, TILE_BYTES // max(per, 1)) // unit * unit)


# ---------------------------------------------------------------------------------------------------- canonical


def weight_only_linear_torch(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """The pure-PyTorch path: the whole weight dequantized in fp32 (``(u - zero) * scale``), rounded to x's dtype,
    ``F.linear``."""
    K = x.shape[-1]
    N = w.shape[0]
    gs = K if group_size == 0 else group_size
    G = K // gs
    u = unpack_bits(w, bits, K).reshape(N, G, gs).to(torch.float32)
    W = (u - zero.reshape(N, G, 1).float()).mul_(scale.reshape(N, G, 1).float()).reshape(N, K).to(x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


def weight_only_linear_cpu(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """CPU kernel of ``effalg::weight_only_linear`` (canonical layout): native fused GEMV for ``M <= GEMV_MAX_M``,
    native dequantized tiles + GEMM above, the PyTorch path where the native kernels are unavailable."""
    if not native_available():
        return weight_only_linear_torch(x, w, scale, zero, bits, group_size, bias)
    K = x.shape[-1]
    N = w.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    ops = _native_ops()
    s, z, wc = _f32(scale), _f32(zero), w.contiguous()
    if M <= GEMV_MAX_M:
        y = ops.gemv(x2, wc, s, z, bias, bits, _portable())
    else:
        y = ops.dequant_linear(x2, wc, s, z, bias, bits, _tile(K, x.dtype, 16), _portable())
    return y.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------------- layouts


def _blocked_numel(N: int, K: int, bits: int) -> int:
    return -(-N // 16) * -(-K // 2) * 4 * bits + 16


def _to_blocked_torch(w: torch.Tensor, bits: int, N: int, K: int) -> torch.Tensor:
    """Canonical -> ``"blocked"`` with PyTorch ops (reference of the native conversion)."""
    NB, KP = -(-N // 16), -(-K // 2)
    codes = torch.zeros(NB * 16, 2 * KP, dtype=torch.uint8)
    codes[:N, :K] = unpack_bits(w, bits, K)
    chunks = codes.reshape(NB, 16, KP, 2).permute(0, 2, 1, 3).reshape(NB, KP, 32)
    packed = pack_bits(chunks.contiguous(), bits).reshape(-1)
    return torch.cat([packed, torch.zeros(16, dtype=torch.uint8)])


def _from_blocked_torch(wb: torch.Tensor, bits: int, N: int, K: int) -> torch.Tensor:
    NB, KP = -(-N // 16), -(-K // 2)
    chunks = unpack_bits(wb[: NB * KP * 4 * bits].reshape(NB, KP, 4 * bits), bits, 32)
    codes = chunks.reshape(NB, KP, 16, 2).permute(0, 2, 1, 3).reshape(NB * 16, 2 * KP)[:N, :K]
    return pack_bits(codes.contiguous(), bits)


_INT4PACK_GROUPS = (32, 64, 128, 256)
_int4pack_ok: Optional[bool] = None


def _int4pack_supported() -> bool:
    """Whether torch's CPU int4pack kernels exist and their layout is the one :func:`_from_int4pack` inverts."""
    global _int4pack_ok
    if _int4pack_ok is None:
        try:
            g = torch.Generator().manual_seed(0)
            codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=g)
            packed = _to_int4pack(pack_bits(codes, 4), 128, 64)
            _int4pack_ok = torch.equal(unpack_bits(_from_int4pack(packed, 128, 64), 4, 64), codes)
        except Exception:  # older / newer torch without the op or with another layout
            _int4pack_ok = False
    return _int4pack_ok


def _to_int4pack(w: torch.Tensor, N: int, K: int) -> torch.Tensor:
    q = unpack_bits(w, 4, K).to(torch.int32).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)


def _from_int4pack(wp: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """torch's CPU int4pack (``N % 64 == 0``: blocks of 64 channels, K-major, byte j of a k row = channel j in the
    low nibble, channel j + 32 in the high nibble) -> canonical."""
    p = wp.reshape(N // 64, K, 32)
    codes = torch.cat([p & 15, p >> 4], dim=-1).permute(0, 2, 1).reshape(N, K)
    return pack_bits(codes.contiguous(), 4)


def weight_only_cpu_layout(bits: int, out_features: int, in_features: int, group_size: int) -> Optional[str]:
    """The runtime layout ``WeightOnlyLinear.prepack_()`` uses for such a weight on this machine, or None (keep the
    canonical layout).

    With the native AVX-512 VBMI/BF16 kernels: None. The canonical kernels are the fast path over the whole range of
    tokens (decode GEMV, fused small-M GEMM up to ``GEMV_MAX_M``, dequantized tiles + GEMM above); ``"blocked"``
    (3/4-bit, even group size) is faster from 2 to ``FUSED_MAX_M`` tokens (batched decode) but its prefill tiles cost
    more than the canonical ones, so it is opt-in (``prepack_(layout="blocked")`` or the environment variable).
    Without them: ``"int4pack"`` for 4-bit weights (``N % 64 == 0``, even K, group size in 32/64/128/256: torch's own
    int4 kernel), else None. ``EFFALG_CPU_WEIGHT_ONLY_LAYOUT=canonical|blocked|int4pack`` overrides the choice (a layout
    this weight or machine cannot use gives None)."""
    N, K = out_features, in_features
    gs = K if group_size == 0 else group_size
    forced = os.environ.get("EFFALG_CPU_WEIGHT_ONLY_LAYOUT", "").strip().lower() or None
    if forced not in (None, "canonical", "blocked", "int4pack"):
        raise ValueError(f"EFFALG_CPU_WEIGHT_ONLY_LAYOUT must be canonical, blocked or int4pack, got {forced!r}")
    if forced == "canonical":
        return None
    if forced == "blocked":
        return "blocked" if blocked_layout_ok(bits, K, group_size) else None
    int4_ok = bits == 4 and N % 64 == 0 and K % 2 == 0 and gs in _INT4PACK_GROUPS and _int4pack_supported()
    if forced == "int4pack":
        return "int4pack" if int4_ok else None
    if native_available() and _fast_isa():
        return None
    return "int4pack" if int4_ok else None


def blocked_layout_ok(bits: int, in_features: int, group_size: int) -> bool:
    """Whether the ``"blocked"`` layout can hold such a weight here (3/4-bit, even group size or one group, native
    kernels built)."""
    gs = in_features if group_size == 0 else group_size
    return bits in (3, 4) and (gs == in_features or gs % 2 == 0) and native_available()


def prepack_weight_only(w: torch.Tensor, layout: str, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Canonical ``uint8[N, ceil(K * bits / 8)]`` -> the CPU runtime ``layout`` (see :func:`weight_only_cpu_layout`).
    Exact and invertible (:func:`unpack_weight_only`)."""
    N, K = out_features, in_features
    _check_canonical("prepack_weight_only", w, bits, N, K)
    w = w.contiguous()
    if layout == "blocked":
        if bits not in (3, 4):
            raise ValueError(f"prepack_weight_only: the blocked layout holds 3/4-bit codes, got bits={bits}")
        if native_available():
            return _native_ops().to_blocked(w, bits, K)
        return _to_blocked_torch(w, bits, N, K)
    if layout == "int4pack":
        if bits != 4 or N % 64 or K % 2:
            raise ValueError(f"prepack_weight_only: int4pack needs bits=4, N % 64 == 0, even K; got {bits}, {N}, {K}")
        return _to_int4pack(w, N, K)
    raise ValueError(f"prepack_weight_only: layout must be one of {PACKED_LAYOUTS}, got {layout!r}")


def unpack_weight_only(wp: torch.Tensor, layout: str, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`prepack_weight_only`: the canonical ``uint8[N, ceil(K * bits / 8)]`` (bit-identical)."""
    N, K = out_features, in_features
    if layout == "blocked":
        if wp.numel() != _blocked_numel(N, K, bits):
            raise ValueError(f"unpack_weight_only: not a blocked [{N}, {K}] {bits}-bit weight ({wp.numel()} bytes)")
        if native_available():
            return _native_ops().from_blocked(wp.contiguous(), bits, N, K)
        return _from_blocked_torch(wp, bits, N, K)
    if layout == "int4pack":
        return _from_int4pack(wp, N, K)
    raise ValueError(f"unpack_weight_only: layout must be one of {PACKED_LAYOUTS}, got {layout!r}")


def _check_canonical(fn: str, w: torch.Tensor, bits: int, N: int, K: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or w.dim() != 2:
        raise TypeError(f"{fn}: w must be a uint8 [N, ceil(K * bits / 8)] tensor")
    if tuple(w.shape) != (N, packed_size(K, bits)):
        raise ValueError(f"{fn}: w must have shape ({N}, {packed_size(K, bits)}), got {tuple(w.shape)}")
    if w.device.type != "cpu":
        raise ValueError(f"{fn}: the packed layouts are CPU layouts, got w on {w.device}")


# ----------------------------------------------------------------------------------------------- packed op

_SZ_CACHE: dict = {}


def _int4pack_scales_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch's ``scales_and_zeros[G, N, 2]`` for effalg's groups: ``W = (u - zero) * scale = (u - 8) * scale +
    (8 - zero) * scale`` (computed in fp32, then cast to the activation dtype the kernel requires). Cached while
    ``scale`` and ``zero`` live and are not modified."""
    key = (id(scale), id(zero), scale._version, zero._version, dtype)
    hit = _SZ_CACHE.get(key)
    if hit is not None and hit[0]() is scale and hit[1]() is zero:
        return hit[2]
    s, z = scale.float(), zero.float()
    sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)
    if len(_SZ_CACHE) >= 4096:
        _SZ_CACHE.clear()
    drop = lambda _, k=key: _SZ_CACHE.pop(k, None)  # noqa: E731
    _SZ_CACHE[key] = (weakref.ref(scale, drop), weakref.ref(zero, drop), sz)
    return sz


def _int4pack_linear(x2, wp, scale, zero, group_size, bias):
    K = x2.shape[-1]
    gs = K if group_size == 0 else group_size
    sz = _int4pack_scales_zeros(scale, zero, x2.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, wp, gs, sz)
    return y if bias is None else y.add_(bias.to(y.dtype))


@torch.library.custom_op("effalg::weight_only_linear_packed", mutates_args=())
def _weight_only_linear_packed_op(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    layout: str,
    out_features: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    # Meaning (any device): the canonical weight_only_linear of the unpacked weight.
    wc = unpack_weight_only(w.cpu(), layout, bits, out_features, x.shape[-1]).to(x.device)
    return weight_only_linear_ref(x, wc, scale, zero, bits, group_size, bias)


@_weight_only_linear_packed_op.register_fake
def _(x, w, scale, zero, bits, group_size, layout, out_features, bias):
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)


def _packed_cpu(x, w, scale, zero, bits, group_size, layout, out_features, bias):
    K = x.shape[-1]
    N = out_features
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    if layout == "int4pack":
        y = _int4pack_linear(x2, w, scale, zero, group_size, bias)
    elif native_available():
        ops = _native_ops()
        s, z = _f32(scale), _f32(zero)
        if M <= FUSED_MAX_M:
            y = ops.blocked_linear(x2, w, s, z, bias, bits, N, _portable())
        else:
            tile = _tile(K, x.dtype, 64) // 16
            y = ops.blocked_dequant_linear(x2, w, s, z, bias, bits, N, tile, _portable())
    else:  # a blocked weight made by PyTorch ops, or native kernels switched off after prepacking
        wc = _from_blocked_torch(w, bits, N, K)
        y = weight_only_linear_torch(x2, wc, scale, zero, bits, group_size, bias)
    return y.reshape(*x.shape[:-1], N)


torch.library.register_kernel("effalg::weight_only_linear_packed", "cpu", _packed_cpu)


def weight_only_linear_packed(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    layout: str,
    out_features: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`effalg.kernels.weight_only_linear` with the weight in a CPU runtime ``layout`` made by
    :func:`prepack_weight_only` (same result up to the kernels' rounding; ``scale`` / ``zero`` stay ``[N, G]``)."""
    from .ops import WEIGHT_ONLY_BITS, _check_bias, _check_group, _same_device, _tensor

    fn = "weight_only_linear_packed"
    if layout not in PACKED_LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {PACKED_LAYOUTS}, got {layout!r}")
    if isinstance(bits, bool) or bits not in WEIGHT_ONLY_BITS:
        raise ValueError(f"{fn}: bits must be one of {WEIGHT_ONLY_BITS}, got {bits!r}")
    _tensor(fn, "x", x, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    _tensor(fn, "w", w, dtypes=(torch.uint8,))
    K = int(x.shape[-1]) if x.dim() else 0
    N = int(out_features)
    if K == 0 or N <= 0:
        raise ValueError(f"{fn}: x must have a non-empty last dim and out_features must be positive")
    want = _blocked_numel(N, K, bits) if layout == "blocked" else N * K // 2
    if w.numel() != want:
        raise ValueError(f"{fn}: w is not a {layout} [{N}, {K}] {bits}-bit weight ({w.numel()} elements, want {want})")
    G = _check_group(fn, K, group_size)
    for name, t in (("scale", scale), ("zero", zero)):
        _tensor(fn, name, t, dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if tuple(t.shape) != (N, G):
            raise ValueError(
                f"{fn}: {name} must have shape ({N}, {G}) for group_size={group_size}, got {tuple(t.shape)}"
            )
    _check_bias(fn, bias, N)
    _same_device(fn, x, w=w, scale=scale, zero=zero, bias=bias)
    return torch.ops.effalg.weight_only_linear_packed(x, w, scale, zero, bits, group_size, layout, N, bias)


_REGISTERED = False


def register() -> None:
    """Register :func:`weight_only_linear_cpu` as the CPU kernel of ``effalg::weight_only_linear`` (idempotent; run
    after :func:`effalg.kernels.cpu.register`, whose dequantize + ``F.linear`` kernel it replaces). The packed op's CPU
    kernel is registered at import."""
    global _REGISTERED
    if not _REGISTERED:
        torch.library.register_kernel("effalg::weight_only_linear", "cpu", weight_only_linear_cpu)
        _REGISTERED = True
