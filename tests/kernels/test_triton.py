"""Triton kernels (effalg.kernels.triton) vs the plain-PyTorch references.

Without a GPU these run through the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1`` is set in
tests/conftest.py before triton is imported), with small tiles so ragged shapes (M, N, K not multiples of the
blocks) and multi-tile loops are exercised.

Tolerances: int8 codes, activation scales and integer accumulators must match exactly. Scaled float outputs
are compared with ``assert_close`` at ``rtol = atol = TOL[dtype]`` after dividing by ``max|ref|`` (fp32: 1e-5;
fp16: 2**-10, bf16: 2**-7, i.e. one unit in the last place: the kernels accumulate in fp32 and round once, the
references in float64).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton); the Triton kernels cannot run", allow_module_level=True)

from effalg.kernels import packing, reference  # noqa: E402
from effalg.kernels import triton as tk  # noqa: E402

if not tk.HAS_TRITON:
    pytest.skip("triton is installed but does not import", allow_module_level=True)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Small tiles (many tiles per problem, fast under the interpreter) that still compile for sm_80/sm_90: every launch
# here is in the AOT manifest (tests/kernels/conftest.py) and compiled by test_triton_aot.py. int8 tl.dot needs
# K tiles of at least 32, fp16/bf16 16.
BLK = 16
INT8_BK = 32

TOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.float().abs().max().clamp(min=1e-6)
    tol = TOL[ref.dtype]
    torch.testing.assert_close(y.float() / scale, ref.float() / scale, rtol=tol, atol=tol)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype).to(DEVICE)


# --------------------------------------------------------------------------------------------- quantize_per_token


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size", [0, 8, 24])
@pytest.mark.parametrize("block", [None, 16])  # None: one pass from registers; 16: the two-pass loop
def test_quantize_matches_reference_exactly(dtype, group_size, block):
    x = _randn(2, 3, 72, dtype=dtype, seed=1) * 3
    q, s = tk.triton_quantize_per_token(x, group_size, block=block)
    qr, sr = reference.quantize_per_token_ref(x, group_size)
    G = 1 if group_size == 0 else 72 // group_size
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (2, 3, G)
    assert torch.equal(q, qr)
    assert torch.equal(s, sr)


def test_quantize_ragged_k_and_odd_rows():
    x = _randn(7, 37, seed=2)
    for block in (None, 16):
        q, s = tk.triton_quantize_per_token(x, 0, block=block)
        qr, sr = reference.quantize_per_token_ref(x, 0)
        assert torch.equal(q, qr) and torch.equal(s, sr)


def test_quantize_rounds_half_to_even_and_handles_zero_rows():
    # amax = 127 -> scale = 1 exactly, so x / scale = x: the .5 ties must round to even like torch.round.
    x = torch.tensor(
        [[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 0.49999997, -3.5, 4.5, 0.0, 1.0, 2.0]],
        device=DEVICE,
    )
    zeros = torch.zeros(1, 16, device=DEVICE)
    q, s = tk.triton_quantize_per_token(torch.cat([x, zeros]), 0)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 126, -126, 0, -4, 4, 0, 1, 2]
    assert s[0].item() == 1.0
    assert q[1].abs().max().item() == 0
    assert s[1].item() == torch.tensor(1e-8, dtype=torch.float32).div(127).item()
    qr, sr = reference.quantize_per_token_ref(torch.cat([x, zeros]), 0)
    assert torch.equal(q, qr) and torch.equal(s, sr)


def test_quantize_empty_rows():
    q, s = tk.triton_quantize_per_token(torch.empty(0, 16, device=DEVICE), 0)
    assert q.shape == (0, 16) and s.shape == (0, 1)


# ------------------------------------------------------------------------------------------------- int8_scaled_mm


@pytest.mark.parametrize("M,N,K", [(5, 33, 70), (1, 16, 16), (17, 40, 35)])
def test_int8_mm_int32_accumulator_exact(M, N, K):
    g = _gen(3)
    a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8).to(DEVICE)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    ones_m = torch.ones(M, 1, device=DEVICE)
    ones_n = torch.ones(N, device=DEVICE)
    y = tk.triton_int8_scaled_mm(a, ones_m, w, ones_n, None, torch.float32, block_m=BLK, block_n=BLK, block_k=INT8_BK)
    exact = a.cpu().to(torch.int64) @ w.cpu().to(torch.int64).t()  # |acc| < 2**24: exact in fp32
    assert torch.equal(y.cpu().to(torch.int64), exact)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_scaled_mm_matches_reference(out_dtype, with_bias):
    M, N, K = 5, 33, 70
    g = _gen(4)
    a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8).to(DEVICE)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    a_scale = (torch.rand(M, 1, generator=g) * 0.05 + 1e-3).to(DEVICE)
    w_scale = (torch.rand(N, generator=g) * 0.01 + 1e-4).to(DEVICE)
    bias = _randn(N, dtype=out_dtype, seed=5) if with_bias else None
    y = tk.triton_int8_scaled_mm(a, a_scale, w, w_scale, bias, out_dtype, block_m=BLK, block_n=BLK, block_k=INT8_BK)
    _close(y, reference.int8_scaled_mm_ref(a, a_scale, w, w_scale, bias, out_dtype))


def test_int8_scaled_mm_default_blocks():
    M, N, K = 3, 20, 50
    g = _gen(6)
    a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8).to(DEVICE)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    a_scale = torch.rand(M, 1, generator=g).to(DEVICE)
    w_scale = torch.rand(N, generator=g).to(DEVICE)
    y = tk.triton_int8_scaled_mm(a, a_scale, w, w_scale, None, torch.float32)
    _close(y, reference.int8_scaled_mm_ref(a, a_scale, w, w_scale, None, torch.float32))


# ---------------------------------------------------------------------------------------------------- w8a8_linear


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_linear_matches_reference(dtype, with_bias):
    N, K = 33, 70
    g = _gen(7)
    x = _randn(2, 3, K, dtype=dtype, seed=8)  # leading dims flattened to M = 6
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    w_scale = (torch.rand(N, generator=g) * 0.01 + 1e-4).to(DEVICE)
    bias = _randn(N, dtype=dtype, seed=9) if with_bias else None
    y = tk.triton_w8a8_linear(x, w, w_scale, bias, block_m=BLK, block_n=BLK, block_k=INT8_BK)
    assert y.shape == (2, 3, N)
    _close(y, reference.w8a8_linear_ref(x, w, w_scale, bias))


# ---------------------------------------------------------------------------------------------------- w4a8_linear


def _int4_weight(N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-8, 8, (N, K), generator=_gen(seed), dtype=torch.int8)
    return q.to(DEVICE), packing.pack_int4_symmetric(q).to(DEVICE)


# (K, group_size): per-channel; groups smaller than the 32-wide K tile (8); groups not aligned to it (24, 36: one
# masked dot per group a tile overlaps); and groups spanning two K tiles (64: exact int32 sums per group).
W4_GROUPS = [(72, 0), (72, 8), (72, 24), (72, 36), (128, 64)]


@pytest.mark.parametrize("K,group_size", W4_GROUPS)
def test_w4a8_int32_accumulator_exact(K, group_size):
    # Integer activations with amax = 127 quantize with scale exactly 1 (q = x); unit weight scales then make the
    # output the exact integer product, which checks the in-kernel nibble unpacking and the per-group sums.
    M, N = 5, 33
    xi = torch.randint(-127, 128, (M, K), generator=_gen(10))
    xi[:, 0] = 127
    qw, wp = _int4_weight(N, K, 11)
    G = 1 if group_size == 0 else K // group_size
    y = tk.triton_w4a8_linear(
        xi.float().to(DEVICE),
        wp,
        torch.ones(N, G, device=DEVICE),
        group_size,
        None,
        block_m=BLK,
        block_n=BLK,
        block_k=INT8_BK,
    )
    exact = xi.to(torch.int64) @ qw.cpu().to(torch.int64).t()
    assert torch.equal(y.cpu().to(torch.int64), exact)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("K,group_size", W4_GROUPS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w4a8_linear_matches_reference(dtype, K, group_size, with_bias):
    M, N = 5, 33
    x = _randn(M, K, dtype=dtype, seed=12)
    _, wp = _int4_weight(N, K, 13)
    G = 1 if group_size == 0 else K // group_size
    w_scale = (torch.rand(N, G, generator=_gen(14)) * 0.02 + 1e-3).to(DEVICE)
    bias = _randn(N, dtype=dtype, seed=15) if with_bias else None
    y = tk.triton_w4a8_linear(x, wp, w_scale, group_size, bias, block_m=BLK, block_n=BLK, block_k=INT8_BK)
    _close(y, reference.w4a8_linear_ref(x, wp, w_scale, group_size, bias))


def test_w4a8_linear_odd_k_and_default_blocks():
    M, N, K = 3, 20, 35  # odd K: the last byte carries one code plus a zero padding nibble
    x = _randn(1, M, K, seed=16)
    _, wp = _int4_weight(N, K, 17)
    assert wp.shape == (N, 18)
    w_scale = torch.rand(N, 1, generator=_gen(18)).to(DEVICE)
    y = tk.triton_w4a8_linear(x, wp, w_scale, 0, None)
    assert y.shape == (1, M, N)
    _close(y, reference.w4a8_linear_ref(x, wp, w_scale, 0, None))


@pytest.mark.parametrize("block_k", [16, 48])
def test_int8_gemms_reject_k_tiles_a_gpu_cannot_compile(block_k):
    x = _randn(2, 48, seed=19)
    _, wp = _int4_weight(4, 48, 20)
    with pytest.raises(ValueError, match=r"w4a8_linear: block_k=\d+ must be a power of two >= 32"):
        tk.triton_w4a8_linear(x, wp, torch.ones(4, 2, device=DEVICE), 24, None, block_k=block_k)
    a = torch.zeros(2, 48, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match=r"int8_scaled_mm: block_k=\d+ must be a power of two >= 32"):
        tk.triton_int8_scaled_mm(a, torch.ones(2, 1), a, torch.ones(2), None, torch.float32, block_k=block_k)


# ---------------------------------------------------------------------------------------------------- wxa8_linear


def _wxa8_weight(N: int, K: int, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], the packed weight) for w_bits in {2, 4, 8}."""
    lo = -(2 ** (bits - 1))
    q = torch.randint(lo, -lo, (N, K), generator=_gen(seed), dtype=torch.int8)
    pack = {2: packing.pack_int2_symmetric, 4: packing.pack_int4_symmetric, 8: lambda t: t.clone()}[bits]
    return q.to(DEVICE), pack(q).to(DEVICE)


