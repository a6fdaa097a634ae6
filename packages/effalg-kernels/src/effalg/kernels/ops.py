"""Public, validating entry points to the ``effalg`` ops.

Arguments are checked once here (dtype, shape, bit width, group size, device, the int32 accumulation limit) and a
``ValueError`` / ``TypeError`` names the argument at fault; then ``torch.ops.effalg.<op>`` runs the implementation
for the inputs' device. The checks read only static properties, so they trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops  # noqa: F401  (declares torch.ops.effalg.*)
from .packing import packed_size
from .reference import quantize_groups

__all__ = [
    "MAX_INT8_K",
    "WEIGHT_ONLY_BITS",
    "quantize_per_token",
    "int8_scaled_mm",
    "w8a8_linear",
    "w4a8_linear",
    "weight_only_linear",
    "WXA8_BITS",
    "MAX_INT8_ZP_K",
    "weight_rowsum",
    "wxa8_linear",
    "prepack_int8_weight",
    "unpack_int8_weight",
    "MAX_HADAMARD_BLOCK",
    "hadamard_block_size",
    "smooth_hadamard",
]

#: Largest reduction length for which int8 x int8 products (|p| <= 128 * 128) cannot overflow an int32 accumulator.
MAX_INT8_K = (2**31 - 1) // (128 * 128)  # 131071

#: Bit widths of the weight-only GEMM.
WEIGHT_ONLY_BITS = (3, 4, 8)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _tensor(fn: str, name: str, t, *, dtypes=None, ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{fn}: {name} must have dtype in ({allowed}), got {str(t.dtype).removeprefix('torch.')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _same_device(fn: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the input is on {ref.device}")


def _check_k(fn: str, K: int) -> None:
    if K > MAX_INT8_K:
        raise ValueError(
            f"{fn}: reduction length K={K} exceeds MAX_INT8_K={MAX_INT8_K}; int8 x int8 products summed in int32 "
            "could overflow"
        )


def _check_bias(fn: str, bias, N: int) -> None:
    if bias is None:
        return
    _tensor(fn, "bias", bias, dtypes=_FLOATS)
    if tuple(bias.shape) != (N,):
        raise ValueError(f"{fn}: bias must have shape ({N},), got {tuple(bias.shape)}")


def _check_group(fn: str, K: int, group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"{fn}: group_size must be a non-negative int (0 = per channel), got {group_size!r}")
    if group_size and K % group_size:
        raise ValueError(f"{fn}: group_size={group_size} must divide the input features K={K}")
    return 1 if group_size == 0 else K // group_size


def _check_int8_weight(fn: str, w, N: int, K: int) -> None:
    """``w`` is int8 ``[N, K]`` (plain) or oneDNN-prepacked ``[K, N]``.

    Under ``torch.compile`` a prepacked weight is traced as a strided ``[K, N]`` tensor, so both shapes pass there.
    """
    _tensor(fn, "w", w, dtypes=(torch.int8,), ndim=2)
    shape = tuple(w.shape)
    if w.layout == torch._mkldnn:
        ok = shape == (K, N)
    elif torch.compiler.is_compiling():
        ok = shape in ((N, K), (K, N))
    else:
        ok = shape == (N, K)
    if not ok:
        raise ValueError(f"{fn}: w must be int8 [N, K] = [{N}, {K}] (N from w_scale, K from the input), got {shape}")


def _check_w_scale(fn: str, w_scale) -> int:
    _tensor(fn, "w_scale", w_scale, dtypes=(torch.float32,), ndim=1)
    return int(w_scale.shape[0])


def quantize_per_token(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization of ``x[..., K]`` per token (or per group of ``group_size`` channels).

    Returns ``(q: int8[..., K], scale: float32[..., G])`` with ``x ~= q * scale``.
    """
    fn = "quantize_per_token"
    _tensor(fn, "x", x, dtypes=_FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    _check_group(fn, int(x.shape[-1]), group_size)
    return torch.ops.effalg.quantize_per_token(x, group_size)


def int8_scaled_mm(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a @ w.T) * a_scale * w_scale + bias`` for int8 ``a[M, K]`` and int8 ``w[N, K]`` (plain or prepacked).

    ``a_scale`` (``float32[M, 1]``) may be None: the per-token scale is then left to the caller.
    """
    fn = "int8_scaled_mm"
    _tensor(fn, "a", a, dtypes=(torch.int8,), ndim=2)
    K = int(a.shape[1])
    N = _check_w_scale(fn, w_scale)
    _check_int8_weight(fn, w, N, K)
    _check_k(fn, K)
    if a_scale is not None:
        _tensor(fn, "a_scale", a_scale, dtypes=(torch.float32,))
        if tuple(a_scale.shape) != (a.shape[0], 1):
            raise ValueError(f"{fn}: a_scale must have shape ({a.shape[0]}, 1), got {tuple(a_scale.shape)}")
    _check_bias(fn, bias, N)
    if out_dtype not in _FLOATS:
        raise TypeError(f"{fn}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    _same_device(fn, a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)
    return torch.ops.effalg.int8_scaled_mm(a, a_scale, w, w_scale, bias, out_dtype)


def w8a8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """W8A8 linear: dynamic per-token int8 ``x[..., K]`` times int8 ``w[N, K]`` (plain or prepacked), in x's dtype."""
    fn = "w8a8_linear"
    _tensor(fn, "x", x, dtypes=_FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    K = int(x.shape[-1])
    N = _check_w_scale(fn, w_scale)
    _check_int8_weight(fn, w, N, K)
    _check_k(fn, K)
    _check_bias(fn, bias, N)
    _same_device(fn, x, w=w, w_scale=w_scale, bias=bias)
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        # Under torch.compile on CPU the op is traced as its parts, so that inductor fuses the quantization with the
        # producer of x and the per-token scale + bias with the consumer of the output; only the GEMM stays opaque.
        x2 = x.reshape(-1, K)
        q, scale = quantize_groups(x2.reshape(x2.shape[0], 1, K))
        y = torch.ops.effalg.int8_scaled_mm(q.reshape(x2.shape), None, w, w_scale, None, x.dtype)
        y = y * scale.to(y.dtype) if bias is None else torch.addcmul(bias.to(y.dtype), y, scale.to(y.dtype))
        return y.reshape(*x.shape[:-1], N)
    return torch.ops.effalg.w8a8_linear(x, w, w_scale, bias)


def w4a8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int = 0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """W4A8 linear: int4 weights packed two per byte (``uint8[N, ceil(K/2)]``, codes ``q + 8``) with per-channel
    (``group_size=0``, ``w_scale[N, 1]``) or per-group (``w_scale[N, K // group_size]``) scales, times dynamic
    per-token int8 activations. Output in x's dtype."""
    fn = "w4a8_linear"
    _tensor(fn, "x", x, dtypes=_FLOATS)
    _tensor(fn, "w", w, dtypes=(torch.uint8,), ndim=2)
    K = int(x.shape[-1]) if x.dim() else 0
    N = int(w.shape[0])
    if K == 0 or w.shape[1] != packed_size(K, 4):
        raise ValueError(
            f"{fn}: w must have shape (N, ceil(K / 2)) = ({N}, {packed_size(max(K, 1), 4)}) for x with K={K}, "
            f"got {tuple(w.shape)}"
        )
    _check_k(fn, K)
    G = _check_group(fn, K, group_size)
    _tensor(fn, "w_scale", w_scale, dtypes=(torch.float32,))
    if tuple(w_scale.shape) != (N, G):
        raise ValueError(f"{fn}: w_scale must have shape ({N}, {G}) for group_size={group_size}, got {tuple(w_scale.shape)}")
    _check_bias(fn, bias, N)
    _same_device(fn, x, w=w, w_scale=w_scale, bias=bias)
    return torch.ops.effalg.w4a8_linear(x, w, w_scale, group_size, bias)


def weight_only_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int = 0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weight-only linear: float ``x[..., K]`` times ``bits``-bit packed weights ``uint8[N, ceil(K * bits / 8)]``
    dequantized as ``(u - zero) * scale`` per group (``scale``, ``zero``: float ``[N, G]``)."""
    fn = "weight_only_linear"
    if isinstance(bits, bool) or bits not in WEIGHT_ONLY_BITS:
        raise ValueError(f"{fn}: bits must be one of {WEIGHT_ONLY_BITS}, got {bits!r}")
    _tensor(fn, "x", x, dtypes=_FLOATS)
    _tensor(fn, "w", w, dtypes=(torch.uint8,), ndim=2)
    K = int(x.shape[-1]) if x.dim() else 0
    N = int(w.shape[0])
    if K == 0 or w.shape[1] != packed_size(K, bits):
        raise ValueError(
            f"{fn}: w must have shape (N, ceil(K * {bits} / 8)) = ({N}, {packed_size(max(K, 1), bits)}) for x with "
            f"K={K}, got {tuple(w.shape)}"
        )
    G = _check_group(fn, K, group_size)
    for name, t in (("scale", scale), ("zero", zero)):
        _tensor(fn, name, t, dtypes=_FLOATS)
        if tuple(t.shape) != (N, G):
            raise ValueError(f"{fn}: {name} must have shape ({N}, {G}) for group_size={group_size}, got {tuple(t.shape)}")
    _check_bias(fn, bias, N)
    _same_device(fn, x, w=w, scale=scale, zero=zero, bias=bias)
    return torch.ops.effalg.weight_only_linear(x, w, scale, zero, bits, group_size, bias)


#: Weight bit widths of :func:`wxa8_linear`.
WXA8_BITS = (2, 4, 8)

#: Largest K for static activations with a zero point: ``|qa - a_zero| <= 255`` times ``|qw| <= 128`` summed in int32.
MAX_INT8_ZP_K = (2**31 - 1) // (255 * 128)  # 65793


def weight_rowsum(q_w: torch.Tensor) -> torch.Tensor:
    """``int32[N]`` row sums ``sum_k q_w[n, k]`` of int8 weight codes ``q_w[N, K]`` (the ``w_rowsum`` of
    :func:`wxa8_linear`, folding the activation zero point into the epilogue)."""
    _tensor("weight_rowsum", "q_w", q_w, dtypes=(torch.int8,), ndim=2)
    return q_w.sum(dim=1, dtype=torch.int32)


def wxa8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_bits: int,
    a_scale: Optional[torch.Tensor] = None,
    a_zero: Optional[torch.Tensor] = None,
    w_rowsum: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MixDQ W8A8 / W4A8 / W2A8 linear (int8 x int8 GEMM, int32 accumulation), output in x's dtype.

    ``w``: per-output-channel symmetric codes, plain ``int8[N, K]`` (8 bits) or ``uint8[N, ceil(K * w_bits / 8)]``
    (4 bits: :func:`~effalg.kernels.pack_int4_symmetric`; 2 bits: :func:`~effalg.kernels.pack_int2_symmetric`);
    ``w_scale``: ``float32[N]``. ``a_scale is None``: dynamic per-token int8 activations (``a_zero`` and
    ``w_rowsum`` must be None). Otherwise static per-tensor asymmetric: ``a_scale`` ``float32[1]``, ``a_zero``
    ``int32[1]`` in [-128, 127] or None, ``w_rowsum`` ``int32[N]`` (:func:`weight_rowsum`) required.
    """
    fn = "wxa8_linear"
    if isinstance(w_bits, bool) or w_bits not in WXA8_BITS:
        raise ValueError(f"{fn}: w_bits must be one of {WXA8_BITS}, got {w_bits!r}")
    _tensor(fn, "x", x, dtypes=_FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    K = int(x.shape[-1])
    _tensor(fn, "w", w, dtypes=(torch.int8,) if w_bits == 8 else (torch.uint8,), ndim=2)
    if w.layout != torch.strided:
        raise ValueError(f"{fn}: w must be a plain (strided) tensor, got layout {w.layout}")
    N = int(w.shape[0])
    if w.shape[1] != packed_size(K, w_bits):
        raise ValueError(
            f"{fn}: w must have shape (N, ceil(K * {w_bits} / 8)) = ({N}, {packed_size(K, w_bits)}) for x with "
            f"K={K}, got {tuple(w.shape)}"
        )
    _check_k(fn, K)
    _tensor(fn, "w_scale", w_scale, dtypes=(torch.float32,), ndim=1)
    if w_scale.shape[0] != N:
        raise ValueError(f"{fn}: w_scale must have shape ({N},), got {tuple(w_scale.shape)}")
    if a_scale is None:
        if a_zero is not None:
            raise ValueError(f"{fn}: a_zero requires a_scale (static activations); a_scale is None (dynamic)")
        if w_rowsum is not None:
            raise ValueError(f"{fn}: w_rowsum is only used with static activations (a_scale is None)")
    else:
        _tensor(fn, "a_scale", a_scale, dtypes=(torch.float32,))
        if tuple(a_scale.shape) != (1,):
            raise ValueError(f"{fn}: a_scale must have shape (1,) (per tensor), got {tuple(a_scale.shape)}")
        if a_zero is not None:
            _tensor(fn, "a_zero", a_zero, dtypes=(torch.int32,))
            if tuple(a_zero.shape) != (1,):
                raise ValueError(f"{fn}: a_zero must have shape (1,) (per tensor), got {tuple(a_zero.shape)}")
            if K > MAX_INT8_ZP_K:
                raise ValueError(f"{fn}: K={K} exceeds MAX_INT8_ZP_K={MAX_INT8_ZP_K} for an activation zero point")
            if a_zero.device.type == "cpu" and not torch.compiler.is_compiling() and not -128 <= int(a_zero) <= 127:
                raise ValueError(f"{fn}: a_zero must be in [-128, 127], got {int(a_zero)}")
        if w_rowsum is None:
            raise ValueError(f"{fn}: w_rowsum (int32[N], see weight_rowsum) is required with static activations")
        _tensor(fn, "w_rowsum", w_rowsum, dtypes=(torch.int32,), ndim=1)
        if w_rowsum.shape[0] != N:
            raise ValueError(f"{fn}: w_rowsum must have shape ({N},), got {tuple(w_rowsum.shape)}")
    _check_bias(fn, bias, N)
    _same_device(fn, x, w=w, w_scale=w_scale, a_scale=a_scale, a_zero=a_zero, w_rowsum=w_rowsum, bias=bias)
    return torch.ops.effalg.wxa8_linear(x, w, w_scale, w_bits, a_scale, a_zero, w_rowsum, bias)


def prepack_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """The fastest layout for an int8 ``[N, K]`` weight on its device (same bytes).

    On CPU with oneDNN this is the prepacked AMX/VNNI layout (mkldnn, ``[K, N]``); elsewhere ``w`` itself.
    """
    fn = "prepack_int8_weight"
    _tensor(fn, "w", w, dtypes=(torch.int8,), ndim=2)
    if w.layout == torch._mkldnn or w.device.type != "cpu":
        return w
    from .cpu import onednn_int8_available
    from .cpu import prepack_int8_weight as _prepack

    return _prepack(w) if onednn_int8_available() else w


def unpack_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """The plain, serializable ``int8[N, K]`` layout of a weight given plain or prepacked."""
    _tensor("unpack_int8_weight", "w", w, dtypes=(torch.int8,), ndim=2)
    from .reference import dense_int8_weight

    return dense_int8_weight(w).contiguous()


#: Default cap of :func:`hadamard_block_size`.
MAX_HADAMARD_BLOCK = 256


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_block_size(K: int, max_block: int = MAX_HADAMARD_BLOCK) -> int:
    """Block size of the block-diagonal Hadamard rotation of ``K`` channels: the largest power of two that divides
    ``K`` and is ``<= max_block`` (e.g. 1152 -> 128, 4096 -> 256, 72 -> 8)."""
    fn = "hadamard_block_size"
    if isinstance(K, bool) or not isinstance(K, int) or K <= 0:
        raise ValueError(f"{fn}: K must be a positive int, got {K!r}")
    if isinstance(max_block, bool) or not isinstance(max_block, int) or not _is_pow2(max_block):
        raise ValueError(f"{fn}: max_block must be a positive power of two, got {max_block!r}")
    return min(K & -K, max_block)  # K & -K: the largest power of two dividing K


def smooth_hadamard(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor] = None,
    signs: Optional[torch.Tensor] = None,
    block_size: int = 0,
) -> torch.Tensor:
    """``((x * smooth) * signs)`` times the block-diagonal normalized Walsh-Hadamard matrix (blocks of
    ``block_size`` channels along the last dim, ``H_b / sqrt(b)``, Sylvester order); ``block_size == 0``: no rotation.

    ``smooth`` and ``signs`` are float32 ``[K]`` (``signs`` entries +-1; its values are checked on CPU outside
    ``torch.compile`` only, to avoid a device sync), either may be None. Computed in float32, returned in x's dtype.
    With random signs this is the randomized Hadamard rotation ``x @ R`` (``R`` orthogonal) of QuaRot / ViDiT-Q.
    """
    fn = "smooth_hadamard"
    _tensor(fn, "x", x, dtypes=_FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    K = int(x.shape[-1])
    for name, t in (("smooth", smooth), ("signs", signs)):
        if t is None:
            continue
        _tensor(fn, name, t, dtypes=(torch.float32,), ndim=1)
        if t.shape[0] != K:
            raise ValueError(f"{fn}: {name} must have shape ({K},) to match x's last dim, got {tuple(t.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
        raise ValueError(f"{fn}: block_size must be an int >= 0 (0 = no rotation), got {block_size!r}")
    if block_size and not _is_pow2(block_size):
        raise ValueError(f"{fn}: block_size must be a power of two (or 0), got {block_size}")
    if block_size and K % block_size:
        raise ValueError(f"{fn}: block_size={block_size} must divide x's last dim K={K}")
    _same_device(fn, x, smooth=smooth, signs=signs)
    if (
        signs is not None
        and signs.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not bool((signs.abs() == 1).all())
    ):
        raise ValueError(f"{fn}: signs must contain only +1 and -1")
    return torch.ops.effalg.smooth_hadamard(x, smooth, signs, block_size)
