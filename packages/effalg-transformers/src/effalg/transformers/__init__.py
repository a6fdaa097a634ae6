"""effalg methods for transformers: ``import effalg.transformers`` registers the effalg quantization methods and
``attn_implementation="moa"`` (see :mod:`effalg.transformers.moa`).

import effalg.transformers
from effalg.transformers import EffalgLinearConfig
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=EffalgLinearConfig(weight_bits=8, act_bits=8))
"""

from ._version_gate import check_transformers_version

check_transformers_version()

from ._registry import is_registered, register_method  # noqa: E402
from .config import EffalgHfConfigMixin, EffalgLinearConfig  # noqa: E402
from .hub import PLUGIN_ATTENTION, register_plugin_attention, save_quantized, write_model_card  # noqa: E402
from .mbq import MBQConfig, MBQQuantizer, calibrate_mbq  # noqa: E402
from .moa import MoACache, apply_moa, dense_attention, moa_config, register_moa  # noqa: E402
from .quantizer import EffalgHfQuantizer, EffalgQuantizeOp  # noqa: E402

register_method(EffalgLinearConfig.quant_method_name, EffalgLinearConfig, EffalgHfQuantizer)
register_method(MBQConfig.quant_method_name, MBQConfig, MBQQuantizer)
register_moa()
register_plugin_attention()

__all__ = [
    "PLUGIN_ATTENTION",
    "EffalgHfConfigMixin",
    "EffalgHfQuantizer",
    "EffalgLinearConfig",
    "EffalgQuantizeOp",
    "MBQConfig",
    "MBQQuantizer",
    "MoACache",
    "apply_moa",
    "calibrate_mbq",
    "dense_attention",
    "is_registered",
    "moa_config",
    "register_method",
    "register_moa",
    "register_plugin_attention",
    "save_quantized",
    "search_moa",
    "write_model_card",
]


def __getattr__(name: str):
    if name == "search_moa":  # lazy: keeps ``python -m effalg.transformers.moa_search`` free of runpy warnings
        from .moa_search import search_moa

        return search_moa
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
