"""The fast CPU implementations against the plain-PyTorch references, on realistic shapes."""

import pytest
import torch

import effalg.kernels as K
from effalg.kernels import cpu, reference
from effalg.kernels.weight_only_cpu import weight_only_linear_torch

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# Relative to max|ref|: the CPU path rounds the GEMM result to the output dtype once before the per-token scale.
TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-9}
SHAPES = [(1, 64, 96), (7, 1152, 96), (64, 1152, 4608), (300, 64, 4608), (33, 72, 40)]


@pytest.fixture(autouse=True)
def _onednn_int8_layout(monkeypatch):
    """Exercise the prepacked-weight layout on every CPU where oneDNN's int8 linear is exact (VNNI or AMX; by default
    it is used only where AMX makes it fast). On AVX2-only CPUs prepacking is refused and the plain layout runs."""
    monkeypatch.setenv("EFFALG_CPU_ONEDNN_INT8", "1")


def _rel(out, ref):
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group_size", [0, 8, 64])
def test_quantize_per_token_bit_exact(dtype, group_size):
    x = torch.randn(3, 17, 192).to(dtype) * 4
    x[0, 0] = 0  # an all-zero token gets the floor scale
    x[1, 2, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5]).to(dtype)  # ties
    q, s = cpu.quantize_per_token_cpu(x, group_size)
    q_ref, s_ref = reference.quantize_per_token_ref(x, group_size)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("M,Kd,N", SHAPES)
@pytest.mark.parametrize("prepacked", [False, True])
def test_w8a8_linear_matches_reference(dtype, M, Kd, N, prepacked):
    x = torch.randn(M, Kd).to(dtype)
    w = torch.randint(-127, 128, (N, Kd), dtype=torch.int8)
    w_scale = torch.rand(N) * 0.01 + 1e-3
    bias = torch.randn(N).to(dtype) if M % 2 else None
    wl = K.prepack_int8_weight(w) if prepacked else w
    out = cpu.w8a8_linear_cpu(x, wl, w_scale, bias)
    ref = reference.w8a8_linear_ref(x, w, w_scale, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    assert _rel(out, ref) <= TOL[dtype]


def test_dispatch_reaches_cpu_kernels_for_plain_and_prepacked(monkeypatch):
    """torch.ops.effalg.* on CPU tensors runs the fast path (not the reference), for both weight layouts."""
    x = torch.randn(5, 64)
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    s = torch.rand(24)
    out_plain = K.w8a8_linear(x, w, s)
    out_packed = K.w8a8_linear(x, K.prepack_int8_weight(w), s)
    assert torch.equal(out_plain, cpu.w8a8_linear_cpu(x, w, s, None))
    assert torch.equal(out_plain, out_packed)  # same numbers whatever the layout


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_scaled_mm_int32_part_exact(dtype):
    a = torch.randint(-128, 128, (40, 1152), dtype=torch.int8)
    w = torch.randint(-128, 128, (96, 1152), dtype=torch.int8)
    ones_a, ones_w = torch.ones(40, 1), torch.ones(96)
    exact = a.double() @ w.double().t()
    for wl in (w, K.prepack_int8_weight(w)):
        out = cpu.int8_scaled_mm_cpu(a, ones_a, wl, ones_w, None, torch.float32)
        assert torch.equal(out.double(), exact)  # |acc| < 2**24 here, so fp32 holds it exactly


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("M,Kd,N", [(1, 64, 96), (64, 1152, 256), (33, 72, 40)])
def test_w4a8_linear_matches_reference(dtype, group_size, M, Kd, N):
    if group_size and Kd % group_size:
        pytest.skip("group must divide K")
    x = torch.randn(M, Kd).to(dtype)
    q = torch.randint(-8, 8, (N, Kd), dtype=torch.int8)
    w = K.pack_int4_symmetric(q)
    G = 1 if group_size == 0 else Kd // group_size
    scale = torch.rand(N, G) * 0.01 + 1e-3
    bias = torch.randn(N).to(dtype)
    out = cpu.w4a8_linear_cpu(x, w, scale, group_size, bias)
    ref = reference.w4a8_linear_ref(x, w, scale, group_size, bias)
    assert out.dtype == dtype
    assert _rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 64])
