"""CPU weight-only linear (``effalg.kernels.weight_only_cpu``): native kernels (AVX-512 and portable), the PyTorch
fallback, the runtime layouts (blocked, int4pack) and the packed op, all against the float64 reference."""

import logging

import pytest
import torch

import effalg.kernels as K
from effalg.kernels import reference
from effalg.kernels import weight_only_cpu as woc

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# Relative to max|ref|. Decode paths: exact products, fp32 sums, one rounding to the output dtype. Prefill paths
# round the dequantized weight to the activation dtype first (as the PyTorch fallback), int4pack also the scales.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2**-6, torch.float16: 2**-8}
NATIVE = woc.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="native weight-only CPU kernels could not be built here")


def _rel(out, ref):
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["fast", "portable"])
def isa(request, monkeypatch):
    """Native kernels with the AVX-512 VBMI/BF16 paths (where the CPU has them) and forced portable loops."""
    if not NATIVE:
        pytest.skip("native weight-only CPU kernels could not be built here")
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_PORTABLE", "1" if request.param == "portable" else "0")
    return request.param


def _problem(M, N, Kd, bits, group_size, dtype, bias=True, lead=()):
    G = 1 if group_size == 0 else Kd // group_size
    w = K.pack_bits(torch.randint(0, 2**bits, (N, Kd), dtype=torch.uint8), bits)
    scale = torch.rand(N, G) * 0.02 + 1e-3
    zero = torch.rand(N, G) * (2**bits - 1)  # asymmetric, non-integer zero points
    b = torch.randn(N).to(dtype) if bias else None
    x = torch.randn(*lead, M, Kd).to(dtype)
    return x, w, scale, zero, b


