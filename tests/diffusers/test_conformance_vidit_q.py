"""Conformance suite (effalg.core.testing) for ViDiT-Q W8A8 / W4A8 on tiny PixArt, SD3, Flux and Latte (video DiT)."""

import pytest

import effalg.diffusers as ED
from effalg.core.modules import W4A8Linear, W8A8Linear
from effalg.core.testing import QuantizationConformanceMixin
from effalg.diffusers import ViDiTQConfig
from effalg.diffusers import testing as T

_CLASSES = {
    "pixart_alpha": "PixArtTransformer2DModel",
    "pixart_outliers": "PixArtTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
    "latte": "LatteTransformer3DModel",
}


@pytest.fixture(scope="session")
def tiny_latte(tmp_path_factory):
    path, _ = T.make_tiny_latte(tmp_path_factory.mktemp("latte_conf") / "pipe")
    return path


class _ViDiTQConformance(QuantizationConformanceMixin):
    factory = "pixart_alpha"
    weight_bits = 8
    calibrated = False  # True: effalg.diffusers.calibrate on the pipeline (smoothing + rotation); else quantize-on-load
    compile_backend = "aot_eager"  # inductor is covered by test_conformance_linear.py; aot_eager keeps this fast
    check_compile = False  # torch.compile is checked on a few classes only (time)

    def compile(self, model):
        return super().compile(model) if self.check_compile else None

    @pytest.fixture(autouse=True)
    def _pipeline_path(self, request):
        self.path = request.getfixturevalue(f"tiny_{self.factory}")

    @property
    def model_cls(self):
        import diffusers

        return getattr(diffusers, _CLASSES[self.factory])

    def config(self):
        return ViDiTQConfig(weight_bits=self.weight_bits, act_bits=8)

    def make_reference(self):
        return self.model_cls.from_pretrained(self.path, subfolder="transformer").eval()

    def make_compressed(self):
        if not self.calibrated:
            return self.model_cls.from_pretrained(self.path, subfolder="transformer", quantization_config=self.config())
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(self.path)
        kw = T.pipeline_kwargs(pipe)
        for k in ("prompt", "num_inference_steps", "generator", "output_type"):
            kw.pop(k)
        ED.calibrate(pipe, ["a cat", "a dog"], self.config(), num_inference_steps=2, progress=False, **kw)
        return pipe.transformer

    def run(self, model):
        return T.run_denoiser(model)

    def save(self, model, directory):
        model.save_pretrained(directory)

    def load(self, directory):
        return self.model_cls.from_pretrained(directory)

    def bad_input_cases(self):
        yield (lambda: ViDiTQConfig(weight_bits=3), ValueError, r"weight_bits must be one of \[4, 8\]")
        yield (lambda: ViDiTQConfig(act_bits=16), ValueError, r"act_bits must be one of \[8\]")
        yield (
            lambda: self.model_cls.from_pretrained(
                self.path, subfolder="transformer", quantization_config=ViDiTQConfig(plan={"no.such.layer": 4})
            ),
            ValueError,
            "'no.such.layer'",
        )


class _W8A8(_ViDiTQConformance):
    weight_bits = 8
    quantized_module_types = (W8A8Linear,)


class _W4A8(_ViDiTQConformance):
    weight_bits = 4
    quantized_module_types = (W4A8Linear,)


class TestPixArtW8A8(_W8A8):
    factory = "pixart_alpha"
    min_psnr, expected_memory_ratio = 50.0, 1.6
    check_compile = True


class TestPixArtW4A8(_W4A8):
    factory = "pixart_alpha"
    min_psnr, expected_memory_ratio = 35.0, 1.9


class TestPixArtOutliersCalibratedW8A8(_W8A8):
    """Calibrated (smooth scales + rotations) on PixArt with injected activation outlier channels."""

    factory = "pixart_outliers"
    calibrated = True
    min_psnr, expected_memory_ratio = 45.0, 1.5


class TestPixArtOutliersCalibratedW4A8(_W4A8):
    factory = "pixart_outliers"
    calibrated = True
    min_psnr, expected_memory_ratio = 33.0, 1.8
    check_compile = True

    def config(self):
        return ViDiTQConfig(weight_bits=4, balance_layers="auto")


class TestSD3W8A8(_W8A8):
    factory = "sd3"
    min_psnr, expected_memory_ratio = 50.0, 1.4


class TestSD3W4A8(_W4A8):
    factory = "sd3"
    min_psnr, expected_memory_ratio = 35.0, 1.55


class TestFluxW8A8(_W8A8):
    factory = "flux"
    min_psnr, expected_memory_ratio = 50.0, 1.5


class TestFluxW4A8(_W4A8):
    factory = "flux"
    min_psnr, expected_memory_ratio = 35.0, 1.7


class TestLatteW8A8(_W8A8):
    factory = "latte"
    min_psnr, expected_memory_ratio = 50.0, 1.5
    check_compile = True


class TestLatteW4A8(_W4A8):
    factory = "latte"
    min_psnr, expected_memory_ratio = 35.0, 1.7
