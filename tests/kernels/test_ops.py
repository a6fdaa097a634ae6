"""The validating wrappers: bad input names the argument; the accumulation limit; torch.compile tracing."""

import pytest
import torch

import effalg.kernels as K
from effalg.kernels import reference


@pytest.fixture(autouse=True)
def _onednn_int8_layout(monkeypatch):
    """Exercise the prepacked-weight layout on every CPU (by default it is used only where AMX makes it fast)."""
    monkeypatch.setenv("EFFALG_CPU_ONEDNN_INT8", "1")


def _w8():
    return torch.randint(-127, 128, (24, 64), dtype=torch.int8), torch.rand(24)


def test_max_int8_k_is_the_int32_limit():
    assert K.MAX_INT8_K * 128 * 128 <= 2**31 - 1 < (K.MAX_INT8_K + 1) * 128 * 128


def test_k_above_limit_raises():
    Kd = K.MAX_INT8_K + 1
    a = torch.zeros(1, Kd, dtype=torch.int8)
    w = torch.zeros(1, Kd, dtype=torch.int8)
    with pytest.raises(ValueError, match="MAX_INT8_K"):
        K.int8_scaled_mm(a, torch.ones(1, 1), w, torch.ones(1))


def test_k_at_limit_worst_case_is_exact():
    Kd = K.MAX_INT8_K
    a = torch.full((1, Kd), -128, dtype=torch.int8)
    w = torch.full((1, Kd), -128, dtype=torch.int8)
    out = K.int8_scaled_mm(a, torch.ones(1, 1), w, torch.ones(1), out_dtype=torch.float32)
    exact = Kd * 128 * 128  # 2147467264 < 2**31: no overflow, and exactly representable in fp32? check via double
    assert abs(float(out) - exact) <= exact * 2**-23  # fp32 rounding of the exact int32 sum only
    assert float(out) > 0  # an int32 overflow would wrap negative


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda w, s: K.w8a8_linear(torch.randn(3, 64, dtype=torch.float64), w, s), "x must have dtype"),
        (lambda w, s: K.w8a8_linear(torch.randn(3, 63), w, s), r"w must be int8 \[N, K\]"),
        (lambda w, s: K.w8a8_linear(torch.randn(3, 64), w.float(), s), "w must have dtype"),
        (lambda w, s: K.w8a8_linear(torch.randn(3, 64), w, s.double()), "w_scale must have dtype"),
        (lambda w, s: K.w8a8_linear(torch.randn(3, 64), w, s[:5]), r"w must be int8 \[N, K\]"),
        (lambda w, s: K.w8a8_linear(torch.randn(3, 64), w, s, torch.randn(5)), "bias must have shape"),
        (lambda w, s: K.w8a8_linear("x", w, s), "x must be a torch.Tensor"),
        (lambda w, s: K.quantize_per_token(torch.randn(3, 64), 7), "group_size=7 must divide"),
        (lambda w, s: K.quantize_per_token(torch.randn(3, 64), -1), "group_size must be a non-negative int"),
        (lambda w, s: K.int8_scaled_mm(torch.zeros(2, 64, dtype=torch.int8), torch.ones(3, 1), w, s), "a_scale"),
        (lambda w, s: K.int8_scaled_mm(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 1), w, s, out_dtype=torch.int32), "out_dtype"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    w, s = _w8()
    with pytest.raises((ValueError, TypeError), match=match):
        call(w, s)