def _static_args(q: torch.Tensor, scale: float, zero: int):
    return (
        torch.tensor([scale], device=DEVICE),
        torch.tensor([zero], dtype=torch.int32, device=DEVICE),
        q.sum(1, dtype=torch.int32),
    )


WXA8_BITS = [2, 4, 8]


@pytest.mark.parametrize("bits", WXA8_BITS)
@pytest.mark.parametrize("K", [70, 35])  # 35: ragged last byte (padding codes) for 2 and 4 bits
def test_wxa8_static_zero_point_exact(bits, K):
    # Integer activations with a_scale = 1 quantize to x + zero exactly; the folded zero point (a_zero * w_rowsum)
    # must give back the exact integer product x @ q_w^T.
    M, N, zero = 5, 33, 37
    xi = torch.randint(-128 - zero, 128 - zero, (M, K), generator=_gen(90))
    qw, wp = _wxa8_weight(N, K, bits, 91)
    a_scale, a_zero, rs = _static_args(qw, 1.0, zero)
    y = tk.triton_wxa8_linear(
        xi.float().to(DEVICE), wp, torch.ones(N, device=DEVICE), bits, a_scale, a_zero, rs, None,
        block_m=BLK, block_n=BLK, block_k=INT8_BK,
    )  # fmt: skip
    assert torch.equal(y.cpu().to(torch.int64), xi.to(torch.int64) @ qw.cpu().to(torch.int64).t())


