"""The ``effalg.kernels`` ops on a real CUDA GPU (Triton kernels, not the interpreter), through the public wrappers.

Run by ``bash scripts/dev.sh gpu-check`` (``TRITON_INTERPRET=0 python -m pytest -m cuda tests/kernels``); skipped
without CUDA. Realistic shapes (PixArt's 1152 / 4608 features, head_dim 128); references computed on the CPU by
:mod:`effalg.kernels.reference` / :mod:`effalg.kernels.attention_reference` in float64.

Tolerances as in test_triton.py / test_attention.py / test_hadamard.py: int8 codes and activation scales exact;
float outputs compared after dividing by ``max|ref|`` at one unit in the last place of the output dtype (attention
fp16 and the Hadamard rotation: two).
"""

from __future__ import annotations

import pytest
import torch

import effalg.kernels as K
from effalg.kernels import packing, reference
from effalg.kernels.attention_reference import band_attention_ref, band_decode_attention_ref

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # test_triton.py
ATTN_TOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7}  # test_attention.py (Triton)
HADAMARD_TOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}  # test_hadamard.py
DTYPES = [torch.bfloat16, torch.float16]
SHAPES = [(300, 1152, 1152), (77, 4608, 1152), (9, 1152, 4608)]  # (M, N, K)


@pytest.fixture(scope="module", autouse=True)
def _triton_registered():
    from effalg.kernels import triton as tk

    assert tk.register(), "the Triton kernels did not register as the CUDA implementations"


def _close(y: torch.Tensor, ref: torch.Tensor, tol: dict = TOL) -> None:
    assert y.is_cuda and y.dtype == ref.dtype and y.shape == ref.shape
    y = y.cpu()
    scale = ref.float().abs().max().clamp(min=1e-6)
    t = tol[ref.dtype]
    torch.testing.assert_close(y.float() / scale, ref.float() / scale, rtol=t, atol=t)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _cuda(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def _int8_weight(N: int, K_: int, seed: int):
    g = _gen(seed)
    w = torch.randint(-127, 128, (N, K_), generator=g, dtype=torch.int8)
    return w, torch.rand(N, generator=g) * 0.01 + 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [0, 128])
def test_quantize_per_token_exact(dtype, group_size):
    x = _randn(300, 1152, dtype=dtype, seed=1) * 3
    q, s = K.quantize_per_token(x.to(DEV), group_size)
    qr, sr = reference.quantize_per_token_ref(x, group_size)
    assert q.is_cuda and torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)