def test_w4a8_bad_inputs():
    x = torch.randn(2, 64)
    w = K.pack_int4_symmetric(torch.zeros(8, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="w_scale must have shape"):
        K.w4a8_linear(x, w, torch.ones(8, 3), 0)
    with pytest.raises(ValueError, match="group_size=24 must divide"):
        K.w4a8_linear(x, w, torch.ones(8, 2), 24)
    with pytest.raises(ValueError, match=r"w must have shape \(N, ceil\(K / 2\)\)"):
        K.w4a8_linear(torch.randn(2, 32), w, torch.ones(8, 1), 0)
    with pytest.raises(TypeError, match="w must have dtype"):
        K.w4a8_linear(x, w.to(torch.int8), torch.ones(8, 1), 0)


def test_weight_only_bad_bits_lists_allowed():
    x = torch.randn(2, 64)
    w = K.pack_bits(torch.zeros(8, 64, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"bits must be one of \(3, 4, 8\)"):
        K.weight_only_linear(x, w, torch.ones(8, 1), torch.zeros(8, 1), 2)
    w4 = K.pack_bits(torch.zeros(8, 64, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="zero must have shape"):
        K.weight_only_linear(x, w4, torch.ones(8, 1), torch.zeros(8, 2), 4)


def _wxa8(bits=2, N=8, Kd=64):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, Kd), dtype=torch.int8)
    w = {2: K.pack_int2_symmetric, 4: K.pack_int4_symmetric, 8: lambda t: t}[bits](q)
    return q, w, torch.rand(N) * 0.01 + 1e-3


def test_wxa8_bad_inputs_name_the_argument():
    x = torch.randn(2, 64)
    q, w, s = _wxa8()
    a_s, a_z, rs = torch.tensor([0.1]), torch.tensor([3], dtype=torch.int32), K.weight_rowsum(q)
    with pytest.raises(ValueError, match=r"w_bits must be one of \(2, 4, 8\), got 5"):
        K.wxa8_linear(x, w, s, 5)
    with pytest.raises(ValueError, match="w_rowsum .* is required with static activations"):
        K.wxa8_linear(x, w, s, 2, a_s, a_z)
    with pytest.raises(ValueError, match="a_zero requires a_scale"):
        K.wxa8_linear(x, w, s, 2, None, a_z)
    with pytest.raises(ValueError, match="w_rowsum is only used with static"):
        K.wxa8_linear(x, w, s, 2, None, None, rs)
    with pytest.raises(ValueError, match=r"w must have shape \(N, ceil\(K \* 2 / 8\)\) = \(8, 8\)"):
        K.wxa8_linear(torch.randn(2, 32), w, s, 2)
    with pytest.raises(TypeError, match="w must have dtype in \\(int8\\)"):
        K.wxa8_linear(x, w, s, 8)
    with pytest.raises(ValueError, match=r"a_scale must have shape \(1,\)"):
        K.wxa8_linear(x, w, s, 2, torch.ones(2), a_z, rs)
    with pytest.raises(TypeError, match="a_zero must have dtype"):
        K.wxa8_linear(x, w, s, 2, a_s, torch.tensor([3]), rs)
    with pytest.raises(ValueError, match=r"a_zero must be in \[-128, 127\]"):
        K.wxa8_linear(x, w, s, 2, a_s, torch.tensor([200], dtype=torch.int32), rs)
    with pytest.raises(ValueError, match=r"w_rowsum must have shape \(8,\)"):
        K.wxa8_linear(x, w, s, 2, a_s, a_z, rs[:4])
    with pytest.raises(ValueError, match=r"w_scale must have shape \(8,\)"):
        K.wxa8_linear(x, w, s[:4], 2)
    with pytest.raises(TypeError, match="q_w must have dtype"):
        K.weight_rowsum(w)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_wxa8_opcheck_and_fake(bits):
    q, w, s = _wxa8(bits, Kd=70 if bits != 8 else 64)
    x = torch.randn(2, 3, q.shape[1])
    static = (torch.tensor([0.05]), torch.tensor([-4], dtype=torch.int32), K.weight_rowsum(q))
    torch.library.opcheck(torch.ops.effalg.wxa8_linear.default, (x, w, s, bits, None, None, None, torch.randn(8)))
    torch.library.opcheck(torch.ops.effalg.wxa8_linear.default, (x.bfloat16(), w, s, bits, *static, None))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.effalg.wxa8_linear(torch.empty(2, 3, q.shape[1], dtype=torch.float16), w, s, bits, *static, None)
    assert y.shape == (2, 3, 8) and y.dtype == torch.float16


def test_wxa8_compiles_fullgraph():
    torch._dynamo.reset()
    q, w, s = _wxa8(4)
    static = (torch.tensor([0.05]), torch.tensor([7], dtype=torch.int32), K.weight_rowsum(q))
    x = torch.randn(4, 64)

    def f(x):
        return K.wxa8_linear(x, w, s, 4, *static) + K.wxa8_linear(x, w, s, 4)

    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_names_argument():
    w, s = _w8()
    with pytest.raises(ValueError, match="w_scale is on"):
        K.w8a8_linear(torch.randn(3, 64), w, s.cuda())


def test_device_mismatch_meta_vs_cpu():
    w, s = _w8()
    with pytest.raises(ValueError, match="bias is on meta"):
        K.w8a8_linear(torch.randn(3, 64), w, s, torch.randn(24, device="meta"))


@pytest.mark.parametrize("prepacked", [False, True])
def test_torch_compile_fullgraph_w8a8(prepacked):
    torch._dynamo.reset()
    w, s = _w8()
    m = torch.nn.Module()
    m.register_buffer("w", K.prepack_int8_weight(w) if prepacked else w)
    m.register_buffer("s", s)
    x = torch.randn(4, 64)

    def f(x):
        return K.w8a8_linear(x, m.w, m.s) * 2

    out = torch.compile(f, fullgraph=True)(x)
    # Compiled, the CPU op is traced as quantize + GEMM + epilogue and inductor may round the epilogue differently.
    torch.testing.assert_close(out, f(x), rtol=1e-6, atol=1e-5)


def test_torch_compile_fullgraph_all_ops():
    torch._dynamo.reset()
    x = torch.randn(4, 64)
    w4 = K.pack_int4_symmetric(torch.randint(-8, 8, (8, 64), dtype=torch.int8))
    wq = K.pack_bits(torch.randint(0, 8, (8, 64), dtype=torch.uint8), 3)

    def f(x):
        q, s = K.quantize_per_token(x, 16)
        y1 = K.w4a8_linear(x, w4, torch.ones(8, 2), 32)
        y2 = K.weight_only_linear(x, wq, torch.ones(8, 1), torch.zeros(8, 1), 3)
        return q.float().sum() * s.sum() + y1.sum() + y2.sum()

    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x))


def test_fake_kernels_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        y = torch.ops.effalg.w8a8_linear(x, torch.empty(24, 64, dtype=torch.int8), torch.empty(24), None)
        q, s = torch.ops.effalg.quantize_per_token(x, 16)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 4)


def test_reference_is_default_for_unregistered_devices():
    x = torch.randn(3, 64)
    w, s = _w8()
    assert torch.equal(
        torch.ops.effalg.w8a8_linear.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), x, w, s, None
        ),
        reference.w8a8_linear_ref(x, w, s, None),
    )