@pytest.mark.parametrize("bits", WXA8_BITS)
def test_wxa8_dynamic_exact(bits):
    M, N, K = 5, 33, 70
    xi = torch.randint(-127, 128, (M, K), generator=_gen(92))
    xi[:, 0] = 127  # amax = 127: per-token scale exactly 1
    qw, wp = _wxa8_weight(N, K, bits, 93)
    y = tk.triton_wxa8_linear(
        xi.float().to(DEVICE), wp, torch.ones(N, device=DEVICE), bits, None, None, None, None,
        block_m=BLK, block_n=BLK, block_k=INT8_BK,
    )  # fmt: skip
    assert torch.equal(y.cpu().to(torch.int64), xi.to(torch.int64) @ qw.cpu().to(torch.int64).t())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", WXA8_BITS)
@pytest.mark.parametrize("static", [False, True])
def test_wxa8_linear_matches_reference(dtype, bits, static):
    M, N, K = 5, 33, 70
    x = _randn(M, K, dtype=dtype, seed=94) * 2
    qw, wp = _wxa8_weight(N, K, bits, 95)
    w_scale = (torch.rand(N, generator=_gen(96)) * 0.02 + 1e-3).to(DEVICE)
    act = _static_args(qw, 0.03, -11) if static else (None, None, None)
    bias = _randn(N, dtype=dtype, seed=97)
    y = tk.triton_wxa8_linear(x, wp, w_scale, bits, *act, bias, block_m=BLK, block_n=BLK, block_k=INT8_BK)
    _close(y, reference.wxa8_linear_ref(x, wp, w_scale, bits, *act, bias))


