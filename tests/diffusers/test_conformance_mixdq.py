"""Conformance suite (effalg.core.testing) for MixDQ W8A8 / W4A8 on each UNet layout: SD 1.5, SDXL (two text
encoders, added conditioning), one-step turbo and LCM (guidance embedding); quantize-on-load and calibrated."""

import pytest
from diffusers import DiffusionPipeline, UNet2DConditionModel

import effalg.diffusers as ED
from effalg.core.modules import BOSAwareWxA8Linear, InputSplitConv2d, WxA8Conv2d, WxA8Linear
from effalg.core.testing import QuantizationConformanceMixin
from effalg.diffusers import MixDQConfig
from effalg.diffusers import testing as T


class _MixDQConformance(QuantizationConformanceMixin):
    factory = "sd"
    weight_bits = 8
    calibrated = False  # True: effalg.diffusers.calibrate (static ranges, split, BOS rows, float layers)
    quantized_module_types = (WxA8Linear, WxA8Conv2d, InputSplitConv2d)
    compile_backend = "aot_eager"
    check_compile = False

    def compile(self, model):
        return super().compile(model) if self.check_compile else None

    @pytest.fixture(autouse=True)
    def _pipeline_path(self, request):
        self.path = request.getfixturevalue(f"tiny_{self.factory}")

    def config(self):
        return MixDQConfig(weight_bits=self.weight_bits)

    def make_reference(self):
        return UNet2DConditionModel.from_pretrained(self.path, subfolder="unet").eval()

    def make_compressed(self):
        if not self.calibrated:
            return UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", quantization_config=self.config())
        pipe = DiffusionPipeline.from_pretrained(self.path)
        kw = T.pipeline_kwargs(pipe)
        for k in ("prompt", "generator", "output_type"):
            kw.pop(k)
        ED.calibrate(pipe, ["a cat", "a dog"], self.config(), progress=False, **kw)
        return pipe.unet

    def run(self, model):
        kw = T.denoiser_inputs(model)
        bos = next((m for m in self.compressed.modules() if isinstance(m, BOSAwareWxA8Linear) and m.precomputed), None)
        if bos is not None:  # calibrated BOS rows: token 0 must be the text encoder's BOS features
            kw["encoder_hidden_states"][:, 0] = bos.bos_input
        return model(**kw)[0]

    def save(self, model, directory):
        model.save_pretrained(directory)

    def load(self, directory):
        return UNet2DConditionModel.from_pretrained(directory)

    def bad_input_cases(self):
        yield (lambda: MixDQConfig(weight_bits=5), ValueError, r"weight_bits must be one of \[2, 4, 8\]")
        yield (
            lambda: UNet2DConditionModel.from_pretrained(
                self.path, subfolder="unet", quantization_config=MixDQConfig(plan={"up_blocks.7.conv": 4})
            ),
            ValueError,
            r"'up_blocks\.7\.conv'",
        )


class _W8A8(_MixDQConformance):
    weight_bits = 8
    min_psnr, expected_memory_ratio = 35.0, 3.0


class _W4A8(_MixDQConformance):
    weight_bits = 4
    min_psnr, expected_memory_ratio = 25.0, 4.5


class TestSDW8A8(_W8A8):
    factory = "sd"
    check_compile = True


class TestSDW4A8(_W4A8):
    factory = "sd"


class TestSDCalibratedW8A8(_W8A8):
    """Static ranges are calibrated on pipeline inputs; ``run`` feeds random ones, hence the lower bound."""

    factory = "sd"
    calibrated = True
    min_psnr = 28.0


class TestSDXLW8A8(_W8A8):
    factory = "sdxl"
    expected_memory_ratio = 2.8  # float conv_in / conv_out / time and text-time embeddings weigh more here


class TestSDXLCalibratedW4A8(_W4A8):
    factory = "sdxl"
    calibrated = True
    check_compile = True


class TestTurboW8A8(_W8A8):
    factory = "sd_turbo"


class TestTurboCalibratedW4A8(_W4A8):
    factory = "sd_turbo"
    calibrated = True
    expected_memory_ratio = 4.0  # plus the activation-sensitive layers kept float


class TestLCMW8A8(_W8A8):
    factory = "lcm"


class TestLCMCalibratedW4A8(_W4A8):
    factory = "lcm"
    calibrated = True


def test_every_layout_has_a_calibrated_and_an_on_load_class():
    classes = [c for c in globals().values() if isinstance(c, type) and c.__name__.startswith("Test")]
    for factory in ("sd", "sdxl", "sd_turbo", "lcm"):
        assert {c.calibrated for c in classes if c.factory == factory} == {False, True}, factory
    assert {c.weight_bits for c in classes} == {8, 4}
