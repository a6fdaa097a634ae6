"""WeightOnlyLinear with CPU runtime layouts (``modules/_weight_only.py``): prepacking keeps outputs, the state dict,
pickles and copies canonical (bit-identical on reload), loading and device moves work with either layout."""

import copy

import pytest
import torch
from torch import nn

import effalg.kernels as K
from effalg.core.modules import WeightOnlyLinear, memory_footprint, prepack_model_
from effalg.kernels import weight_only_cpu as woc

LAYOUTS = ["blocked", "int4pack"]


def _linear(k=256, n=128, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3)
    return lin


def _available(layout, bits):
    if layout == "blocked":
        return bits in (3, 4) and woc.native_available()
    return bits == 4 and woc._int4pack_supported()


@pytest.fixture(params=[(3, "blocked"), (4, "blocked"), (4, "int4pack")], ids=lambda p: f"w{p[0]}-{p[1]}")
def packed(request, monkeypatch):
    bits, layout = request.param
    if not _available(layout, bits):
        pytest.skip(f"{layout} layout unavailable here")
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_LAYOUT", layout)
    return bits, layout


def _pair(bits, group_size=64, symmetric=False, dtype=torch.float32):
    lin = _linear().to(dtype)
    mod = WeightOnlyLinear.from_float(lin, bits=bits, group_size=group_size, symmetric=symmetric)
    plain = WeightOnlyLinear.from_float(lin, bits=bits, group_size=group_size, symmetric=symmetric, prepack=False)
    return mod, plain


@pytest.mark.parametrize("M", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_forward_matches_canonical(packed, M, dtype):
    bits, layout = packed
    mod, plain = _pair(bits, dtype=dtype)
    assert mod.packed_layout == layout and not plain.is_prepacked and "layout=" in repr(mod)
    x = torch.randn(2, M, 256).to(dtype)
    ref = x.double() @ plain.dequantize_weight(torch.float64).t() + plain.bias.double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-6}[dtype]
    for m in (mod, plain):
        y = m(x)
        assert y.dtype == dtype and y.shape == (2, M, 128)
        assert float((y.double() - ref).abs().max() / ref.abs().max()) <= tol
    assert torch.equal(mod.dequantize_weight(), plain.dequantize_weight())


def test_state_dict_is_canonical_and_reload_is_bit_identical(packed, tmp_path):
    bits, layout = packed
    mod, plain = _pair(bits)
    sd = mod.state_dict()
    assert list(sd) == ["bias", "qweight", "weight_scale", "weight_zero"]
    for name, t in plain.state_dict().items():
        assert torch.equal(sd[name], t) and sd[name].dtype == t.dtype, name
    assert not torch.equal(mod.qweight.flatten()[: sd["qweight"].numel()], sd["qweight"].flatten())  # runtime bytes

    path = tmp_path / "w.pt"
    torch.save(sd, path)
    meta = WeightOnlyLinear(256, 128, bits=bits, group_size=64, symmetric=False, device="meta")
    fresh = meta.to_empty(device="cpu")
    fresh.load_state_dict(torch.load(path))
    prepack_model_(fresh)
    assert fresh.packed_layout == layout
    x = torch.randn(5, 256)
    assert torch.equal(fresh(x), mod(x))
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, sd[name]), name


def test_load_into_prepacked_module_repacks(packed):
    bits, layout = packed
    mod, _ = _pair(bits)
    other = WeightOnlyLinear.from_float(_linear(seed=1), bits=bits, group_size=64, symmetric=False)
    assert other.packed_layout == layout
    other.load_state_dict(mod.state_dict())
    assert other.packed_layout == layout
    x = torch.randn(3, 256)
    assert torch.equal(other(x), mod(x))


def test_pickle_deepcopy_and_moves(packed, tmp_path):
    bits, layout = packed
    mod, plain = _pair(bits)
    x = torch.randn(4, 256)
    clone = copy.deepcopy(mod)
    assert clone.packed_layout == layout and torch.equal(clone(x), mod(x))
    path = tmp_path / "m.pt"
    torch.save(mod, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded.packed_layout == layout and torch.equal(loaded(x), mod(x))
    half = copy.deepcopy(mod).to(torch.bfloat16)  # float dtype moves keep the layout
    assert half.packed_layout == layout and half(x.bfloat16()).dtype == torch.bfloat16
    on_meta = copy.deepcopy(mod).to("meta")  # leaving CPU unpacks first
    assert not on_meta.is_prepacked and on_meta.qweight.shape == plain.qweight.shape
    mod.unpack_()
    assert not mod.is_prepacked and torch.equal(mod.qweight, plain.qweight)


def test_requantizing_a_prepacked_module_resets_the_layout(packed):
    bits, _ = packed
    mod, _ = _pair(bits)
    mod._set_weight_from_float(_linear(seed=2).weight.detach().float())
    assert not mod.is_prepacked
    mod.prepack_()
    assert mod.is_prepacked


@pytest.mark.parametrize("layout", [None, "blocked"])
def test_w3_g128_bytes_at_least_4_5x_below_bf16(layout):
    if layout is not None and not _available(layout, 3):
        pytest.skip(f"{layout} layout unavailable here")
    lin = _linear(k=1024, n=256, bias=False).to(torch.bfloat16)
    mod = WeightOnlyLinear.from_float(lin, bits=3, group_size=128, symmetric=False, prepack=False)
    if layout is not None:
        mod.prepack_(layout=layout)
    assert mod.packed_layout == layout
    assert memory_footprint(lin) / memory_footprint(mod) >= 4.5


def test_no_layout_keeps_canonical(monkeypatch):
    monkeypatch.setenv("EFFALG_CPU_WEIGHT_ONLY_LAYOUT", "canonical")
    mod = WeightOnlyLinear.from_float(_linear(), bits=3, group_size=64)
    assert not mod.is_prepacked and mod.qweight.shape == (128, K.packed_size(256, 3))