def test_wxa8_static_without_zero_point_and_saturation():
    # a_zero None (symmetric static); values far outside the int8 range saturate to +-128/127 like the reference.
    M, N, K = 4, 20, 64
    x = _randn(M, K, seed=98) * 10
    qw, wp = _wxa8_weight(N, K, 8, 99)
    w_scale = torch.rand(N, generator=_gen(100)).to(DEVICE)
    a_scale = torch.tensor([0.05], device=DEVICE)
    rs = qw.sum(1, dtype=torch.int32)
    y = tk.triton_wxa8_linear(x, wp, w_scale, 8, a_scale, None, rs, None, block_m=BLK, block_n=BLK, block_k=INT8_BK)
    _close(y, reference.wxa8_linear_ref(x, wp, w_scale, 8, a_scale, None, rs, None))


def test_wxa8_rejects_k_tiles_a_gpu_cannot_compile():
    _, wp = _wxa8_weight(4, 64, 2, 101)
    with pytest.raises(ValueError, match=r"wxa8_linear: block_k=16 must be a power of two >= 32"):
        tk.triton_wxa8_linear(_randn(2, 64, seed=102), wp, torch.ones(4, device=DEVICE), 2, block_k=16)


# --------------------------------------------------------------------------------------------- weight_only_linear


def _wo_weight(N: int, K: int, bits: int, group_size: int, seed: int):
    g = _gen(seed)
    u = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
    G = 1 if group_size == 0 else K // group_size
    scale = torch.rand(N, G, generator=g) * 0.02 + 1e-3
    zero = torch.rand(N, G, generator=g) * (2**bits - 1)
    return u.to(DEVICE), packing.pack_bits(u, bits).to(DEVICE), scale.to(DEVICE), zero.to(DEVICE)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("use_gemv", [True, False])
