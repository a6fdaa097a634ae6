"""Generic transformers ``HfQuantizer`` driven by an effalg-core config and its registered handler."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effalg.core.config import get_handler
from effalg.core.modules import QuantModuleBase, buffers_to_parameters_, offload_hooked, parameters_to_buffers_
from effalg.kernels.allocator import account_transient, begin_bounded_allocations, end_bounded_allocations
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils import logging

from .hub import install_save_hook

logger = logging.get_logger(__name__)

__all__ = ["EffalgHfQuantizer", "EffalgQuantizeOp"]


class EffalgQuantizeOp(ConversionOps):
    """On-the-fly quantization of one float ``<prefix>.weight`` into the target module's stored tensors."""

    def __init__(self, hf_quantizer: EffalgHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self, input_dict: dict[str, Any], model: nn.Module | None = None, missing_keys: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        ((name, value),) = input_dict.items()
        w = value[0] if isinstance(value, (list, tuple)) else value
        prefix = name.rsplit(".", 1)[0]
        if missing_keys is not None:
            missing_keys.discard(name)  # the meta ``weight`` placeholder is consumed, not loaded
        target = model.get_submodule(prefix)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(w.detach(), requires_grad=False)  # from_float upcasts block of rows by block
        q = self.hf_quantizer.handler(lin, self.hf_quantizer.core_config, prefix)
        if q is None or type(q) is not type(target):
            raise ValueError(f"effalg: could not quantize {prefix} as {type(target).__name__}")
        if hasattr(q, "unpack_"):
            q.unpack_()
        account_transient(w.numel() * w.element_size())
        state = q.state_dict()
        stored = {k for k, _ in target.named_buffers(recurse=False)} | {
            k for k, _ in target.named_parameters(recurse=False)
        }
        return {f"{prefix}.{k}": v for k, v in state.items() if k in stored and k not in ("bias", "smooth_scale")}


class EffalgHfQuantizer(HfQuantizer):
    """Base quantizer: swaps modules on the meta model with the effalg-core handler of ``config.to_core_config()``.

    Float checkpoints are quantized while loading (``get_quantize_ops``); pre-quantized checkpoints load directly
    into the swapped modules, which declare exactly the stored tensors (``qweight``, ``weight_scale``, ...).
    """

    requires_calibration = False

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.core_config = quantization_config.to_core_config()
        self.handler = get_handler(self.core_config)
        self.modules_to_not_convert: list[str] = []
        self.converted: list[str] = []

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.float32 if dtype is None else dtype

    def _swap_modules(self, model: nn.Module) -> None:
        for name, module in list(model.named_modules()):
            if (
                not name
                or not isinstance(module, nn.Linear)
                or not should_convert_module(name, self.modules_to_not_convert)
            ):
                continue
            new = self.handler(module, self.core_config, name)
            if new is not None and new is not module:
                if not self.pre_quantized:
                    # float checkpoint: a meta ``weight`` placeholder makes the loader route it to the quantize op
                    new.register_parameter("weight", nn.Parameter(module.weight, requires_grad=False))
                model.set_submodule(name, new)
                self.converted.append(name)

    def _process_model_before_weight_loading(self, model: nn.Module, keep_in_fp32_modules=None, **kwargs: Any) -> None:
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model,
            self.quantization_config.modules_to_not_convert,
            keep_in_fp32_modules or getattr(model, "_keep_in_fp32_modules", None),
            add_default_skips=False,
        )
        self._swap_modules(model)
        if not self.converted:
            raise ValueError(
                f"effalg: no quantizable nn.Linear layers in {type(model).__name__} "
                f"(modules_to_not_convert={self.modules_to_not_convert})"
            )
        logger.info(
            "effalg: converted %d linear layers with %s", len(self.converted), self.quantization_config.quant_method
        )
        model.config.quantization_config = self.quantization_config
        if self.pre_quantized and kwargs.get("device_map") is not None:
            # accelerate's offload hooks move parameters only (unless offload_buffers=True): hold the packed tensors
            # as parameters so offloaded layers reload them; in-memory layers get buffers back after loading
            for name in self.converted:
                buffers_to_parameters_(model.get_submodule(name))
        begin_bounded_allocations()  # until _process_model_after_weight_loading: transient buffers leave no heap

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantModuleBase) and tensor_name == "weight"

    def get_quantize_ops(self) -> EffalgQuantizeOp:
        return EffalgQuantizeOp(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        end_bounded_allocations()
        for m in model.modules():
            if isinstance(m, QuantModuleBase) and "weight" in m._parameters:
                del m._parameters["weight"]
        missing = [  # offloaded layers hold meta placeholders: accelerate's hooks load their tensors at each forward
            f"{name}.{t}"
            for name, m in model.named_modules()
            if isinstance(m, QuantModuleBase) and not offload_hooked(m)
            for t, v in list(m.named_buffers(recurse=False)) + list(m.named_parameters(recurse=False))
            if t != "bias" and (v.is_meta or not getattr(v, "_is_hf_initialized", False))
        ]
        if missing:
            raise ValueError(
                f"effalg: {len(missing)} quantized tensor(s) missing from the checkpoint, e.g. {missing[:5]}; "
                "the checkpoint does not match the quantization_config"
            )
        parameters_to_buffers_(model, keep_offloaded=True)  # buffers again where no offload hook reloads them
        for m in model.modules():
            if isinstance(m, QuantModuleBase) and hasattr(m, "prepack_"):
                if all(t.device.type == "cpu" for t in m.buffers(recurse=False)):
                    m.prepack_()
        install_save_hook(model)  # save_pretrained also writes the model card
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
