"""effalg methods for diffusers.

``import effalg.diffusers`` registers the effalg quantization methods with diffusers (diffusers >=0.42,<0.43), so
that ``quantization_config=EffalgLinearConfig(...)`` / ``ViDiTQConfig(...)`` / ``MixDQConfig(...)`` works in ``ModelMixin.from_pretrained`` and
``DiffusionPipeline.from_pretrained``, and saved effalg checkpoints load with a plain ``from_pretrained``.
``search_ditfastattn`` / ``apply_ditfastattn`` compress a DiT's attention (DiTFastAttn); the plan is saved with the
model (alone as ``DiTFastAttnConfig``, or as ``attention_plan`` of a quantization config).
``calibrate(pipe, prompts, config, ...)`` runs the calibration registered for ``type(config)``
(:func:`register_calibrator`).
"""

from ._registry import SUPPORTED_DIFFUSERS, check_diffusers_version, register_quantization_method

check_diffusers_version()

from .config import (  # noqa: E402
    DEFAULT_MODULES_TO_NOT_CONVERT,
    EffalgDiffusersConfig,
    EffalgLinearConfig,
    EffalgQuantMethod,
    default_modules_to_not_convert,
)
from .ditfastattn import (  # noqa: E402
    DiTFastAttnConfig,
    DiTFastAttnMismatch,
    DiTFastAttnQuantizer,
    apply_ditfastattn,
    ditfastattn_runtime,
    remove_ditfastattn,
)
from .ditfastattn_search import search_ditfastattn  # noqa: E402
from .mixdq import MixDQConfig, MixDQQuantizer, load_mixdq_bit_maps  # noqa: E402  (registers MixDQ's calibration)
from .model_schedule import ModelScheduleRouter, search_model_schedule  # noqa: E402
from .pipeline_calibration import calibrate, register_calibrator  # noqa: E402
from .quantizer import EffalgDiffusersQuantizer, EffalgLinearQuantizer  # noqa: E402
from .usf import USFScheduler  # noqa: E402
from .usf_search import search_solver_schedule  # noqa: E402
from .vidit_q import ViDiTQConfig, ViDiTQQuantizer  # noqa: E402  (registers ViDiT-Q's calibration)

register_quantization_method(EffalgLinearConfig, EffalgLinearQuantizer)
register_quantization_method(ViDiTQConfig, ViDiTQQuantizer)
register_quantization_method(MixDQConfig, MixDQQuantizer)
register_quantization_method(DiTFastAttnConfig, DiTFastAttnQuantizer)

__all__ = [
    "DEFAULT_MODULES_TO_NOT_CONVERT",
    "SUPPORTED_DIFFUSERS",
    "DiTFastAttnConfig",
    "DiTFastAttnMismatch",
    "DiTFastAttnQuantizer",
    "EffalgDiffusersConfig",
    "EffalgDiffusersQuantizer",
    "EffalgLinearConfig",
    "EffalgLinearQuantizer",
    "EffalgQuantMethod",
    "MixDQConfig",
    "MixDQQuantizer",
    "ViDiTQConfig",
    "ModelScheduleRouter",
    "USFScheduler",
    "search_model_schedule",
    "search_solver_schedule",
    "ViDiTQQuantizer",
    "apply_ditfastattn",
    "calibrate",
    "default_modules_to_not_convert",
    "ditfastattn_runtime",
    "load_mixdq_bit_maps",
    "register_calibrator",
    "register_quantization_method",
    "remove_ditfastattn",
    "search_ditfastattn",
]
