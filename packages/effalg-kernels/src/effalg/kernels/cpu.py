"""Fast CPU implementations of the ``effalg`` ops, registered for the ``"cpu"`` device.

* int8 GEMMs run on oneDNN's AMX/VNNI brgemm through ``torch.ops.onednn.qlinear_pointwise`` when the weight is
  prepacked (:func:`prepack_int8_weight`); the per-channel weight scale is fused there, and the per-token activation
  scale and bias are applied in one pass afterwards (oneDNN's PyTorch binding has no per-row source scale).
* Plain ``int8[N, K]`` weights go through ``torch._int_mm`` (oneDNN gemm); the weight scale, per-token scale and bias
  follow in one inductor-fused pass over the int32 result (eager ops for small results).
* Large inputs run row chunk by row chunk (quantize, GEMM, epilogue into the output), so the int32 and float
  temporaries stay bounded (``INT8_MM_CHUNK_NUMEL`` elements) instead of growing with the number of rows.
* Activation quantization is division-exact with the reference (same float32 ops in the same order).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .reference import AMAX_EPS, quantize_groups, quantize_static_ref, unpack_wxa8_weight

logger = logging.getLogger(__name__)

__all__ = [
    "prepack_int8_weight",
    "onednn_int8_available",
    "onednn_int8_exact",
    "register",
    "hadamard_matrix",
    "smooth_hadamard_cpu",
    "wxa8_conv2d_cpu",
]


def onednn_int8_available() -> bool:
    """Whether int8 weights are prepacked for oneDNN's int8 linear on this machine.

    Only with AMX: on an AVX-512-VNNI CPU without AMX (AMD EPYC, torch 2.13) oneDNN's prepacked int8 linear with
    per-channel weight scales and bf16 output measured 89 s for a 2048x1152x4608 GEMM, against 27 ms for
    ``torch._int_mm`` on the plain layout. ``EFFALG_CPU_ONEDNN_INT8=1`` / ``0`` forces it on / off, except that it is
    never used without VNNI: on an AVX2-only CPU oneDNN's int8 linear multiplies through ``vpmaddubsw``, whose int16
    pair sums saturate for full-range int8 weights (20% relative error measured with |w| up to 127).
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return False
    if not onednn_int8_exact():
        return False
    forced = os.environ.get("EFFALG_CPU_ONEDNN_INT8")
    if forced is not None:
        return forced.strip() not in ("", "0")
    return bool(torch.cpu._is_amx_tile_supported())


def onednn_int8_exact() -> bool:
    """Whether oneDNN's int8 linear accumulates exactly on this CPU (VNNI or AMX; not plain AVX2)."""
    return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def prepack_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """oneDNN-prepacked layout (mkldnn ``int8[K, N]``, same bytes) of a plain ``int8[N, K]`` weight."""
    return torch.ops.onednn.qlinear_prepack(w.contiguous(), None)


#: Inputs at least this large use the fused (inductor-generated, one read for the max and one for the codes)
#: quantizer; smaller ones run the same math in eager mode. ``EFFALG_CPU_FUSED_QUANT=0`` disables fusion.
FUSED_QUANT_MIN_NUMEL = 1 << 16
_fused_quant = None


def _fused_quantizer():
    global _fused_quant
    if _fused_quant is None:
        _fused_quant = False
        if os.environ.get("EFFALG_CPU_FUSED_QUANT", "1") != "0":
            try:
                _fused_quant = torch.compile(quantize_groups, dynamic=True)
            except Exception as e:  # no inductor/compiler: stay correct, just slower
                logger.warning("effalg: fused CPU quantization unavailable (%s); using eager ops", e)
    return _fused_quant


