import dataclasses

import pytest
import torch

from effalg.core.quant import Granularity, QuantSpec, compute_qparams, dequantize, fake_quantize, quantize


def test_granularity_from_string_and_str():
    spec = QuantSpec(4, "group", 16)
    assert spec.granularity is Granularity.GROUP
    assert str(Granularity.TOKEN) == "token"


@pytest.mark.parametrize("bits", [1, 5, 16, 0, True, 4.0])
def test_bad_bits_lists_allowed(bits):
    with pytest.raises(ValueError, match=r"bits must be one of \{2, 3, 4, 8\}"):
        QuantSpec(bits)


def test_spec_validation():
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(8, "row")
    with pytest.raises(ValueError, match="group_size must be > 0"):
        QuantSpec(4, "group", 0)
    with pytest.raises(ValueError, match="group_size must be 0"):
        QuantSpec(4, "channel", 32)
    with pytest.raises(TypeError, match="symmetric"):
        QuantSpec(4, symmetric=1)
    with pytest.raises(TypeError, match="group_size"):
        QuantSpec(4, "group", 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantSpec(8).bits = 4


def test_ranges():
    assert (QuantSpec(8).qmin, QuantSpec(8).qmax) == (-127, 127)
    assert (QuantSpec(4).qmin, QuantSpec(4).qmax) == (-7, 7)
    assert (QuantSpec(2).qmin, QuantSpec(2).qmax) == (-1, 1)
    assert (QuantSpec(3, symmetric=False).qmin, QuantSpec(3, symmetric=False).qmax) == (0, 7)


def test_symmetric_channel_hand_values():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    spec = QuantSpec(2, "channel")
    scale, zero = compute_qparams(x, spec)
    assert zero is None
    assert torch.equal(scale, torch.tensor([2.0, 1e-8]))
    q = quantize(x, spec, scale)
    assert q.dtype == torch.int8
    assert q.tolist() == [[0, -1, 0], [0, 0, 0]]  # 0.5 -> round(0.5) = 0 (half to even)
    assert dequantize(q, spec, scale).tolist() == [[0.0, -2.0, 0.0], [0.0, 0.0, 0.0]]


def test_asymmetric_tensor_hand_values():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    spec = QuantSpec(2, "tensor", symmetric=False)
    scale, zero = compute_qparams(x, spec)
    assert scale.shape == () and zero.shape == ()
    assert scale.item() == pytest.approx(1.0) and zero.item() == 0.0
    q = quantize(x, spec, scale, zero)
    assert q.dtype == torch.uint8 and q.tolist() == [0, 1, 2, 3]
    x2 = torch.tensor([-1.0, 0.5, 2.0])  # lo=-1, hi=2 -> scale 1, zero 1
    s2, z2 = compute_qparams(x2, spec)
    assert (s2.item(), z2.item()) == (1.0, 1.0)
    assert quantize(x2, spec, s2, z2).tolist() == [0, 1, 3]  # 0.5 -> 0 (+1)
    x3 = torch.tensor([1.0, 2.0])  # all positive: lo clipped to 0
    s3, z3 = compute_qparams(x3, spec)
    assert s3.item() == pytest.approx(2.0 / 3) and z3.item() == 0.0


@pytest.mark.parametrize(
    "spec,shape,pshape",
    [
        (QuantSpec(8, "tensor"), (4, 6), ()),
        (QuantSpec(8, "channel"), (4, 6), (4,)),
        (QuantSpec(8, "channel"), (4, 3, 2, 2), (4,)),
        (QuantSpec(8, "token", dynamic=True), (2, 5, 6), (2, 5)),
        (QuantSpec(4, "group", 3), (4, 6), (4, 2)),
        (QuantSpec(3, "group", 2, symmetric=False), (2, 3, 6), (2, 3, 3)),
    ],
)
def test_param_shapes_and_error_bound(spec, shape, pshape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    scale, zero = compute_qparams(x, spec)
    assert scale.shape == pshape and scale.dtype == torch.float64
    assert (zero is None) == spec.symmetric
    q = quantize(x, spec, scale, zero)
    assert q.shape == x.shape and q.dtype == spec.code_dtype
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    xq = fake_quantize(x, spec)
    # Round-to-nearest inside the range: error <= scale / 2 elementwise.
    err = (xq - x).abs()
    if spec.granularity is Granularity.GROUP:
        s = scale.repeat_interleave(spec.group_size, dim=-1)
    elif spec.granularity is Granularity.CHANNEL:
        s = scale.reshape(-1, *[1] * (x.dim() - 1)).expand_as(x)
    elif spec.granularity is Granularity.TOKEN:
        s = scale.unsqueeze(-1).expand_as(x)
    else:
        s = scale.expand_as(x)
    assert torch.all(err <= s / 2 + 1e-12)


def test_fake_quantize_matches_explicit_formula():
    torch.manual_seed(1)
    w = torch.randn(5, 8)
    xq = fake_quantize(w, QuantSpec(4, "channel"))
    amax = w.abs().amax(dim=1, keepdim=True)
    ref = torch.round(w / (amax / 7)).clamp(-7, 7) * (amax / 7)
    torch.testing.assert_close(xq, ref, rtol=0, atol=1e-6)
    assert xq.dtype == w.dtype


def test_bad_inputs_name_argument():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="divisible by group_size"):
        compute_qparams(x, QuantSpec(4, "group", 4))
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        compute_qparams(x, 4)
    with pytest.raises(TypeError, match="floating"):
        compute_qparams(x.to(torch.int8), QuantSpec(8))
    with pytest.raises(ValueError, match="zero is required"):
        quantize(x, QuantSpec(8, symmetric=False), torch.ones(4))
    with pytest.raises(ValueError, match="scale has shape"):
        quantize(x, QuantSpec(8, "channel"), torch.ones(3))


def test_compute_smooth_scale_formula_and_errors():
    from effalg.core.quant import compute_smooth_scale

    act = torch.tensor([4.0, 1.0])
    w = torch.tensor([[1.0, -9.0], [-2.0, 3.0]])
    s = compute_smooth_scale(act, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([(2.0**0.5) / 2.0, 3.0 / 1.0]))
    # balance: max|x * s| == max|W / s| per channel at alpha 0.5
    assert torch.allclose(act * s, w.abs().amax(0) / s)
    with pytest.raises(ValueError, match="alpha"):
        compute_smooth_scale(act, w, alpha=1.5)
    with pytest.raises(ValueError, match=r"weight must be \[N, 2\]"):
        compute_smooth_scale(act, torch.ones(2, 3))
