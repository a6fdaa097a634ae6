"""HadamardRotation (effalg.core.quant.rotation) and its use as the fused input transform of quantized linears."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import effalg.kernels as K
from effalg.core import HadamardRotation, W4A8Linear, W8A8Linear, WeightOnlyLinear, compute_smooth_scale, random_signs
from effalg.core.quant import HadamardRotation as QuantHadamardRotation


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(K_: int, N: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(K_, N)
    with torch.no_grad():
        lin.weight.normal_(0, K_**-0.5, generator=_gen(seed))
        lin.bias.normal_(0, 0.1, generator=_gen(seed + 1))
    return lin


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


OUTLIERS = [3, 17, 40]


def _outlier_input(M: int, K_: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(M, K_, generator=_gen(seed))
    x[:, OUTLIERS] *= 60.0  # a few persistent outlier channels (as in DiT activations)
    return x


# ---------------------------------------------------------------------------------------------- random_signs


def test_random_signs_deterministic():
    a, b = random_signs(256, 7), random_signs(256, 7)
    assert a.dtype == torch.float32 and a.shape == (256,)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, random_signs(256, 8))
    with pytest.raises(ValueError, match="random_signs: K"):
        random_signs(0)
    with pytest.raises(TypeError, match="random_signs: seed"):
        random_signs(8, 1.5)


# ------------------------------------------------------------------------------------------- HadamardRotation


def test_rotation_module_matches_dense_matrix_and_is_orthogonal():
    r = HadamardRotation(96, seed=3)
    assert QuantHadamardRotation is HadamardRotation
    assert r.block_size == K.hadamard_block_size(96) == 32
    R = r.matrix()
    torch.testing.assert_close(R @ R.t(), torch.eye(96, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(2, 5, 96, generator=_gen(0))
    torch.testing.assert_close(r(x).double(), x.double() @ R, rtol=1e-5, atol=1e-5)
    assert torch.equal(r.signs, random_signs(96, 3))


def test_rotation_explicit_signs_block_and_bad_args():
    s = random_signs(64, 1)
    r = HadamardRotation(64, 16, signs=s)
    assert r.block_size == 16 and r.seed is None and torch.equal(r.signs, s)
    with pytest.raises(ValueError, match="power of two"):
        HadamardRotation(96, 12)
    with pytest.raises(ValueError, match="must divide in_features"):
        HadamardRotation(96, 64)
    with pytest.raises(ValueError, match="in_features"):
        HadamardRotation(0)
    with pytest.raises(ValueError, match="signs must have shape"):
        HadamardRotation(64, signs=s[:32])
    with pytest.raises(ValueError, match=r"only \+1 and -1"):
        HadamardRotation(64, signs=s * 2)
    with pytest.raises(ValueError, match="last dim 64"):
        r(torch.randn(3, 32))


def test_rotation_signs_saved_and_kept_fp32():
    r = HadamardRotation(64, seed=5)
    sd = r.state_dict()
    assert list(sd) == ["signs"] and sd["signs"].dtype == torch.float32
    r2 = HadamardRotation(64, seed=99)
    r2.load_state_dict(sd)
    assert torch.equal(r2.signs, r.signs)
    r.to(torch.bfloat16)
    assert r.signs.dtype == torch.float32
    x = torch.randn(4, 64, generator=_gen(1)).to(torch.bfloat16)
    assert r(x).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------- quantized linear + rotation


@pytest.mark.parametrize("cls", [W8A8Linear, W4A8Linear])
def test_from_float_smooth_and_rotation_close_to_float(cls):
    lin = _linear(128, 48)
    smooth = torch.rand(128, generator=_gen(2)) + 0.5
    rot = HadamardRotation(128, seed=0)
    q = cls.from_float(lin, smooth_scale=smooth, input_transform=rot)
    assert q.input_transform is rot and "input_transform.signs" in q.state_dict()
    # The weight absorbed diag(1/s) @ R: dequantized weight ~ (W / s) @ R.
    w_expected = (lin.weight.detach().double() / smooth.double()) @ rot.matrix()
    tol = 0.01 if cls is W8A8Linear else 0.2  # int4 per-channel min-max: ~12% relative weight error
    assert _rel(q.dequantize_weight(), w_expected) < tol
    x = torch.randn(16, 128, generator=_gen(3))
    with torch.no_grad():
        ref = lin(x)
        assert _rel(q(x), ref) < (0.02 if cls is W8A8Linear else 0.2)
        # The fused pre-transform equals the two explicit steps.
        expected = (x.double() * smooth.double()) @ rot.matrix()
        torch.testing.assert_close(q.preprocess_input(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_rotation_reduces_w4a8_error_on_outlier_channels():
    # ViDiT-Q's channel balance: smoothing moves the activation outliers into weight columns, which per-channel int4
    # then quantizes badly; the rotation spreads them over all channels.
    lin = _linear(256, 64, seed=1)
    x = _outlier_input(64, 256, seed=4)
    smooth = compute_smooth_scale(x.abs().amax(0), lin.weight.detach(), 0.5)
    with torch.no_grad():
        ref = lin(x)
        plain = _rel(W4A8Linear.from_float(lin)(x), ref)
        smoothed = _rel(W4A8Linear.from_float(lin, smooth_scale=smooth)(x), ref)
        rot = HadamardRotation(256, seed=0)
        balanced = _rel(W4A8Linear.from_float(lin, smooth_scale=smooth, input_transform=rot)(x), ref)
    assert balanced < 0.5 * smoothed and balanced < 0.5 * plain, (plain, smoothed, balanced)


def test_preprocess_is_one_fused_op_call(monkeypatch):
    lin = _linear(64, 16)
    smooth = torch.rand(64, generator=_gen(5)) + 0.5
    q_rot = W8A8Linear.from_float(lin, smooth_scale=smooth, input_transform=HadamardRotation(64, 16, seed=1))
    q_smooth = W8A8Linear.from_float(lin, smooth_scale=smooth)
    calls = []
    orig = K.smooth_hadamard

    def spy(x, smooth=None, signs=None, block_size=0):
        calls.append((smooth is not None, signs is not None, block_size))
        return orig(x, smooth, signs, block_size)

    monkeypatch.setattr(K, "smooth_hadamard", spy)
    x = torch.randn(3, 64, generator=_gen(6))
    q_rot(x)
    assert calls == [(True, True, 16)]
    calls.clear()
    q_smooth(x)
    assert calls == [(True, False, 0)]
    calls.clear()
    W8A8Linear.from_float(lin)(x)
    assert calls == []


def test_other_transforms_keep_the_generic_path():
    class Neg(nn.Module):
        def forward(self, x):
            return -x

    lin = _linear(32, 8)
    smooth = torch.rand(32, generator=_gen(7)) + 0.5
    q = WeightOnlyLinear.from_float(lin, bits=8, smooth_scale=smooth, input_transform=Neg())
    x = torch.randn(4, 32, generator=_gen(8))
    torch.testing.assert_close(q.preprocess_input(x), -(x * smooth))
    with torch.no_grad():
        assert _rel(q(x), lin(x)) < 0.02


@pytest.mark.parametrize("cls, kwargs", [(W8A8Linear, {}), (W4A8Linear, {"group_size": 32})])
def test_meta_build_and_state_dict_reload_bit_identical(cls, kwargs):
    lin = _linear(128, 40, seed=2)
    smooth = torch.rand(128, generator=_gen(9)) + 0.5
    q = cls.from_float(lin, smooth_scale=smooth, input_transform=HadamardRotation(128, 64, seed=11), **kwargs)
    sd = q.state_dict()
    assert sd["input_transform.signs"].dtype == torch.float32
    assert torch.equal(sd["input_transform.signs"], random_signs(128, 11))
    x = torch.randn(5, 128, generator=_gen(10))
    y = q(x)

    # Meta build (as diffusers does) + assign-load.
    m = cls(128, 40, has_smooth_scale=True, input_rotation_block=64, device="meta", **kwargs)
    assert isinstance(m.input_transform, HadamardRotation) and m.input_transform.signs.is_meta
    assert set(m.state_dict()) == set(sd)
    m.load_state_dict(sd, assign=True)
    assert torch.equal(m(x), y)

    # CPU build with a placeholder rotation + strict copy-load.
    c = cls(128, 40, has_smooth_scale=True, input_rotation_block=64, **kwargs)
    c.load_state_dict(sd)
    assert torch.equal(c.input_transform.signs, q.input_transform.signs)
    assert torch.equal(c(x), y)

    # Without the rotation declared, the checkpoint's rotation key is refused (never silently dropped).
    with pytest.raises(RuntimeError, match="input_transform.signs"):
        cls(128, 40, has_smooth_scale=True, **kwargs).load_state_dict(sd)


def test_model_dtype_cast_keeps_fp32_signs():
    lin = _linear(64, 16).to(torch.bfloat16)
    q = W8A8Linear.from_float(lin, smooth_scale=torch.rand(64) + 0.5, input_transform=HadamardRotation(64))
    q.to(torch.bfloat16)
    assert q.input_transform.signs.dtype == torch.float32 and q.smooth_scale.dtype == torch.float32
    x = torch.randn(4, 64, generator=_gen(11)).to(torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        assert _rel(y, lin(x)) < 0.03
