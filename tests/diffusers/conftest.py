"""Session-cached tiny pipelines (seeded random weights, saved once per test session)."""

import pytest

import effalg.diffusers  # noqa: F401  (registers the quantization methods)
from effalg.diffusers import testing as T


def _factory(name, **kw):
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        make, _ = T.FACTORIES[name]
        path, _pipe = make(tmp_path_factory.mktemp(name) / "pipe", **kw)
        return path

    return fixture


tiny_pixart_alpha = _factory("pixart_alpha")
tiny_pixart_sigma = _factory("pixart_sigma")
tiny_sd = _factory("sd")
tiny_sd_turbo = _factory("sd_turbo")
tiny_lcm = _factory("lcm")
tiny_sdxl = _factory("sdxl")
tiny_sd3 = _factory("sd3")
tiny_flux = _factory("flux")
tiny_latte = _factory("latte")
tiny_dit = _factory("dit")
tiny_pixart_outliers = _factory("pixart_alpha", outlier_channels=2)
