"""effalg methods for transformers: ``import effalg.transformers`` registers the effalg quantization methods.

import effalg.transformers
from effalg.transformers import EffalgLinearConfig
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=EffalgLinearConfig(weight_bits=8, act_bits=8))
"""

from ._version_gate import check_transformers_version

check_transformers_version()

from ._registry import is_registered, register_method  # noqa: E402
from .config import EffalgHfConfigMixin, EffalgLinearConfig  # noqa: E402
from .hub import save_quantized, write_model_card  # noqa: E402
from .quantizer import EffalgHfQuantizer, EffalgQuantizeOp  # noqa: E402

register_method(EffalgLinearConfig.quant_method_name, EffalgLinearConfig, EffalgHfQuantizer)

__all__ = [
    "EffalgHfConfigMixin",
    "EffalgHfQuantizer",
    "EffalgLinearConfig",
    "EffalgQuantizeOp",
    "is_registered",
    "register_method",
    "save_quantized",
    "write_model_card",
]
