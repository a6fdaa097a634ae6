import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from effalg.core.modules import (
    W4A8Linear,
    W8A8Linear,
    WeightOnlyLinear,
    WxA8Linear,
    memory_footprint,
    prepack_model_,
    unpack_model_,
)
from effalg.kernels.cpu import onednn_int8_exact


@pytest.fixture(autouse=True)
def _onednn_int8_layout(monkeypatch):
    """Exercise the prepacked-weight layout on every CPU where oneDNN's int8 linear is exact (VNNI or AMX; by default
    it is used only where AMX makes it fast). Elsewhere ``PREPACKS`` is False and the plain layout is checked."""
    monkeypatch.setenv("EFFALG_CPU_ONEDNN_INT8", "1")


# Whether forcing EFFALG_CPU_ONEDNN_INT8=1 prepacks on this CPU (never on AVX2-only CPUs, where oneDNN saturates).
PREPACKS = onednn_int8_exact()


def _linear(k=32, n=24, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight[0].mul_(5.0)  # an outlier row
        if bias:
            lin.bias.normal_()
    return lin


def _act_quant_f64(x):
    """Per-token symmetric int8 (the kernel contract: fp32 scale, round half to even), dequantized in float64."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(xf / scale).clamp(-127, 127)
    return q.double() * scale.double()


def _weight_fq_f64(w, bits, group_size=0, symmetric=True):
    """Independent float64 fake-quant weight with the same fp32 parameter math as effalg.core."""
    n, k = w.shape
    gs = group_size or k
    wg = w.float().reshape(n, k // gs, gs)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = wg.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
        q = torch.round(wg / scale).clamp(-qmax, qmax)
        return (q.double() * scale.double()).reshape(n, k)
    qmax = 2**bits - 1
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo).clamp(min=1e-8) / qmax
    zero = torch.round(-lo / scale).clamp(0, qmax)
    u = (torch.round(wg / scale) + zero).clamp(0, qmax)
    return ((u.double() - zero.double()) * scale.double()).reshape(n, k)


def _ref_out(x, w_fq, bias, act_quant):
    xd = _act_quant_f64(x) if act_quant else x.double()
    y = xd @ w_fq.t()
    if bias is not None:
        y = y + bias.double()
    return y


# ---- W8A8 -----------------------------------------------------------------------------------------------------


def test_w8a8_matches_f64_reference_prepacked_or_not():
    lin = _linear()
    x = torch.randn(3, 5, 32)
    mod = W8A8Linear.from_float(lin)
    assert mod.is_prepacked == PREPACKS  # CPU: from_float prepacks where oneDNN int8 is exact
    ref = _ref_out(x, _weight_fq_f64(lin.weight, 8), lin.bias, True)
    y = mod(x)
    assert y.shape == (3, 5, 24) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    plain = W8A8Linear.from_float(lin, prepack=False)
    assert not plain.is_prepacked
    # Plain and prepacked layouts go through different CPU GEMMs: equal up to float32 rounding of the epilogue.
    torch.testing.assert_close(plain(x), y, rtol=1e-6, atol=1e-6)
    # qweight codes are exactly the symmetric per-channel int8 codes
    s = lin.weight.abs().amax(1, keepdim=True) / 127
    assert torch.equal(plain.qweight, torch.round(lin.weight / s).clamp(-127, 127).to(torch.int8))
    assert torch.equal(mod.plain_qweight(), plain.qweight)
    unpack_model_(mod)
    assert not mod.is_prepacked and torch.equal(mod.qweight, plain.qweight)
    prepack_model_(mod)
    assert mod.is_prepacked == PREPACKS and torch.equal(mod(x), y)


def test_w8a8_state_dict_plain_layout_and_roundtrip(tmp_path):
    lin = _linear()
    mod = W8A8Linear.from_float(lin)
    sd = mod.state_dict()
    assert list(sd) == ["bias", "qweight", "weight_scale"]
    assert sd["qweight"].dtype == torch.int8 and sd["qweight"].shape == (24, 32)
    assert sd["qweight"].layout == torch.strided
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (24,)
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    sd2 = load_file(str(path))
    for k in sd:
        assert torch.equal(sd[k], sd2[k])
    # meta construction -> to_empty -> load -> prepack_: identical outputs and state dict
    meta = W8A8Linear(32, 24, bias=True, device="meta")
    assert meta.qweight.is_meta and meta.qweight.dtype == torch.int8 and meta.qweight.shape == (24, 32)
    assert meta.weight_scale.dtype == torch.float32 and meta.bias.dtype == torch.float32
    new = meta.to_empty(device="cpu")
    new.load_state_dict(sd2)
    new.prepack_()
    x = torch.randn(4, 32)
    assert torch.equal(new(x), mod(x))
    for k, v in new.state_dict().items():
        assert torch.equal(v, sd[k])
    # load into an already-prepacked module (unpack, copy, prepack again)
    other = W8A8Linear.from_float(_linear(seed=1))
    other.load_state_dict(sd)
    assert other.is_prepacked == PREPACKS and torch.equal(other(x), mod(x))
    # assign=True on a meta module
    m2 = W8A8Linear(32, 24, device="meta")
    m2.load_state_dict(sd, assign=True)
    assert torch.equal(m2.prepack_()(x), mod(x))


def test_w8a8_dtype_and_device_moves_keep_qparams_fp32():
    lin = _linear()
    mod = W8A8Linear.from_float(lin)
    scale = mod.weight_scale.clone()
    mod.to(torch.float16)
    assert mod.weight_scale.dtype == torch.float32 and torch.equal(mod.weight_scale, scale)
    assert mod.bias.dtype == torch.float16 and mod.qweight.dtype == torch.int8 and mod.is_prepacked == PREPACKS
    y16 = mod(torch.randn(2, 32, dtype=torch.float16))
    assert y16.dtype == torch.float16
    mod.half().float()
    assert torch.equal(mod.weight_scale, scale)
    # leaving CPU unpacks first
    mod.to("meta")
    assert not mod.is_prepacked and mod.qweight.is_meta and mod.qweight.shape == (24, 32)
    assert mod.weight_scale.dtype == torch.float32


def test_w8a8_deepcopy_and_pickle_prepacked(tmp_path):
    mod = W8A8Linear.from_float(_linear())
    x = torch.randn(2, 32)
    clone = copy.deepcopy(mod)
    assert clone.is_prepacked == PREPACKS and torch.equal(clone(x), mod(x))
    path = tmp_path / "m.pt"
    torch.save(mod, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded.is_prepacked == PREPACKS and torch.equal(loaded(x), mod(x))


def test_memory_footprint_exact():
    n, k = 24, 32
    w8 = W8A8Linear.from_float(_linear(k, n))
    expected = n * k + 4 * n + 4 * n  # int8 weight, fp32 scale, fp32 bias
    assert memory_footprint(w8) == expected == w8.memory_footprint()
    w8.unpack_()
    assert w8.memory_footprint() == expected
    w4 = W4A8Linear.from_float(_linear(k, n, bias=False), group_size=8)
    assert w4.memory_footprint() == n * k // 2 + 4 * n * (k // 8)
    w3 = WeightOnlyLinear.from_float(_linear(k, n), bits=3, group_size=16)
    qparams = 2 * 4 * n * 2 + 4 * n  # fp32 scale and zero [n, 2], fp32 bias
    if w3.packed_layout == "blocked":  # CPU runtime layout: channels padded to 16, plus 16 bytes
        assert w3.memory_footprint() == -(-n // 16) * 16 * (k * 3 // 8) + 16 + qparams
    w3.unpack_()
    assert w3.memory_footprint() == n * (k * 3 // 8) + qparams
    parent = nn.Sequential(w8, w8)  # shared module counted once
    assert memory_footprint(parent) == expected


# ---- W4A8 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [0, 8])
def test_w4a8_matches_f64_reference(group_size):
    lin = _linear()
    mod = W4A8Linear.from_float(lin, group_size=group_size)
    g = 1 if group_size == 0 else 32 // group_size
    assert mod.qweight.shape == (24, 16) and mod.qweight.dtype == torch.uint8
    assert mod.weight_scale.shape == (24, g) and mod.weight_scale.dtype == torch.float32
    w_fq = _weight_fq_f64(lin.weight, 4, group_size)
    torch.testing.assert_close(mod.dequantize_weight(torch.float64), w_fq, rtol=0, atol=1e-12)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(mod(x).double(), _ref_out(x, w_fq, lin.bias, True), rtol=1e-5, atol=1e-5)


# ---- weight-only --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size,symmetric", [(0, True), (16, True), (16, False)])
def test_weight_only_matches_f64_reference(bits, group_size, symmetric):
    lin = _linear(k=48)
    mod = WeightOnlyLinear.from_float(lin, bits=bits, group_size=group_size, symmetric=symmetric)
    g = 1 if group_size == 0 else 48 // group_size
    qweight = mod.state_dict()["qweight"]  # canonical, whatever CPU runtime layout the module holds
    assert qweight.shape == (24, (48 * bits + 7) // 8) and qweight.dtype == torch.uint8
    assert mod.weight_scale.shape == (24, g) and mod.weight_zero.shape == (24, g)
    w_fq = _weight_fq_f64(lin.weight, bits, group_size, symmetric)
    torch.testing.assert_close(mod.dequantize_weight(torch.float64), w_fq, rtol=0, atol=1e-12)
    x = torch.randn(5, 48)
    torch.testing.assert_close(mod(x).double(), _ref_out(x, w_fq, lin.bias, False), rtol=1e-5, atol=1e-5)
    assert list(mod.state_dict()) == ["bias", "qweight", "weight_scale", "weight_zero"]


def test_meta_construction_then_load_all_types():
    x = torch.randn(3, 32)
    for cls, kw in [
        (W8A8Linear, {}),
        (W4A8Linear, {"group_size": 16}),
        (WeightOnlyLinear, {"bits": 3, "group_size": 8}),
    ]:
        src = cls.from_float(_linear(), **kw)
        meta = cls(32, 24, bias=True, device="meta", dtype=torch.float32, **kw)
        for name, t in src.state_dict().items():
            mt = meta.state_dict()[name]
            assert mt.is_meta and mt.shape == t.shape and mt.dtype == t.dtype, (cls.__name__, name)
        dst = meta.to_empty(device="cpu")
        dst.load_state_dict(src.state_dict())
        prepack_model_(dst)
        assert torch.equal(dst(x), src(x)), cls.__name__


# ---- smooth scale / input transform ------------------------------------------------------------------------------


def test_smooth_scale_folded_into_weight():
    lin = _linear()
    torch.manual_seed(3)
    s = torch.rand(32) + 0.5
    mod = W8A8Linear.from_float(lin, smooth_scale=s)
    assert torch.equal(mod.smooth_scale, s)
    x = torch.randn(4, 32)
    w_fq = _weight_fq_f64(lin.weight / s[None, :], 8)
    ref = _ref_out(x * s, w_fq, lin.bias, True)
    torch.testing.assert_close(mod(x).double(), ref, rtol=1e-5, atol=1e-5)
    # close to the float layer
    y, y_ref = mod(x), lin(x)
    assert (y - y_ref).norm() / y_ref.norm() < 0.02
    sd = mod.state_dict()
    assert list(sd) == ["bias", "smooth_scale", "qweight", "weight_scale"]
    # a module built without smooth_scale accepts a checkpoint that has one
    plain = W8A8Linear(32, 24)
    plain.load_state_dict(sd)
    assert torch.equal(plain.prepack_()(x), mod(x))
    assert "smooth_scale=True" in repr(mod)


class _Rotation(nn.Module):
    def __init__(self, r):
        super().__init__()
        self.register_buffer("r", r)

    def forward(self, x):
        return x @ self.r.to(x.dtype)


def test_input_transform_rotation():
    lin = _linear()
    torch.manual_seed(4)
    r, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    rot = _Rotation(r.float())
    mod = W4A8Linear.from_float(lin, input_transform=rot)
    x = torch.randn(6, 32)
    w_fq = _weight_fq_f64(lin.weight @ r.float(), 4)
    torch.testing.assert_close(mod(x).double(), _ref_out(x @ r.float(), w_fq, lin.bias, True), rtol=1e-5, atol=1e-5)
    assert "input_transform.r" in mod.state_dict()


# ---- validation ---------------------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="in_features must be even"):
        W4A8Linear(31, 8)
    with pytest.raises(ValueError, match=r"in_features \(32\) must be divisible by group_size \(12\)"):
        WeightOnlyLinear(32, 8, group_size=12)
    with pytest.raises(ValueError, match=r"bits must be one of \{3, 4, 8\}"):
        WeightOnlyLinear(32, 8, bits=2)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        W8A8Linear(32, 0)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        W8A8Linear.from_float(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match=r"smooth_scale must have shape \[32\]"):
        W8A8Linear.from_float(_linear(), smooth_scale=torch.ones(31))
    with pytest.raises(ValueError, match="smooth_scale must be finite and > 0"):
        W8A8Linear.from_float(_linear(), smooth_scale=torch.zeros(32))
    with pytest.raises(ValueError, match="meta weights"):
        W8A8Linear.from_float(nn.Linear(4, 4, device="meta"))


def test_extra_repr():
    r = repr(WeightOnlyLinear.from_float(_linear(), bits=4, group_size=8))
    assert "in_features=32" in r and "out_features=24" in r and "w4a16" in r and "group_size=8" in r
    assert f"prepacked={PREPACKS}" in repr(W8A8Linear.from_float(_linear()))


# ---- conv ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=(3, 2), stride=2, padding=(1, 0))]
)
def test_w8a8_conv2d_matches_f64_reference(kw):
    from effalg.core.modules import W8A8Conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, **kw)
    x = torch.randn(2, 6, 7, 8)
    s = torch.rand(6) + 0.5
    mod = W8A8Conv2d.from_float(conv, smooth_scale=s)
    w = conv.weight.detach() / s.reshape(1, -1, 1, 1)
    w_fq = _weight_fq_f64(w.reshape(5, -1), 8)
    cols = torch.nn.functional.unfold(
        x * s.reshape(1, -1, 1, 1), conv.kernel_size, conv.dilation, conv.padding, conv.stride
    )
    ref_rows = _ref_out(cols.transpose(1, 2), w_fq, conv.bias, True)  # [B, L, O]
    y = mod(x)
    ref = conv(x)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), ref_rows.transpose(1, 2).reshape(ref.shape), rtol=1e-5, atol=1e-5)
    assert (y - ref).norm() / ref.norm() < 0.02
    # state dict: plain flattened int8 layout; meta build + load reproduces outputs
    sd = mod.state_dict()
    assert (
        sd["qweight"].shape == (5, 6 * conv.kernel_size[0] * conv.kernel_size[1]) and sd["qweight"].dtype == torch.int8
    )
    meta = W8A8Conv2d(6, 5, conv.kernel_size, conv.stride, conv.padding, has_smooth_scale=True, device="meta")
    new = meta.to_empty(device="cpu")
    new.load_state_dict(sd)
    assert torch.equal(new.prepack_()(x), y)
    assert mod.memory_footprint() == sd["qweight"].numel() + 4 * 5 + 4 * 5 + 4 * 6


def test_w8a8_conv2d_rejects_unsupported():
    from effalg.core.modules import W8A8Conv2d

    with pytest.raises(ValueError, match="groups=1"):
        W8A8Conv2d.from_float(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        W8A8Conv2d.from_float(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


# ---- MixDQ WxA8 (W8A8 / W4A8 / W2A8, static or dynamic activations) -----------------------------------------------


def _static_act_f64(x, scale, zero):
    """Static per-tensor asymmetric int8 (fp32 division, round half to even), dequantized in float64."""
    q = (torch.round(x.float() / torch.tensor(scale, dtype=torch.float32)) + zero).clamp(-128, 127)
    return (q.double() - zero) * float(torch.tensor(scale, dtype=torch.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("static", [False, True])
def test_wxa8_linear_matches_f64_reference(bits, static):
    from effalg.core.modules import WxA8Linear

    lin = _linear(k=36)
    x = torch.randn(3, 5, 36)
    act = dict(act_scale=0.02, act_zero=-13) if static else {}
    mod = WxA8Linear.from_float(lin, weight_bits=bits, **act)
    w_fq = _weight_fq_f64(lin.weight, bits)  # symmetric min-max per channel: codes in [-(2^(b-1) - 1), 2^(b-1) - 1]
    torch.testing.assert_close(mod.dequantize_weight(torch.float64), w_fq, rtol=0, atol=1e-12)
    xd = _static_act_f64(x, 0.02, -13) if static else _act_quant_f64(x)
    ref = xd @ w_fq.t() + lin.bias.double()
    y = mod(x)
    assert y.shape == (3, 5, 24) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    packed = {2: (24, 9), 4: (24, 18), 8: (24, 36)}[bits]
    assert mod.qweight.shape == packed and mod.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    names = ["bias", "qweight", "weight_scale"] + (["weight_rowsum", "act_scale", "act_zero"] if static else [])
    assert list(mod.state_dict()) == names
    extra = 4 * 24 + 4 + 4 if static else 0
    assert mod.memory_footprint() == packed[0] * packed[1] + 4 * 24 + 4 * 24 + extra
    assert mod.weight_bits == bits and mod.act_spec.dynamic == (not static)


def test_wxa8_linear_meta_construction_load_and_dtype_moves():
    from effalg.core.modules import WxA8Linear

    src = WxA8Linear.from_float(_linear(), weight_bits=2, act_scale=0.05, act_zero=7)
    meta = WxA8Linear(32, 24, weight_bits=2, static_act=True, device="meta")
    for name, t in src.state_dict().items():
        mt = meta.state_dict()[name]
        assert mt.is_meta and mt.shape == t.shape and mt.dtype == t.dtype, name
    dst = meta.to_empty(device="cpu")
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 32)
    assert torch.equal(dst(x), src(x))
    # a module built for dynamic activations accepts a static checkpoint
    dyn = WxA8Linear(32, 24, weight_bits=2)
    dyn.load_state_dict(src.state_dict())
    assert dyn.static_act and torch.equal(dyn(x), src(x))
    h = copy.deepcopy(src).to(torch.bfloat16)
    assert h.act_scale.dtype == torch.float32 and h.weight_scale.dtype == torch.float32
    assert h.act_zero.dtype == torch.int32 and h.weight_rowsum.dtype == torch.int32 and h.bias.dtype == torch.bfloat16
    assert h(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weight_bits must be one of"):
        WxA8Linear(32, 24, weight_bits=3)
    with pytest.raises(ValueError, match=r"act_zero must be one integer in \[-128, 127\]"):
        WxA8Linear.from_float(_linear(), act_scale=0.1, act_zero=200)
    with pytest.raises(ValueError, match="act_zero requires act_scale"):
        WxA8Linear.from_float(_linear(), act_zero=3)


@pytest.mark.parametrize(
    "bits,act,kw",
    [
        (2, dict(act_scale=0.03, act_zero=21), dict(kernel_size=3, padding=1)),  # padding quantizes to the zero point
        (4, {}, dict(kernel_size=(3, 2), stride=2, padding=(1, 0))),
        (8, dict(act_scale=0.03, act_zero=-4), dict(kernel_size=1)),
    ],
)
def test_wxa8_conv2d_matches_f64_reference(bits, act, kw):
    from effalg.core.modules import WxA8Conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, **kw)
    x = torch.randn(2, 6, 7, 8)
    mod = WxA8Conv2d.from_float(conv, weight_bits=bits, **act)
    w_fq = _weight_fq_f64(conv.weight.detach().reshape(5, -1), bits)
    xq = _static_act_f64(x, act["act_scale"], act["act_zero"]) if act else None
    if act:  # fake-quant input, zero-padded after quantization (the float64 reference of the folded zero point)
        ref = F.conv2d(xq, w_fq.reshape(conv.weight.shape), conv.bias.double(), conv.stride, conv.padding)
    else:
        cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
        ref = (_act_quant_f64(cols) @ w_fq.t() + conv.bias.double()).transpose(1, 2).reshape(conv(x).shape)
    y = mod(x)
    assert y.shape == conv(x).shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    meta = WxA8Conv2d(6, 5, conv.kernel_size, conv.stride, conv.padding, weight_bits=bits, static_act=bool(act),
                      device="meta")  # fmt: skip
    new = meta.to_empty(device="cpu")
    new.load_state_dict(mod.state_dict())
    assert torch.equal(new(x), y)
    assert f"w{bits}a8" in repr(mod)


# ---- MixDQ: BOS-aware projection and input-split convolution ---------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_bos_aware_linear_float_and_precomputed_rows(bits):
    from effalg.core.modules import BOSAwareWxA8Linear, WxA8Linear

    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(2, 6, 32)
    x[:, 0] = torch.randn(32) * 200  # prompt-independent, huge BOS features
    fly = BOSAwareWxA8Linear.from_float(lin, weight_bits=bits)
    pre = BOSAwareWxA8Linear.from_float(lin, weight_bits=bits, act_scale=0.05, act_zero=3, bos_input=x[0, 0])
    plain = WxA8Linear.from_float(lin, weight_bits=bits)
    ref = lin(x).detach()
    torch.testing.assert_close(fly(x)[:, 0], ref[:, 0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pre(x)[:, 0], ref[:, 0], rtol=1e-5, atol=1e-4)
    assert torch.equal(fly(x)[:, 1:], plain(x[:, 1:]))  # the other tokens: the quantized path
    assert fly.bos_weight is not None and pre.bos_weight is None and pre.precomputed
    assert pre.memory_footprint() < fly.memory_footprint()
    with pytest.raises(ValueError, match="token 0 is not the BOS features"):
        pre(torch.randn(2, 6, 32))
    with pytest.raises(ValueError, match=r"expected text tokens"):
        fly(torch.randn(2, 1, 32))
    empty = BOSAwareWxA8Linear(32, 16, precomputed=True, weight_bits=bits, static_act=True, device="meta")
    assert set(empty.state_dict()) == set(pre.state_dict())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_input_split_conv_is_sum_of_range_convs(bits):
    from effalg.core.modules import InputSplitConv2d, WxA8Conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 8, 3, padding=1)
    x = torch.cat([torch.randn(2, 4, 5, 5) * 50, torch.randn(2, 8, 5, 5) * 0.1], dim=1)  # skip concat: two ranges
    from effalg.core.calibration import static_act_qparams

    qp = [static_act_qparams(float(p.min()), float(p.max())) for p in x.split([4, 8], dim=1)]
    split = InputSplitConv2d.from_float(conv, [4, 8], weight_bits=bits, act_qparams=qp)
    a = WxA8Conv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), weight_bits=bits)
    assert [p.in_channels for p in split.parts] == [4, 8] and split.parts[1].bias is None
    tol = float(conv.weight.detach().abs().max()) / {8: 100, 4: 6, 2: 1.5}[bits]
    torch.testing.assert_close(split.dequantize_weight(), conv.weight.detach(), rtol=0, atol=tol)
    ref = conv(x).detach()
    one = WxA8Conv2d.from_float(conv, weight_bits=bits, act_scale=qp[0][0], act_zero=qp[0][1])  # one range
    err_split = float((split(x) - ref).norm() / ref.norm())
    err_one = float((one(x) - ref).norm() / ref.norm())
    if bits == 8:
        assert err_split < 0.02 and err_split < err_one
    meta = InputSplitConv2d(12, 8, 3, padding=1, split_sizes=[4, 8], weight_bits=bits, static_act=True, device="meta")
    assert set(meta.state_dict()) == set(split.state_dict())
    with pytest.raises(ValueError, match="split_sizes must be"):
        InputSplitConv2d(12, 8, 3, split_sizes=[5, 8])
    assert a.weight_bits == bits


@pytest.mark.parametrize(
    "cls, kw",
    [
        (W8A8Linear, {}),
        (W4A8Linear, {"group_size": 8}),
        (WeightOnlyLinear, {"bits": 3, "group_size": 16, "symmetric": False}),
        (WxA8Linear, {"weight_bits": 2, "act_scale": 0.05, "act_zero": 3}),
    ],
)
def test_from_float_in_row_blocks_equals_one_piece(cls, kw, monkeypatch):
    """Large weights are quantized block of rows by block (bounded float32 temporaries): same tensors, bit for bit."""
    import effalg.core.modules.linear as L
    from effalg.core.quant.rotation import HadamardRotation

    lin = _linear(64, 40)
    extra = {"smooth_scale": torch.rand(64) + 0.5} if cls is not WxA8Linear else {}
    if cls is W4A8Linear:
        extra = {"input_transform": HadamardRotation(64, 16, seed=3)}
    whole = cls.from_float(lin, **kw, **extra)
    monkeypatch.setattr(L, "FROM_FLOAT_CHUNK_NUMEL", 64 * 7)  # 7-row blocks, the last one shorter
    blocks = cls.from_float(lin, **kw, **extra)
    a, b = whole.state_dict(), blocks.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