def _quantize_rows(x2: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    global _fused_quant
    K = x2.shape[-1]
    gs = K if group_size == 0 else group_size
    xg = x2.reshape(x2.shape[0], K // gs, gs)
    fused = _fused_quantizer() if x2.numel() >= FUSED_QUANT_MIN_NUMEL else False
    if fused:
        try:
            q, scale = fused(xg)
        except Exception as e:  # e.g. no C++ compiler on this machine
            logger.warning("effalg: fused CPU quantization failed (%s); using eager ops", e)
            _fused_quant = False
            q, scale = quantize_groups(xg)
    else:
        q, scale = quantize_groups(xg)
    return q.reshape(x2.shape), scale


def quantize_per_token_cpu(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    q, s = _quantize_rows(x.reshape(-1, K), group_size)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])


def _int32_gemm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` in int32 for plain int8 operands (oneDNN gemm through ``torch._int_mm``)."""
    return torch._int_mm(a.contiguous(), w.t())


def _epilogue(y: torch.Tensor, a_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], out_dtype: torch.dtype):
    """``y * a_scale + bias`` in one pass (in place when ``y`` already has ``out_dtype``)."""
    if a_scale is None:
        y = y if bias is None else y.add_(bias.to(y.dtype))
        return y.to(out_dtype)
    s = a_scale.reshape(-1, 1).to(y.dtype)
    if y.dtype == out_dtype:
        if bias is None:
            return y.mul_(s)
        return torch.addcmul(bias.to(out_dtype), y, s, out=y)
    if bias is None:
        return torch.mul(y, s).to(out_dtype)
    return torch.addcmul(bias.to(y.dtype), y, s).to(out_dtype)


#: Elements of the int32 GEMM result per row chunk of the int8 GEMM paths (:func:`int8_scaled_mm_cpu`,
#: :func:`w8a8_linear_cpu`, :func:`w4a8_linear_cpu`): larger inputs are quantized, multiplied and finished chunk by
#: chunk into the output, so that the int32 result and the epilogue's float32 temporary (16 MiB each) stay about
#: last-level-cache sized and below glibc's largest mmap threshold (32 MiB): heap memory reused from chunk to chunk
#: instead of fresh pages, each page-faulted on first touch, on every call (measured: 1.5-2x faster at 8192 rows with
#: glibc's default malloc; on par with the unchunked path under :func:`configure_allocator`).
INT8_MM_CHUNK_NUMEL = 1 << 22


def _row_chunks(M: int, N: int) -> list[slice]:
    """``M`` rows split into equal chunks of at most ``INT8_MM_CHUNK_NUMEL / N`` rows (at least 64)."""
    rows = max(64, INT8_MM_CHUNK_NUMEL // max(N, 1))
    if M <= rows:
        return [slice(0, M)]
    step = -(-M // -(-M // rows))
    return [slice(i, min(i + step, M)) for i in range(0, M, step)]


def _round_to_bf16(y: torch.Tensor) -> torch.Tensor:
    """float32 ``y`` rounded to the nearest bfloat16 value (ties to even), kept in float32: ``y.to(bfloat16).float()``
    as integer ops on the bits (inductor elides a down-cast followed by an up-cast, and bfloat16 vectors in the loop
    would slow down its int32 conversion). NaN stays NaN."""
    r = y.view(torch.int32)
    r = (r + (0x7FFF + ((r >> 16) & 1))) & -65536
    return torch.where(y != y, y, r.view(torch.float32))  # y != y: NaN (isnan vectorizes worse)


def _int8_mm_epilogue(acc, w_scale, a_scale, bias, round_bf16: bool):
    """The eager epilogue's numbers in one fused pass, in float32: ``acc * w_scale`` (``acc``: the int32 GEMM result;
    ``w_scale`` None: the oneDNN result, already scaled and rounded), rounded to bfloat16 if ``round_bf16``, then
    ``bias + y * a_scale``. ``a_scale`` ``[M, 1]`` and ``bias`` ``[1, N]`` come as float32 holding values already
    rounded like the GEMM result; an absent bias is ``-0.0`` (``-0.0 + v == v`` for every v, signed zeros included).
    The caller rounds the result to the output dtype (in the same pass that writes it into the output)."""
    y = acc.to(torch.float32)
    if w_scale is not None:
        y = y * w_scale
        if round_bf16:
            y = _round_to_bf16(y)
    return bias + y * a_scale


def _int8_mm_chunk(a, a_scale, w, w_scale, bias, out_dtype: torch.dtype, quantize: bool, out=None) -> torch.Tensor:
    """:func:`int8_scaled_mm_cpu` on one row chunk (``quantize``: ``a`` is float, quantized per token here first),
    written into ``out`` if given."""
    if quantize:
        a, a_scale = _quantize_rows(a, 0)
    N = w_scale.shape[0]
    # The GEMM result (with the per-channel weight scale) is rounded to the output dtype once (fp16 goes through
    # fp32: oneDNN's binding offers no fp16 output), then the per-token scale and bias (both rounded to that dtype
    # too) follow in fp32, rounded once more to the output dtype. Small results take eager ops (an fp32 addcmul with a
    # fused multiply-add), larger ones the fused pass (the product rounded to fp32 before the bias is added: the same
    # bits for bf16, at most one fp32 ulp apart before the final rounding otherwise). Both weight layouts finish
    # through the same epilogue, so plain and prepacked weights give bit-identical results.
    gemm_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    if w.layout == torch._mkldnn:  # AMX/VNNI brgemm, weight scale fused
        zp = torch.zeros(N, dtype=torch.int64)
        y = torch.ops.onednn.qlinear_pointwise(
            a.contiguous(), 1.0, 0, w, w_scale.contiguous(), zp, None, 1.0, 0, gemm_dtype, "none", [], ""
        )
        ws = None
    else:
        y, ws = _int32_gemm(a, w), w_scale

    def eager(*_):
        y_ = y if ws is None else y.to(torch.float32).mul_(ws.reshape(1, -1)).to(gemm_dtype)
        return _epilogue(y_, a_scale, bias, out_dtype)

    if y.numel() < FUSED_QUANT_MIN_NUMEL or _FUSED.get(_int8_mm_epilogue) is False:
        r = eager()
    else:
        # Fresh float32 copies of the small operands (see _wxa8_epilogue), rounded as the eager path rounds them, and
        # of the same shapes with or without a scale or bias (fewer recompilations).
        f32 = dict(dtype=torch.float32, copy=True)
        s = torch.ones(y.shape[0], 1) if a_scale is None else a_scale.reshape(-1, 1).to(gemm_dtype).to(**f32)
        b = torch.full((1, N), -0.0) if bias is None else bias.to(gemm_dtype).to(**f32).reshape(1, N)
        ws = None if ws is None else ws.to(**f32).reshape(1, N)
        r = _fused_call(_int8_mm_epilogue, y, ws, s, b, gemm_dtype == torch.bfloat16, eager=eager)
    return r.to(out_dtype) if out is None else out.copy_(r)


def _int8_mm_rows(a, a_scale, w, w_scale, bias, out_dtype: torch.dtype, quantize: bool = False) -> torch.Tensor:
    """:func:`_int8_mm_chunk` over the row chunks of ``a[M, K]`` (:func:`_row_chunks`), into one ``[M, N]`` output."""
    N = w_scale.shape[0]
    chunks = _row_chunks(a.shape[0], N)
    if len(chunks) == 1:
        return _int8_mm_chunk(a, a_scale, w, w_scale, bias, out_dtype, quantize)
    out = torch.empty(a.shape[0], N, dtype=out_dtype)
    for r in chunks:
        s = None if a_scale is None else a_scale[r]
        _int8_mm_chunk(a[r], s, w, w_scale, bias, out_dtype, quantize, out=out[r])
    return out


def int8_scaled_mm_cpu(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _int8_mm_rows(a, a_scale, w, w_scale, bias, out_dtype)


def w8a8_linear_cpu(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]):
    """Per-token quantization, GEMM and epilogue, row chunk by row chunk (:func:`_int8_mm_rows`)."""
    K = x.shape[-1]
    y = _int8_mm_rows(x.reshape(-1, K), None, w, w_scale, bias, x.dtype, quantize=True)
    return y.reshape(*x.shape[:-1], w_scale.shape[0])


def w4a8_linear_cpu(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group_size: int, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    K = x.shape[-1]
    N = w.shape[0]
    qw = _unpack_codes(w, 4, K)  # int8 [N, K], unpacked per call (one fused pass): the int4 bytes are what is stored
    if group_size == 0 or group_size == K:
        y = _int8_mm_rows(x.reshape(-1, K), None, qw, w_scale.reshape(N), bias, x.dtype, quantize=True)
        return y.reshape(*x.shape[:-1], N)
    qa, sa = _quantize_rows(x.reshape(-1, K), 0)
    G = K // group_size
    y = torch.zeros(qa.shape[0], N, dtype=torch.float32)
    for g in range(G):  # exact int32 partial sums per K-group; G is small (K / group_size)
        sl = slice(g * group_size, (g + 1) * group_size)
        acc = _int32_gemm(qa[:, sl].contiguous(), qw[:, sl].contiguous())
        y.addcmul_(acc.to(torch.float32), w_scale[:, g].reshape(1, N).float())
    y = _epilogue(y, sa, bias, x.dtype)
    return y.reshape(*x.shape[:-1], N)


def _quantize_static_rows(x2: torch.Tensor, a_scale: torch.Tensor, a_zero: Optional[torch.Tensor]) -> torch.Tensor:
    """Static per-tensor int8 codes of ``x2`` (any shape) in one fused pass for large inputs, else eager."""
    return _fused_call(quantize_static_ref, x2, a_scale, a_zero)


#: Largest K for which ``(qa - a_zero) @ qw.T`` stays inside int32 (``|qa - z| <= 255``, ``|qw| <= 128``).
_ZP_INT32_K = (2**31 - 1) // (255 * 128)

_FUSED: dict = {}


def _fused_call(fn, *args, eager=None):
    """``fn(*args)`` through its ``torch.compile``'d version (inductor: one vectorized loop instead of one pass per op)
    when ``args[0]`` has at least ``FUSED_QUANT_MIN_NUMEL`` elements; otherwise, or where fusion is off
    (``EFFALG_CPU_FUSED_QUANT=0``) or unavailable (no C++ compiler), ``(eager or fn)(*args)``."""
    eager = eager or fn
    if args[0].numel() < FUSED_QUANT_MIN_NUMEL:
        return eager(*args)
    c = _FUSED.get(fn)
    if c is None:
        c = False
        if _fused_quantizer() is not False:
            try:
                c = torch.compile(fn, dynamic=True)
            except Exception as e:
                logger.warning("effalg: fused CPU %s unavailable (%s); using eager ops", fn.__name__, e)
        _FUSED[fn] = c
    if c is not False:
        try:
            return c(*args)
        except Exception as e:
            logger.warning("effalg: fused CPU %s failed (%s); using eager ops", fn.__name__, e)
            _FUSED[fn] = False
    return eager(*args)


def _int4_lanes(p32: torch.Tensor) -> torch.Tensor:
    """Four packed int4 bytes (an int32 lane, eight codes ``q + 8``) -> the eight int8 codes (an int64 lane)."""
    u = p32.to(torch.int64) & 0xFFFFFFFF
    lane = ((u >> 28) - 8) * (1 << 56)  # the top code keeps its sign
    for j in range(7):
        lane = lane | ((((u >> (4 * j)) & 15) - 8) & 255) << (8 * j)
    return lane


def _int2_lanes(p: torch.Tensor) -> torch.Tensor:
    """One packed int2 byte (four codes ``q + 2``) -> the four int8 codes (an int32 lane)."""
    u = p.to(torch.int32)
    lane = ((u >> 6) - 2) * (1 << 24)  # the top code keeps its sign
    for j in range(3):
        lane = lane | ((((u >> (2 * j)) & 3) - 2) & 255) << (8 * j)
    return lane


def _unpack_codes(w: torch.Tensor, w_bits: int, K: int) -> torch.Tensor:
    """``unpack_wxa8_weight`` per call in one fused pass over whole machine words (7x faster on 4-bit weights)."""
    if w_bits == 8 or not w.is_contiguous():
        return unpack_wxa8_weight(w, w_bits, K)
    Kp = w.shape[1]
    ref = lambda _: unpack_wxa8_weight(w, w_bits, K)  # noqa: E731
    if w_bits == 4 and Kp % 4 == 0:
        codes = _fused_call(_int4_lanes, w.view(torch.int32), eager=ref).view(torch.int8)
    elif w_bits == 2:
        codes = _fused_call(_int2_lanes, w, eager=ref).view(torch.int8)
    else:
        return unpack_wxa8_weight(w, w_bits, K)
    return codes if codes.shape[1] == K else codes[:, :K].contiguous()


def _epilogue_rows(acc, zr, s_row, s_col, bias, dtype: torch.dtype):
    """``(acc - zr) * s_row * s_col + bias`` in fp32, rounded once to ``dtype`` (``acc - zr`` exact in int32)."""
    return torch.addcmul(bias, (acc - zr) * s_row, s_col).to(dtype)


def _epilogue_cols(acc, zr, s_row, s_col, bias, dtype: torch.dtype):
    """:func:`_epilogue_rows` on the ``[N, B, L]`` result of ``qw @ cols``, written as ``[B, N, L]`` (NCHW)."""
    return torch.addcmul(bias, (acc - zr) * s_row, s_col).to(dtype).transpose(0, 1).contiguous()


def _wxa8_epilogue(acc, K, a_scale, a_zero, w_rowsum, w_scale, bias, dtype, conv=False):
    """int32 GEMM result -> output in one fused pass: ``a_zero * w_rowsum`` subtracted exactly, times the activation
    scale (per tensor, or per token/column: a tensor broadcasting against ``acc``) and the weight scale, plus bias.
    ``acc`` is ``[M, N]``, or ``[N, B, L]`` with ``conv`` (output channels first, returned as ``[B, N, L]``)."""
    shape = (-1, 1, 1) if conv else (1, -1)
    zr = torch.zeros(1, dtype=torch.int32)
    if a_zero is not None:
        zr = (a_zero.to(torch.int32) * w_rowsum.to(torch.int32)).reshape(shape)
        if K > _ZP_INT32_K:  # (qa - z) @ qw.T could leave int32: subtract in float64
            acc, zr = acc.to(torch.float64), zr.to(torch.float64)
    # Fresh copies of the small operands: module buffers and tensors made under inference_mode differ in dispatch
    # keys, which would make torch.compile specialize on each mix.
    b = torch.zeros(1, dtype=torch.float32) if bias is None else bias.to(torch.float32, copy=True).reshape(shape)
    s_w = w_scale.to(torch.float32, copy=True).reshape(shape)
    args = (acc, zr, a_scale.to(torch.float32, copy=True), s_w, b, dtype)
    return _fused_call(_epilogue_cols if conv else _epilogue_rows, *args)


def wxa8_linear_cpu(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_bits: int,
    a_scale: Optional[torch.Tensor],
    a_zero: Optional[torch.Tensor],
    w_rowsum: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Quantize (per token, or static per tensor; one fused pass), unpack 2/4-bit codes to int8 (one fused pass),
    ``torch._int_mm``, then one fused epilogue (the zero-point correction is an exact int32 subtraction of
    ``a_zero * w_rowsum``)."""
    K = x.shape[-1]
    N = w.shape[0]
    x2 = x.reshape(-1, K)
    qw = _unpack_codes(w, w_bits, K)  # int8 [N, K]; 2/4-bit bytes are what is stored
    if a_scale is None:
        qa, sa = _quantize_rows(x2, 0)
    else:
        qa, sa = _quantize_static_rows(x2, a_scale, a_zero), a_scale
    y = _wxa8_epilogue(_int32_gemm(qa, qw), K, sa, a_zero, w_rowsum, w_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], N)


def _quantize_cols(cols: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes ``clamp(round(cols / scale), -127, 127)`` of ``cols[C, kh, kw, B, Ho, Wo]``, ``scale[B, Ho, Wo]``."""
    return torch.round(cols.to(torch.float32) / scale).clamp(-127, 127).to(torch.int8)


def _im2col_view(x: torch.Tensor, kernel_size, stride, padding, dilation, pad_value) -> torch.Tensor:
    """``x[B, C, H, W]`` padded with ``pad_value``, as the view ``[C, kh, kw, B, Ho, Wo]``: its contiguous copy is
    ``F.unfold(x)`` laid out ``[C * kh * kw, B * Ho * Wo]`` (same K order, batches side by side)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
    x = x.contiguous()
    B, C, Hp, Wp = x.shape
    Ho, Wo = (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1
    return x.as_strided((C, kh, kw, B, Ho, Wo), (Hp * Wp, dh * Wp, dw, C * Hp * Wp, sh * Wp, sw))


def wxa8_conv2d_cpu(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_bits: int,
    a_scale: Optional[torch.Tensor],
    a_zero: Optional[torch.Tensor],
    w_rowsum: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """``WxA8Conv2d`` on the CPU: the same result as ``F.unfold`` + :func:`wxa8_linear_cpu` + fold, without a float
    im2col transpose or a fold. Static activations are quantized once on ``x`` (elementwise, so before the unfold;
    the zero padding becomes ``a_zero``) and the int8 codes are unfolded straight into ``cols[K, B * L]``. Dynamic ones
    take each im2col row's amax as a max-pool of the per-pixel channel amax of ``|x|``, then quantize the unfolded
    float ``cols``. Then ``acc = qw @ cols`` (``torch._int_mm``) and the fused epilogue writes ``[B, O, Ho, Wo]``.
    ``w`` holds the flattened ``[O, C * kh * kw]`` codes."""
    B = x.shape[0]
    N = w.shape[0]
    if a_scale is None:  # the zero padding counts as |0| in each amax
        ph, pw = padding
        amax = F.pad(x.abs().amax(dim=1, keepdim=True), (pw, pw, ph, ph))
        amax = F.max_pool2d(amax, kernel_size, stride, 0, dilation)
        sa = torch.clamp(amax.to(torch.float32), min=AMAX_EPS).div_(127.0).squeeze(1)  # as quantize_groups
        cols = _im2col_view(x, kernel_size, stride, padding, dilation, 0.0).contiguous()
        q, sa = _fused_call(_quantize_cols, cols, sa), sa.reshape(1, B, -1)
    else:
        qx = _quantize_static_rows(x, a_scale, a_zero)
        view = _im2col_view(qx, kernel_size, stride, padding, dilation, 0 if a_zero is None else int(a_zero))
        q, sa = view.contiguous(), a_scale
    Kc, _, _, _, Ho, Wo = q.shape
    K = Kc * kernel_size[0] * kernel_size[1]
    qw = _unpack_codes(w, w_bits, K)
    acc = torch._int_mm(qw, q.reshape(K, -1)).view(N, B, Ho * Wo)
    y = _wxa8_epilogue(acc, K, sa, a_zero, w_rowsum, w_scale, bias, x.dtype, conv=True)
    return y.view(B, N, Ho, Wo)


_REGISTERED = False
_LIB = torch.library.Library("effalg", "IMPL")  # keeps the MkldnnCPU registrations alive


def register() -> None:
    """Register the CPU implementations (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for name, fn in [
        ("quantize_per_token", quantize_per_token_cpu),
        ("int8_scaled_mm", int8_scaled_mm_cpu),
        ("w8a8_linear", w8a8_linear_cpu),
        ("w4a8_linear", w4a8_linear_cpu),
        ("wxa8_linear", wxa8_linear_cpu),
        ("smooth_hadamard", smooth_hadamard_cpu),
    ]:
        torch.library.register_kernel(f"effalg::{name}", "cpu", fn)
    # A prepacked (mkldnn) weight makes the dispatcher pick the MkldnnCPU key, not CPU.
    for name, fn in [("int8_scaled_mm", int8_scaled_mm_cpu), ("w8a8_linear", w8a8_linear_cpu)]:
        _LIB.impl(name, fn, "MkldnnCPU")
    _REGISTERED = True


_HADAMARD: dict[tuple[int, bool], torch.Tensor] = {}


def hadamard_matrix(b: int, normalized: bool = True) -> torch.Tensor:
    """Sylvester Walsh-Hadamard matrix ``H_b`` (entries +-1), divided by ``sqrt(b)`` if ``normalized``; float32, CPU,
    cached, symmetric."""
    H = _HADAMARD.get((b, normalized))
    if H is None:
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < b:  # Sylvester doubling: [[H, H], [H, -H]]
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        if normalized:
            H = H / math.sqrt(b)
        H = H.to(torch.float32).contiguous()
        _HADAMARD[(b, normalized)] = H
    return H


def _hadamard_factors(b: int) -> list[int]:
    """Factors of ``H_b = H_f1 (x) H_f2 (x) ... (x) H_16`` (Kronecker), innermost last: one GEMM up to b = 64, then
    16-wide inner factors and an outer one of 8..64 (small outer factors make batched GEMMs slow)."""
    if b <= 64:
        return [b]
    fs = []
    while b > 64:
        fs.append(16)
        b //= 16
    fs.append(b)
    return fs[::-1]


def smooth_hadamard_cpu(
    x: torch.Tensor, smooth: Optional[torch.Tensor], signs: Optional[torch.Tensor], block_size: int
) -> torch.Tensor:
    """One fp32 per-channel multiply (smooth, signs and ``1 / sqrt(b)`` folded into one multiplier, fused with the
    up-cast of x), then the Hadamard transform of all blocks of all rows as Kronecker factors: ``H_128 = H_8 (x) H_16``
    costs 2 * (8 + 16) flops per element instead of 2 * 128 (a GEMM over the last 16 channels, then a batched GEMM
    over the 8 groups of 16), with exact +-1 products and fp32 sums; rounded once to x's dtype."""
    K = x.shape[-1]
    if smooth is not None and signs is not None:
        m = smooth * signs
    else:
        m = smooth if smooth is not None else signs
    x2 = x.reshape(-1, K)
    if block_size == 0:
        out = torch.empty(x2.shape, dtype=x.dtype)
        if m is None:
            out.copy_(x2)
        else:
            torch.mul(x2, m, out=out)  # computed in fp32 (type promotion), rounded once on the store
        return out.reshape(x.shape)
    norm = 1.0 / math.sqrt(block_size)
    m = torch.full((K,), norm, dtype=torch.float32) if m is None else m * norm
    y = torch.mul(x2, m)  # fp32 [M, K]
    fs = _hadamard_factors(block_size)
    n = y.numel()
    y = torch.mm(y.reshape(n // fs[-1], fs[-1]), hadamard_matrix(fs[-1], normalized=False))
    inner = fs[-1]
    for f in reversed(fs[:-1]):  # H_f on the next-outer index: y[r, :, s] <- H_f @ y[r, :, s]
        y = torch.matmul(hadamard_matrix(f, normalized=False), y.reshape(n // (f * inner), f, inner))
        inner *= f
    return y.reshape(x.shape).to(x.dtype)