@pytest.mark.parametrize("out_dtype", [torch.float32, *DTYPES])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_scaled_mm(out_dtype, with_bias):
    M, N, K_ = 300, 1152, 1152
    g = _gen(2)
    a = torch.randint(-127, 128, (M, K_), generator=g, dtype=torch.int8)
    a_scale = torch.rand(M, 1, generator=g) * 0.05 + 1e-3
    w, w_scale = _int8_weight(N, K_, 3)
    bias = _randn(N, dtype=out_dtype, seed=4) if with_bias else None
    y = K.int8_scaled_mm(*_cuda(a, a_scale, w, w_scale, bias), out_dtype)
    _close(y, reference.int8_scaled_mm_ref(a, a_scale, w, w_scale, bias, out_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K_", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_linear(dtype, M, N, K_, with_bias):
    x = _randn(M, K_, dtype=dtype, seed=5)
    w, w_scale = _int8_weight(N, K_, 6)
    bias = _randn(N, dtype=dtype, seed=7) if with_bias else None
    _close(K.w8a8_linear(*_cuda(x, w, w_scale, bias)), reference.w8a8_linear_ref(x, w, w_scale, bias))


def test_w8a8_linear_leading_dims():
    x = _randn(2, 150, 1152, dtype=torch.bfloat16, seed=8)
    w, w_scale = _int8_weight(4608, 1152, 9)
    y = K.w8a8_linear(*_cuda(x, w, w_scale))
    assert y.shape == (2, 150, 4608)
    _close(y, reference.w8a8_linear_ref(x, w, w_scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K_", SHAPES)
@pytest.mark.parametrize("group_size", [0, 128])
def test_w4a8_linear(dtype, M, N, K_, group_size):
    x = _randn(M, K_, dtype=dtype, seed=10)
    g = _gen(11)
    wp = packing.pack_int4_symmetric(torch.randint(-8, 8, (N, K_), generator=g, dtype=torch.int8))
    G = 1 if group_size == 0 else K_ // group_size
    w_scale = torch.rand(N, G, generator=g) * 0.02 + 1e-3
    bias = _randn(N, dtype=dtype, seed=12)
    y = K.w4a8_linear(*_cuda(x, wp, w_scale), group_size, bias.to(DEV))
    _close(y, reference.w4a8_linear_ref(x, wp, w_scale, group_size, bias))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [0, 128])
@pytest.mark.parametrize("M", [1, 16, 300])  # GEMV (decode) and GEMM
def test_weight_only_linear(bits, dtype, group_size, M):
    N, K_ = 1152, 1152
    g = _gen(20 + bits)
    u = torch.randint(0, 2**bits, (N, K_), generator=g, dtype=torch.uint8)
    G = 1 if group_size == 0 else K_ // group_size
    scale = torch.rand(N, G, generator=g) * 0.02 + 1e-3
    zero = torch.rand(N, G, generator=g) * (2**bits - 1)
    wp = packing.pack_bits(u, bits)
    x = _randn(M, K_, dtype=dtype, seed=21)
    bias = _randn(N, dtype=dtype, seed=22) if group_size else None
    y = K.weight_only_linear(*_cuda(x, wp, scale, zero), bits, group_size, None if bias is None else bias.to(DEV))
    _close(y, reference.weight_only_linear_ref(x, wp, scale, zero, bits, group_size, bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_smooth_hadamard(dtype):
    Kd = 1152
    x = _randn(300, Kd, dtype=dtype, seed=30) * 2
    smooth = torch.rand(Kd, generator=_gen(31)) * 3 + 0.25
    signs = torch.randint(0, 2, (Kd,), generator=_gen(32)).float() * 2 - 1
    bs = K.hadamard_block_size(Kd)
    y = K.smooth_hadamard(*_cuda(x, smooth, signs), bs)
    _close(y, reference.smooth_hadamard_ref(x, smooth, signs, bs), HADAMARD_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_band_attention(dtype, causal):
    B, Hq, Hkv, L, D = 2, 8, 2, 700, 128
    q, k, v = (_randn(B, h, L, D, dtype=dtype, seed=40 + i) for i, h in enumerate((Hq, Hkv, Hkv)))
    window, sink, pad = torch.tensor([64, 300]), torch.tensor([4, 32]), torch.tensor([0, 37])
    y = K.band_attention(*_cuda(q, k, v, window, sink, pad), causal=causal)
    _close(y, band_attention_ref(q, k, v, window, sink, pad, D**-0.5, causal), ATTN_TOL)
    assert not y[1, :, :37].any()  # padding query rows output zeros


@pytest.mark.parametrize("dtype", DTYPES)
def test_band_attention_pixart_dims(dtype):
    # DiTFastAttn at PixArt widths: 16 heads of 72 (padded to 128-wide tiles), 120 global text tokens first, a band
    # of +-128 over the image tokens.
    B, H, L, D = 2, 16, 1144, 72
    q, k, v = (_randn(B, H, L, D, dtype=dtype, seed=45 + i) for i in range(3))
    y = K.band_attention(*_cuda(q, k, v), 129, 120)
    zero = torch.zeros(H, dtype=torch.long)
    _close(y, band_attention_ref(q, k, v, zero + 129, zero + 120, torch.zeros(B, dtype=torch.long), D**-0.5, False),
           ATTN_TOL)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_band_decode_attention(dtype):
    # Llama-style GQA (32 query heads over 8 KV heads, head_dim 128); segments of unequal capacity, one empty,
    # lengths below capacity and a zero length (zeros out); dead slots hold garbage.
    B, Hq, D = 3, 32, 128
    cap = [1000, 500, 2048, 0, 64, 700, 1500, 256]
    head_start = torch.tensor([0] + cap).cumsum(0)
    T = int(head_start[-1])
    q = _randn(B, Hq, D, dtype=dtype, seed=50)
    kc, vc = _randn(B, T, D, dtype=dtype, seed=51), _randn(B, T, D, dtype=dtype, seed=52)
    c = torch.tensor(cap)
    length = (torch.rand(B, len(cap), generator=_gen(53)) * (c + 1)).long().clamp(max=c)
    length[0] = c  # every segment full
    length[1, 0] = 0
    y = K.band_decode_attention(*_cuda(q, kc, vc, head_start, length))
    _close(y, band_decode_attention_ref(q, kc, vc, head_start, length, D**-0.5), ATTN_TOL)
    assert not y[1, :4].any() and not y[:, 12:16].any()  # zero length / empty segment


def test_ops_dispatch_to_triton_on_cuda():
    from effalg.kernels import triton as tk

    for op in ("quantize_per_token", "int8_scaled_mm", "w8a8_linear", "w4a8_linear", "weight_only_linear",
               "smooth_hadamard", "band_attention", "band_decode_attention"):  # fmt: skip
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"effalg::{op}", "CUDA"), op
    x = _randn(300, 1152, dtype=torch.bfloat16, seed=60).to(DEV)
    w, w_scale = _cuda(*_int8_weight(1152, 1152, 61))
    y = torch.ops.effalg.w8a8_linear(x, w, w_scale, None)
    assert y.is_cuda and torch.equal(y, tk.triton_w8a8_linear(x, w, w_scale, None))