# K not a multiple of 8 / 32 / 128, N not a multiple of 16, group sizes the AVX-512 paths take (multiples of 32, one
# group) and ones they leave to the portable loops (8, 24, 20).
CANONICAL = [
    (1, 4, 64, 128, 3, 32),
    (2, 3, 48, 256, 4, 128),
    (3, 1, 40, 200, 3, 0),
    (4, 8, 33, 96, 4, 32),
    (5, 1, 17, 10, 3, 0),
    (6, 9, 70, 512, 3, 64),  # first M of the tiled prefill path
    (7, 40, 37, 384, 4, 128),
    (8, 2, 16, 100, 3, 20),
    (9, 12, 24, 72, 3, 24),
    (10, 3, 16, 64, 8, 16),
    (11, 20, 19, 40, 8, 0),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", CANONICAL, ids=lambda c: f"c{c[0]}")
def test_canonical_matches_reference(case, dtype, isa):
    _, M, N, Kd, bits, gs = case
    x, w, scale, zero, bias = _problem(M, N, Kd, bits, gs, dtype, bias=case[0] % 2 == 1)
    out = K.weight_only_linear(x, w, scale, zero, bits, gs, bias)
    ref = reference.weight_only_linear_ref(x, w, scale, zero, bits, gs, bias)
    assert out.dtype == dtype and out.shape == ref.shape
    assert _rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", FLOATS)
def test_canonical_decode_is_exact_up_to_output_rounding(dtype, isa):
    """M <= GEMV_MAX_M: exact products with fp32 sums, so the output is the reference rounded (up to fp32 sums)."""
    x, w, scale, zero, bias = _problem(3, 64, 256, 3, 128, dtype)
    out = K.weight_only_linear(x, w, scale, zero, 3, 128, bias)
    ref64 = reference.weight_only_linear_ref(x.double(), w, scale, zero, 3, 128, bias).double()
    assert float((out.double() - ref64).abs().max() / ref64.abs().max()) <= {torch.float32: 1e-6}.get(dtype, 2**-8)


def test_canonical_batched_leading_dims_and_empty(isa):
    x, w, scale, zero, bias = _problem(3, 48, 96, 4, 32, torch.bfloat16, lead=(2, 5))
    out = K.weight_only_linear(x, w, scale, zero, 4, 32, bias)
    assert out.shape == (2, 5, 3, 48)
    assert _rel(out, reference.weight_only_linear_ref(x, w, scale, zero, 4, 32, bias)) <= TOL[torch.bfloat16]
    empty = K.weight_only_linear(x[:, :0], w, scale, zero, 4, 32, bias)
    assert empty.shape == (2, 0, 3, 48)


def test_bf16_qparams_are_used_exactly(isa):
    x, w, scale, zero, _ = _problem(2, 32, 64, 3, 32, torch.bfloat16, bias=False)
    s16, z16 = scale.bfloat16(), zero.bfloat16()
    out = K.weight_only_linear(x, w, s16, z16, 3, 32)
    assert _rel(out, reference.weight_only_linear_ref(x, w, s16, z16, 3, 32)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("M", [1, 20])
def test_pytorch_fallback_forced(M, monkeypatch):
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_NATIVE", "0")
    assert not woc.native_available()
    x, w, scale, zero, bias = _problem(M, 40, 200, 3, 0, torch.bfloat16)
    out = K.weight_only_linear(x, w, scale, zero, 3, 0, bias)
    assert torch.equal(out, woc.weight_only_linear_torch(x, w, scale, zero, 3, 0, bias))
    assert _rel(out, reference.weight_only_linear_ref(x, w, scale, zero, 3, 0, bias)) <= TOL[torch.bfloat16]
    assert K.weight_only_cpu_layout(3, 64, 256, 128) is None  # nothing to prepack for W3 without native kernels


def test_build_failure_warns_and_falls_back(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(woc, "_native", None)
    with caplog.at_level(logging.WARNING, logger="effalg.kernels.weight_only_cpu"):
        assert not woc.native_available()
    assert "native CPU weight-only kernels unavailable" in caplog.text and "no C++ compiler" in caplog.text
    x, w, scale, zero, bias = _problem(2, 16, 64, 4, 32, torch.float32)
    out = woc.weight_only_linear_cpu(x, w, scale, zero, 4, 32, bias)
    assert _rel(out, reference.weight_only_linear_ref(x, w, scale, zero, 4, 32, bias)) <= TOL[torch.float32]


# ----------------------------------------------------------------------------------------------- runtime layouts

BLOCKED = [  # (M, N, K, bits, group_size): decode, the fused kernel's M blocks, tiled prefill (M > FUSED_MAX_M)
    (1, 64, 128, 3, 32),
    (1, 37, 256, 4, 128),
    (2, 5, 7, 3, 0),
    (3, 40, 200, 3, 0),
    (13, 50, 384, 3, 64),
    (26, 20, 11, 4, 0),
    (33, 48, 96, 4, 32),
    (70, 100, 136, 3, 8),
]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("N,Kd", [(1, 1), (5, 7), (16, 32), (37, 100), (64, 129)])
def test_blocked_layout_roundtrip_and_matches_torch_ops(bits, N, Kd):
    w = K.pack_bits(torch.randint(0, 2**bits, (N, Kd), dtype=torch.uint8), bits)
    wb = K.prepack_weight_only(w, "blocked", bits, N, Kd)
    assert wb.dtype == torch.uint8 and wb.dim() == 1
    assert torch.equal(wb, woc._to_blocked_torch(w, bits, N, Kd))
    assert torch.equal(K.unpack_weight_only(wb, "blocked", bits, N, Kd), w)
    assert torch.equal(woc._from_blocked_torch(wb, bits, N, Kd), w)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", BLOCKED, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-w{c[3]}-g{c[4]}")
def test_blocked_matches_reference(case, dtype, isa):
    M, N, Kd, bits, gs = case
    x, w, scale, zero, bias = _problem(M, N, Kd, bits, gs, dtype, bias=M % 2 == 1)
    wb = K.prepack_weight_only(w, "blocked", bits, N, Kd)
    out = K.weight_only_linear_packed(x, wb, scale, zero, bits, gs, "blocked", N, bias)
    ref = reference.weight_only_linear_ref(x, w, scale, zero, bits, gs, bias)
    assert out.dtype == dtype and out.shape == ref.shape
    assert _rel(out, ref) <= TOL[dtype]


def test_blocked_without_native_kernels_uses_pytorch(monkeypatch):
    x, w, scale, zero, bias = _problem(3, 20, 64, 3, 32, torch.bfloat16)
    wb = woc._to_blocked_torch(w, 3, 20, 64)
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_NATIVE", "0")
    out = K.weight_only_linear_packed(x, wb, scale, zero, 3, 32, "blocked", 20, bias)
    assert torch.equal(out, woc.weight_only_linear_torch(x, w, scale, zero, 3, 32, bias))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("M,gs,bias", [(1, 128, True), (5, 32, False), (40, 256, True)])
def test_int4pack_matches_reference(M, gs, bias, dtype):
    if not woc._int4pack_supported():
        pytest.skip("torch's CPU int4pack kernels are unavailable")
    N, Kd = 128, 256
    x, w, scale, zero, b = _problem(M, N, Kd, 4, gs, dtype, bias=bias)
    wp = K.prepack_weight_only(w, "int4pack", 4, N, Kd)
    assert torch.equal(K.unpack_weight_only(wp, "int4pack", 4, N, Kd), w)
    out = K.weight_only_linear_packed(x, wp, scale, zero, 4, gs, "int4pack", N, b)
    ref = reference.weight_only_linear_ref(x, w, scale, zero, 4, gs, b)
    # fp32 activations: fp32 scales and zeros (8 - zero) * scale, exact up to rounding; bf16 / fp16: in that dtype
    assert _rel(out, ref) <= {torch.float32: 1e-5}.get(dtype, 2 * TOL[dtype])


def test_layout_choice_and_override(monkeypatch):
    if NATIVE and woc._fast_isa():  # the canonical kernels are the fast path: nothing to prepack
        assert K.weight_only_cpu_layout(3, 4096, 4096, 128) is None
        assert K.weight_only_cpu_layout(4, 4096, 4096, 128) is None
    assert K.weight_only_cpu_layout(8, 4096, 4096, 128) is None
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_LAYOUT", "blocked")
    assert K.weight_only_cpu_layout(3, 4096, 4096, 128) == ("blocked" if NATIVE else None)
    assert K.weight_only_cpu_layout(3, 64, 99, 33) is None  # odd group size: no k-pair chunks
    assert K.weight_only_cpu_layout(8, 64, 64, 32) is None
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_LAYOUT", "canonical")
    assert K.weight_only_cpu_layout(4, 4096, 4096, 128) is None
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_LAYOUT", "int4pack")
    assert K.weight_only_cpu_layout(4, 4096, 4096, 128) == ("int4pack" if woc._int4pack_supported() else None)
    assert K.weight_only_cpu_layout(4, 96, 4096, 128) is None  # N % 64
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_LAYOUT", "bogus")
    with pytest.raises(ValueError, match="EFFALG_CPU_WEIGHT_ONLY_LAYOUT"):
        K.weight_only_cpu_layout(4, 64, 64, 32)


def test_without_fast_kernels_w4_prepacks_for_torch_int4(monkeypatch):
    if not woc._int4pack_supported():
        pytest.skip("torch's CPU int4pack kernels are unavailable")
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_NATIVE", "0")
    assert K.weight_only_cpu_layout(4, 128, 256, 128) == "int4pack"
    assert K.weight_only_cpu_layout(4, 96, 256, 128) is None


def test_packed_op_errors_name_the_argument():
    x, w, scale, zero, _ = _problem(1, 32, 64, 3, 32, torch.float32, bias=False)
    wb = K.prepack_weight_only(w, "blocked", 3, 32, 64)
    with pytest.raises(ValueError, match="weight_only_linear_packed: layout"):
        K.weight_only_linear_packed(x, wb, scale, zero, 3, 32, "nope", 32)
    with pytest.raises(ValueError, match="weight_only_linear_packed: w is not a blocked"):
        K.weight_only_linear_packed(x, wb[:-1], scale, zero, 3, 32, "blocked", 32)
    with pytest.raises(ValueError, match="weight_only_linear_packed: scale must have shape"):
        K.weight_only_linear_packed(x, wb, scale[:, :1], zero, 3, 32, "blocked", 32)
    with pytest.raises(ValueError, match="prepack_weight_only: int4pack"):
        K.prepack_weight_only(K.pack_bits(torch.zeros(48, 64, dtype=torch.uint8), 4), "int4pack", 4, 48, 64)
    with pytest.raises(ValueError, match="prepack_weight_only: w must have shape"):
        K.prepack_weight_only(w[:, :-1], "blocked", 3, 32, 64)


def test_packed_op_fake_and_compile():
    x, w, scale, zero, bias = _problem(2, 32, 64, 3, 32, torch.bfloat16)
    wb = K.prepack_weight_only(w, "blocked", 3, 32, 64)
    fn = torch.compile(
        lambda x: K.weight_only_linear_packed(x, wb, scale, zero, 3, 32, "blocked", 32, bias),
        backend="eager",
        fullgraph=True,
    )
    out = fn(x)
    assert torch.equal(out, K.weight_only_linear_packed(x, wb, scale, zero, 3, 32, "blocked", 32, bias))
    meta = torch.ops.effalg.weight_only_linear_packed(
        x.to("meta"), wb.to("meta"), scale, zero, 3, 32, "blocked", 32, None
    )
    assert meta.shape == (2, 32) and meta.dtype == torch.bfloat16


@pytest.mark.parametrize("M", [1, 70])
def test_inference_mode_and_autograd_inputs(M, isa):
    """The tiled paths call ATen from worker threads: the caller's grad / inference mode must reach them."""
    x, w, scale, zero, bias = _problem(M, 64, 128, 3, 32, torch.bfloat16)
    wb = K.prepack_weight_only(w, "blocked", 3, 64, 128)
    ref = reference.weight_only_linear_ref(x, w, scale, zero, 3, 32, bias)
    with torch.inference_mode():
        xi = x.clone()
        outs = [K.weight_only_linear(xi, w, scale, zero, 3, 32, bias)]
        outs.append(K.weight_only_linear_packed(xi, wb, scale, zero, 3, 32, "blocked", 64, bias))
    xg = x.clone().requires_grad_(True)
    outs.append(K.weight_only_linear(xg, w, scale, zero, 3, 32, bias))
    outs.append(K.weight_only_linear_packed(xg, wb, scale, zero, 3, 32, "blocked", 64, bias))
    for out in outs:
        assert _rel(out.detach(), ref) <= TOL[torch.bfloat16]


def test_stale_build_lock_is_removed(tmp_path, monkeypatch):
    """A lock left by a killed build would make torch wait forever; an old one is removed, a fresh one kept."""
    import os
    import time

    from effalg.kernels import weight_only_cpu as woc

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(woc._EXT_NAME, False), "lock")
    open(lock, "w").close()
    woc._clear_stale_lock()
    assert os.path.exists(lock)  # fresh: a build may be running
    old = time.time() - woc.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    woc._clear_stale_lock()
    assert not os.path.exists(lock)
