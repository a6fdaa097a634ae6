"""Conformance suite (effalg.core.testing) for EffalgLinearConfig W8A8 / W4A8 on tiny PixArt, SD3, Flux and UNet."""

import pytest

import effalg.diffusers  # noqa: F401
from effalg.core.modules import W4A8Linear, W8A8Linear
from effalg.core.testing import QuantizationConformanceMixin
from effalg.diffusers import EffalgLinearConfig
from effalg.diffusers import testing as T

_CLASSES = {
    "pixart_alpha": ("PixArtTransformer2DModel", "transformer"),
    "pixart_outliers": ("PixArtTransformer2DModel", "transformer"),
    "sd3": ("SD3Transformer2DModel", "transformer"),
    "flux": ("FluxTransformer2DModel", "transformer"),
    "sd": ("UNet2DConditionModel", "unet"),
}


class _LinearConformance(QuantizationConformanceMixin):
    factory = "pixart_alpha"
    weight_bits = 8
    compile_backend = "aot_eager"  # inductor is exercised once (PixArt W8A8) to keep the suite fast

    @pytest.fixture(autouse=True)
    def _pipeline_path(self, request):
        self.path = request.getfixturevalue(f"tiny_{self.factory}")

    @property
    def model_cls(self):
        import diffusers

        return getattr(diffusers, _CLASSES[self.factory][0])

    @property
    def subfolder(self):
        return _CLASSES[self.factory][1]

    def make_reference(self):
        return self.model_cls.from_pretrained(self.path, subfolder=self.subfolder).eval()

    def make_compressed(self):
        cfg = EffalgLinearConfig(weight_bits=self.weight_bits, act_bits=8)
        return self.model_cls.from_pretrained(self.path, subfolder=self.subfolder, quantization_config=cfg)

    def run(self, model):
        return T.run_denoiser(model)

    def save(self, model, directory):
        model.save_pretrained(directory)

    def load(self, directory):
        return self.model_cls.from_pretrained(directory)

    def bad_input_cases(self):
        yield (lambda: EffalgLinearConfig(weight_bits=5), ValueError, r"weight_bits must be one of .4, 8.")
        yield (lambda: EffalgLinearConfig(act_bits=4), ValueError, "act_bits must be 8 or None")
        yield (
            lambda: self.model_cls.from_pretrained(
                self.path,
                subfolder=self.subfolder,
                quantization_config=EffalgLinearConfig(modules_to_not_convert=["nope"]),
            ),
            ValueError,
            "no module of .* matches",
        )


class _W8A8(_LinearConformance):
    weight_bits = 8
    quantized_module_types = (W8A8Linear,)


class _W4A8(_LinearConformance):
    weight_bits = 4
    quantized_module_types = (W4A8Linear,)


class TestPixArtW8A8(_W8A8):
    factory = "pixart_alpha"
    min_psnr, expected_memory_ratio = 55.0, 1.7
    compile_backend = "inductor"


class TestPixArtW4A8(_W4A8):
    factory = "pixart_alpha"
    min_psnr, expected_memory_ratio = 40.0, 1.95


class TestSD3W8A8(_W8A8):
    factory = "sd3"
    min_psnr, expected_memory_ratio = 55.0, 1.45


class TestSD3W4A8(_W4A8):
    factory = "sd3"
    min_psnr, expected_memory_ratio = 40.0, 1.6


class TestFluxW8A8(_W8A8):
    factory = "flux"
    min_psnr, expected_memory_ratio = 55.0, 1.55


class TestFluxW4A8(_W4A8):
    factory = "flux"
    min_psnr, expected_memory_ratio = 40.0, 1.75


class TestUNetW8A8(_W8A8):
    factory = "sd"
    min_psnr, expected_memory_ratio = 50.0, 1.12


class TestUNetW4A8(_W4A8):
    factory = "sd"
    min_psnr, expected_memory_ratio = 35.0, 1.15


class TestPixArtOutliersW8A8(_W8A8):
    """PixArt with injected activation channel outliers (per-token int8 activations lose precision)."""

    factory = "pixart_outliers"
    min_psnr, expected_memory_ratio = 45.0, 1.7