@pytest.mark.parametrize("group_size", [0, 8, 24])
def test_weight_only_codes_exact(bits, use_gemv, group_size):
    # Integer x, unit scale, integer zero: the output is an exact integer in fp32 (checks the code extraction).
    M, N, K = 5, 33, 72
    u, wp, _, _ = _wo_weight(N, K, bits, group_size, 21)
    G = 1 if group_size == 0 else K // group_size
    zero = torch.randint(0, 2**bits, (N, G), generator=_gen(22)).float().to(DEVICE)
    xi = torch.randint(-3, 4, (M, K), generator=_gen(23))
    y = tk.triton_weight_only_linear(
        xi.float().to(DEVICE),
        wp,
        torch.ones(N, G, device=DEVICE),
        zero,
        bits,
        group_size,
        None,
        use_gemv=use_gemv,
        block_m=BLK,
        block_n=BLK,
        block_k=BLK,
    )
    gs = K if group_size == 0 else group_size
    W = u.cpu().to(torch.int64) - zero.cpu().to(torch.int64).repeat_interleave(gs, dim=1)
    assert torch.equal(y.cpu().to(torch.int64), xi.to(torch.int64) @ W.t())


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("use_gemv", [True, False])
@pytest.mark.parametrize("group_size,with_bias", [(0, True), (8, False), (24, True)])
def test_weight_only_linear_matches_reference(bits, dtype, use_gemv, group_size, with_bias):
    M, N, K = 5, 33, 72
    _, wp, scale, zero = _wo_weight(N, K, bits, group_size, 24 + bits)
    x = _randn(M, K, dtype=dtype, seed=30)
    bias = _randn(N, dtype=dtype, seed=31) if with_bias else None
    y = tk.triton_weight_only_linear(
        x, wp, scale, zero, bits, group_size, bias, use_gemv=use_gemv, block_m=BLK, block_n=BLK, block_k=BLK
    )
    _close(y, reference.weight_only_linear_ref(x, wp, scale, zero, bits, group_size, bias))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_only_ragged_k_default_blocks(bits):
    # K = 70: not a multiple of 8, so the 3-bit rows end in a partial 3-byte group (ceil(210 / 8) = 27 bytes).
    N, K = 33, 70
    _, wp, scale, zero = _wo_weight(N, K, bits, 0, 40 + bits)
    assert wp.shape == (N, (K * bits + 7) // 8)
    for M in (1, 9):  # M = 1: GEMV; M = 9: GEMM by default
        x = _randn(M, K, dtype=torch.bfloat16, seed=50 + M)
        y = tk.triton_weight_only_linear(x, wp, scale, zero, bits, 0, None)
        _close(y, reference.weight_only_linear_ref(x, wp, scale, zero, bits, 0, None))


@pytest.mark.parametrize("use_gemv", [True, False])
def test_weight_only_any_group_size_and_bf16_scales(use_gemv):
    # group_size 6: no power-of-two K tile divides it; the GEMV reduces per element, the GEMM masks per group.
    M, N, K = 2, 10, 36
    _, wp, scale, zero = _wo_weight(N, K, 4, 6, 60)
    x = _randn(1, M, K, dtype=torch.bfloat16, seed=61)
    y = tk.triton_weight_only_linear(
        x, wp, scale.bfloat16(), zero.bfloat16(), 4, 6, None, use_gemv=use_gemv, block_n=BLK, block_k=BLK
    )
    assert y.shape == (1, M, N)
    _close(y, reference.weight_only_linear_ref(x, wp, scale.bfloat16(), zero.bfloat16(), 4, 6, None))


def test_weight_only_gemm_rejects_k_tiles_a_gpu_cannot_compile():
    x = _randn(8, 32, dtype=torch.bfloat16, seed=62)
    _, wp, scale, zero = _wo_weight(4, 32, 4, 0, 63)
    with pytest.raises(ValueError, match=r"weight_only_linear: block_k=8 must be a power of two >= 16"):
        tk.triton_weight_only_linear(x, wp, scale, zero, 4, 0, None, use_gemv=False, block_k=8)


# ------------------------------------------------------------------ production block configurations (interpreter)

# One (M, N) per configuration gemm_blocks can choose: M <= 16, M <= 64, M <= 256, and large M with N > 1024.
PRODUCTION_MN = [(16, 72), (64, 72), (256, 72), (264, 1040)]


@pytest.mark.parametrize("M,N", PRODUCTION_MN)
def test_gemms_run_their_production_block_configuration(M, N):
    """The launchers' default tiles (what a GPU runs) give the reference result, under the interpreter too."""
    K = 256  # several K steps of the 64- and 128-wide tiles; group 128 spans whole tiles
    x = _randn(M, K, seed=80)
    g = _gen(81)
    w8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    ws = (torch.rand(N, generator=g) * 0.01 + 1e-4).to(DEVICE)
    _close(tk.triton_w8a8_linear(x, w8, ws, None), reference.w8a8_linear_ref(x, w8, ws, None))
    _, wp4 = _int4_weight(N, K, 82)
    for gs in (0, 128):
        ws4 = (torch.rand(N, 1 if gs == 0 else K // gs, generator=g) * 0.02 + 1e-3).to(DEVICE)
        _close(tk.triton_w4a8_linear(x, wp4, ws4, gs, None), reference.w4a8_linear_ref(x, wp4, ws4, gs, None))
    _, wp, scale, zero = _wo_weight(N, K, 4, 128, 83)
    _close(
        tk.triton_weight_only_linear(x, wp, scale, zero, 4, 128, None),
        reference.weight_only_linear_ref(x, wp, scale, zero, 4, 128, None),
    )


@pytest.mark.parametrize("M,bits,static", [(16, 2, True), (64, 4, False)])
def test_wxa8_runs_its_production_block_configuration(M, bits, static):
    """Both tiles of w4a8_gemm_blocks (M <= 16, and 64 x 128 x 64) under the interpreter."""
    N, K = 72, 256
    x = _randn(M, K, seed=103)
    qw, wp = _wxa8_weight(N, K, bits, 104)
    ws = (torch.rand(N, generator=_gen(105)) * 0.02 + 1e-3).to(DEVICE)
    act = _static_args(qw, 0.02, 5) if static else (None, None, None)
    _close(tk.triton_wxa8_linear(x, wp, ws, bits, *act, None), reference.wxa8_linear_ref(x, wp, ws, bits, *act, None))


def test_quantize_runs_its_production_configuration():
    x = _randn(3, 1152, seed=84)
    q, s = tk.triton_quantize_per_token(x, 0)
    qr, sr = reference.quantize_per_token_ref(x, 0)
    assert torch.equal(q, qr) and torch.equal(s, sr)


# --------------------------------------------------------------------------------------- registration / op contract


def test_cuda_wrappers_follow_op_signatures():
    """The functions registered for "cuda" take the op schemas' positional arguments."""
    N, K = 33, 72
    x = _randn(5, K, seed=70)
    w8 = torch.randint(-127, 128, (N, K), generator=_gen(71), dtype=torch.int8).to(DEVICE)
    ws = torch.rand(N, generator=_gen(72)).to(DEVICE) * 0.01
    q, s = tk._cuda_quantize_per_token(x, 0)
    assert torch.equal(q, reference.quantize_per_token_ref(x, 0)[0])
    _close(
        tk._cuda_int8_scaled_mm(q, s, w8, ws, None, torch.float32),
        reference.int8_scaled_mm_ref(q, s, w8, ws, None, torch.float32),
    )
    _close(tk._cuda_w8a8_linear(x, w8, ws, None), reference.w8a8_linear_ref(x, w8, ws, None))
    _, wp4 = _int4_weight(N, K, 73)
    ws4 = torch.rand(N, 9, generator=_gen(74)).to(DEVICE) * 0.01
    _close(tk._cuda_w4a8_linear(x, wp4, ws4, 8, None), reference.w4a8_linear_ref(x, wp4, ws4, 8, None))
    qw2, wp2 = _wxa8_weight(N, K, 2, 76)
    act = _static_args(qw2, 0.02, 3)
    _close(tk._cuda_wxa8_linear(x, wp2, ws, 2, *act, None), reference.wxa8_linear_ref(x, wp2, ws, 2, *act, None))
    _, wp, scale, zero = _wo_weight(N, K, 3, 24, 75)
    _close(
        tk._cuda_weight_only_linear(x, wp, scale, zero, 3, 24, None),
        reference.weight_only_linear_ref(x, wp, scale, zero, 3, 24, None),
    )


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-only behaviour")
def test_register_is_a_noop_without_cuda():
    assert tk.register() is False


def test_import_without_triton_does_not_fail():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import effalg.kernels.triton as t\n"
        "assert t.HAS_TRITON is False and t.register() is False\n"
        "assert not hasattr(t, 'triton_w8a8_linear')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_register_installs_cuda_kernels_for_every_op():
    # In a subprocess (the dispatcher registry is process-global): pretend CUDA is present and check that every
    # op gets a CUDA kernel. Nothing runs on CUDA here.
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "import effalg.kernels.triton as t\n"
        "assert t.register() is True and t.register() is True\n"
        "for op in ('quantize_per_token', 'int8_scaled_mm', 'w8a8_linear', 'w4a8_linear', 'wxa8_linear',\n"
        "           'weight_only_linear'):\n"
        "    assert torch._C._dispatch_has_kernel_for_dispatch_key(f'effalg::{op}', 'CUDA'), op\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