@pytest.mark.parametrize("M", [1, 37])
def test_weight_only_linear_matches_reference(dtype, bits, group_size, M):
    Kd, N = 256, 192
    x = torch.randn(M, Kd).to(dtype)
    codes = torch.randint(0, 2**bits, (N, Kd), dtype=torch.uint8)
    w = K.pack_bits(codes, bits)
    G = 1 if group_size == 0 else Kd // group_size
    scale = (torch.rand(N, G) * 0.02 + 1e-3).to(dtype)
    zero = torch.full((N, G), 2 ** (bits - 1), dtype=dtype)
    out = weight_only_linear_torch(x, w, scale, zero, bits, group_size, None)  # the fallback the native path mirrors
    ref = reference.weight_only_linear_ref(x, w, scale, zero, bits, group_size, None)
    assert _rel(out, ref) <= 4 * TOL[dtype]  # float GEMM in the activation dtype


def test_w8a8_linear_batched_leading_dims():
    x = torch.randn(2, 5, 3, 64, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    s = torch.rand(32)
    out = K.w8a8_linear(x, K.prepack_int8_weight(w), s)
    ref = reference.w8a8_linear_ref(x, w, s)
    assert out.shape == (2, 5, 3, 32)
    assert _rel(out, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantizer_bit_exact_on_large_inputs(dtype):
    """Inputs above FUSED_QUANT_MIN_NUMEL take the inductor-fused path; it must equal the reference bit for bit."""
    x = torch.randn(129, 1152).to(dtype) * 3
    assert x.numel() >= cpu.FUSED_QUANT_MIN_NUMEL
    q, s = cpu.quantize_per_token_cpu(x)
    q_ref, s_ref = reference.quantize_per_token_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_prepacking_only_where_onednn_int8_is_fast(monkeypatch):
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    monkeypatch.setenv("EFFALG_CPU_ONEDNN_INT8", "0")
    assert K.prepack_int8_weight(w) is w  # plain layout: torch._int_mm path
    monkeypatch.setenv("EFFALG_CPU_ONEDNN_INT8", "1")
    packed = K.prepack_int8_weight(w)
    assert (packed is not w) == cpu.onednn_int8_exact()  # forcing never prepacks where oneDNN int8 saturates
    assert torch.equal(K.unpack_int8_weight(packed), w)
    monkeypatch.delenv("EFFALG_CPU_ONEDNN_INT8")
    from effalg.kernels.cpu import onednn_int8_available

    assert onednn_int8_available() == bool(torch.cpu._is_amx_tile_supported())  # default: only with AMX


def test_onednn_int8_is_exact_where_it_is_used():
    """Full-range int8 weights through the prepacked path equal the exact product (no int16 saturation)."""
    a = torch.randint(-127, 128, (8, 256), dtype=torch.int8)
    w = torch.full((16, 256), 127, dtype=torch.int8)
    w[::2] = -127
    out = cpu.int8_scaled_mm_cpu(a, torch.ones(8, 1), K.prepack_int8_weight(w), torch.ones(16), None, torch.float32)
    assert torch.equal(out.double(), a.double() @ w.double().t())


def _wxa8_weight(N, Kd, bits):
    lo = -(2 ** (bits - 1))
    q = torch.randint(lo, -lo, (N, Kd), dtype=torch.int8)
    w = {2: K.pack_int2_symmetric, 4: K.pack_int4_symmetric, 8: lambda t: t}[bits](q)
    return q, w


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("M,Kd,N", [(1, 64, 96), (64, 1152, 256), (33, 70, 40)])
def test_wxa8_linear_matches_reference(dtype, bits, static, M, Kd, N):
    x = (torch.randn(M, Kd) * 2).to(dtype)
    q, w = _wxa8_weight(N, Kd, bits)
    w_scale = torch.rand(N) * 0.01 + 1e-3
    act = (torch.tensor([0.03]), torch.tensor([-9], dtype=torch.int32), K.weight_rowsum(q)) if static else (None,) * 3
    bias = torch.randn(N).to(dtype) if M % 2 else None
    out = cpu.wxa8_linear_cpu(x, w, w_scale, bits, *act, bias)
    ref = reference.wxa8_linear_ref(x, w, w_scale, bits, *act, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    assert _rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("bits", [2, 8])
def test_wxa8_static_codes_bit_exact_and_int32_exact(bits):
    """The fused static quantizer (large inputs) equals the reference codes; integer inputs with unit scales give
    the exact integer product through the zero-point correction."""
    x = torch.randn(129, 1152) * 3
    assert x.numel() >= cpu.FUSED_QUANT_MIN_NUMEL
    s, z = torch.tensor([0.02]), torch.tensor([17], dtype=torch.int32)
    assert torch.equal(cpu._quantize_static_rows(x, s, z), reference.quantize_static_ref(x, s, z))
    xi = torch.randint(-128 - 17, 128 - 17, (9, 200))
    q, w = _wxa8_weight(24, 200, bits)
    out = K.wxa8_linear(xi.float(), w, torch.ones(24), bits, torch.ones(1), z, K.weight_rowsum(q))
    assert torch.equal(out.double(), xi.double() @ q.double().t())


@pytest.mark.parametrize("bits,Kd", [(4, 2048), (4, 1030), (2, 2048), (2, 1027)])
def test_wxa8_fused_weight_unpack_bit_exact(bits, Kd):
    """2/4-bit codes unpacked per call in one fused pass over machine words (or the reference where K does not fit
    the word layout) are the packed codes."""
    q, w = _wxa8_weight(300, Kd, bits)
    assert torch.equal(cpu._unpack_codes(w, bits, Kd), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("static", [False, True])
def test_wxa8_conv2d_cpu_equals_unfold_path(bits, static):
    """The CPU conv path (static codes quantized before an int8 unfold, dynamic scales from a max-pool, ``qw @ cols``
    and an NCHW epilogue) equals ``F.unfold`` + ``wxa8_linear_cpu`` bit for bit, on sizes that take the fused passes,
    and the float64 reference within rounding."""
    import torch.nn.functional as F

    C, N, geo = 64, 80, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    x = (torch.randn(2, C, 40, 37) * 2).to(torch.bfloat16)
    q, w = _wxa8_weight(N, C * 6, bits)
    w_scale, bias = torch.rand(N) * 0.01 + 1e-3, torch.randn(N).to(torch.bfloat16)
    act = (torch.tensor([0.03]), torch.tensor([-9], dtype=torch.int32), K.weight_rowsum(q)) if static else (None,) * 3
    y = cpu.wxa8_conv2d_cpu(x, w, w_scale, bits, *act, bias, *geo.values())
    cols = F.unfold(x, geo["kernel_size"], geo["dilation"], geo["padding"], geo["stride"]).transpose(1, 2)
    assert cols.shape[1] * N * 2 >= cpu.FUSED_QUANT_MIN_NUMEL
    rows = cpu.wxa8_linear_cpu(cols, w, w_scale, bits, *act, bias).transpose(1, 2).reshape(y.shape)
    ref = reference.wxa8_linear_ref(cols, w, w_scale, bits, *act, bias).transpose(1, 2).reshape(y.shape)
    assert y.is_contiguous() and y.dtype == torch.bfloat16
    assert torch.equal(y, rows)
    assert _rel(y, ref) <= TOL[torch.bfloat16]


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("has_bias", [False, True])
def test_int8_linear_row_chunks_and_fused_epilogue(monkeypatch, dtype, has_bias):
    """Large inputs run in row chunks (quantize, GEMM, one fused epilogue pass each) into one output: the same bits as
    one chunk, for plain and prepacked weights alike, and (bf16) as the eager epilogue of small inputs."""
    M, Kd, N = 520, 64, 1024
    x = torch.randn(M, Kd).to(dtype) * 3
    w = torch.randint(-127, 128, (N, Kd), dtype=torch.int8)
    w_scale = torch.rand(N) * 0.01 + 1e-3
    bias = torch.randn(N).to(dtype) if has_bias else None
    whole = cpu.w8a8_linear_cpu(x, w, w_scale, bias)
    monkeypatch.setattr(cpu, "INT8_MM_CHUNK_NUMEL", 128 * N)
    chunks = cpu._row_chunks(M, N)
    assert len(chunks) == 5 and (chunks[0].stop - chunks[0].start) * N >= cpu.FUSED_QUANT_MIN_NUMEL  # fused chunks
    out = cpu.w8a8_linear_cpu(x, w, w_scale, bias)
    assert torch.equal(_bits(out), _bits(whole))
    assert torch.equal(_bits(cpu.w8a8_linear_cpu(x, K.prepack_int8_weight(w), w_scale, bias)), _bits(out))
    q, s = cpu.quantize_per_token_cpu(x)
    for sa in (s, None):  # int8_scaled_mm, with and without the per-token scale
        y = cpu.int8_scaled_mm_cpu(q, sa, w, w_scale, bias, dtype)
        assert torch.equal(
            _bits(y), _bits(cpu.int8_scaled_mm_cpu(q, sa, K.prepack_int8_weight(w), w_scale, bias, dtype))
        )
        if sa is not None:
            assert torch.equal(_bits(y), _bits(out))
    monkeypatch.setattr(cpu, "FUSED_QUANT_MIN_NUMEL", 1 << 62)  # everything eager
    eager = cpu.w8a8_linear_cpu(x, w, w_scale, bias)
    if dtype == torch.bfloat16 or bias is None:  # bf16 products are exact in fp32; without bias no add follows
        assert torch.equal(_bits(out), _bits(eager))
    else:  # the eager fp32 addcmul fuses the multiply-add, the fused pass rounds the product to fp32 first
        assert _rel(out, eager) <= (2**-22 if dtype == torch.float32 else 2**-10)
    assert _rel(out, reference.w8a8_linear_ref(x, w, w_scale, bias)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a8_per_channel_row_chunks(monkeypatch, dtype):
    M, Kd, N = 300, 64, 1024
    x = torch.randn(M, Kd).to(dtype)
    w = K.pack_int4_symmetric(torch.randint(-8, 8, (N, Kd), dtype=torch.int8))
    scale, bias = torch.rand(N, 1) * 0.01 + 1e-3, torch.randn(N).to(dtype)
    whole = cpu.w4a8_linear_cpu(x, w, scale, 0, bias)
    monkeypatch.setattr(cpu, "INT8_MM_CHUNK_NUMEL", 128 * N)
    assert len(cpu._row_chunks(M, N)) == 3 and 100 * N >= cpu.FUSED_QUANT_MIN_NUMEL
    out = cpu.w4a8_linear_cpu(x, w, scale, 0, bias)
    assert torch.equal(out, whole)
    assert _rel(out, reference.w4a8_linear_ref(x, w, scale, 0, bias)) <= TOL[dtype]


def test_round_to_bf16_matches_the_cast():
    y = torch.randn(4096) * torch.logspace(-44, 38, 4096)
    y[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4028235e38, 1e-45, 1.0 + 2**-8])
    ref = y.to(torch.bfloat16).float()
    out = cpu._round_to_bf16(y)
    assert torch.equal(out.isnan(), ref.isnan())
    keep = ~ref.isnan()
    assert torch.equal(out[keep].view(torch.int32), ref[keep].view(torch.int32))
