"""effalg.diffusers.testing: tiny pipeline factories and outlier injection."""

import pytest
import torch
from diffusers import DiffusionPipeline
from torch import nn

from effalg.diffusers import testing as T


@pytest.mark.parametrize("name", sorted(T.FACTORIES))
def test_factory_builds_saves_and_reloads(name, tmp_path):
    make, denoiser = T.FACTORIES[name]
    path, pipe = make(tmp_path / name)
    images = T.run_pipeline(pipe)
    assert images.ndim in (4, 5) and images.shape[-3] == 3 and torch.isfinite(images).all()  # 5: video frames
    again = DiffusionPipeline.from_pretrained(path)
    assert type(again) is type(pipe)
    # Float weights loaded from safetensors may sit at other memory alignments than freshly built ones, and the
    # BLAS kernels' summation order depends on alignment: float reloads agree to rounding, not bit for bit.
    torch.testing.assert_close(T.run_pipeline(again), images, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        T.run_denoiser(getattr(again, denoiser)), T.run_denoiser(getattr(pipe, denoiser)), rtol=1e-5, atol=1e-5
    )


def test_factories_are_seeded(tmp_path):
    _, a = T.make_tiny_pixart_alpha(tmp_path / "a")
    _, b = T.make_tiny_pixart_alpha(tmp_path / "b")
    _, c = T.make_tiny_pixart_alpha(tmp_path / "c", seed=1)
    assert torch.equal(a.transformer.proj_out.weight, b.transformer.proj_out.weight)
    assert not torch.equal(a.transformer.proj_out.weight, c.transformer.proj_out.weight)


def _input_channel_peak_ratio(model, suffix):
    """max over channels / median over channels of the per-channel |x| max at the inputs of layers ending in suffix."""
    ratios = []

    def hook(mod, args):
        x = args[0].detach().abs().flatten(0, -2).amax(0)
        ratios.append((x.max() / x.median().clamp(min=1e-8)).item())

    hs = [
        m.register_forward_pre_hook(hook)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(suffix)
    ]
    T.run_denoiser(model)
    for h in hs:
        h.remove()
    return max(ratios)


@pytest.mark.parametrize("name", ["pixart_alpha", "sd3", "flux", "sd"])
def test_outlier_channels(name, tmp_path):
    make, denoiser = T.FACTORIES[name]
    _, plain = make(tmp_path / "plain")
    _, outl = make(tmp_path / "outl", outlier_channels=2)
    a = _input_channel_peak_ratio(getattr(plain, denoiser), "to_out.0")
    b = _input_channel_peak_ratio(getattr(outl, denoiser), "to_out.0")
    assert b > 4 * a, (a, b)


def test_outlier_bad_input():
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        T.inject_outlier_channels(nn.Linear(2, 2), -1)
