"""Generic diffusers quantizer driven by an ``effalg.core`` config and its registered handler.

Loading paths (``ModelMixin.from_pretrained``):

* **on the fly** (float checkpoint + ``quantization_config=``): before loading, the layers to convert are only
  recorded (they stay ``nn.Linear`` on ``meta``). Each of their ``weight`` tensors is routed to
  :meth:`EffalgDiffusersQuantizer.create_quantized_param`, which quantizes it with the core handler and swaps in the
  quantized module; the ``bias`` is loaded into that module afterwards (or copied if it came first).
* **pre-quantized** (``quantization_config`` in ``config.json``): before loading, the layers are swapped for empty
  (``meta``) quantized modules whose state dict matches the checkpoint tensor for tensor; integer and fp32 qparam
  tensors are loaded without the float ``torch_dtype`` cast.

After loading, CPU modules are prepacked (``prepack_()``) and ``model.save_pretrained`` is decorated to write a model
card and to refuse writing over the checkpoint the model was loaded from (see :mod:`effalg.diffusers.hub`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.utils import logging
from effalg.core.config import get_handler
from effalg.core.modules import QuantModuleBase, buffers_to_parameters_, parameters_to_buffers_, prepack_model_
from effalg.kernels.allocator import account_transient, begin_bounded_allocations, end_bounded_allocations

from .config import EffalgDiffusersConfig

__all__ = ["EffalgDiffusersQuantizer", "EffalgLinearQuantizer"]

logger = logging.get_logger(__name__)


def _in_keep_fp32(name: str, keep_in_fp32_modules) -> bool:
    # diffusers' own rule: a keep-in-fp32 entry matches a component of the dotted name.
    parts = name.split(".")
    return any(m in parts for m in keep_in_fp32_modules or ())


def _float_twin(layer: nn.Module, weight: torch.Tensor, device: torch.device) -> nn.Module | None:
    """A real ``nn.Linear`` / ``nn.Conv2d`` like (meta) ``layer`` holding ``weight`` itself (no copy) and ``layer``'s
    bias (zeros if the bias is not loaded yet: it is loaded into the quantized module afterwards)."""
    if isinstance(layer, nn.Linear):
        tmp = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                        dtype=weight.dtype)  # fmt: skip
    elif isinstance(layer, nn.Conv2d):
        tmp = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
                        device="meta", dtype=weight.dtype)  # fmt: skip
    else:
        return None
    if tuple(weight.shape) != tuple(tmp.weight.shape):
        raise ValueError(f"effalg: weight of shape {tuple(weight.shape)} for a layer of weight shape "
                         f"{tuple(tmp.weight.shape)}")  # fmt: skip
    tmp.weight = nn.Parameter(weight.detach().to(device), requires_grad=False)
    if tmp.bias is not None:
        bias = torch.zeros(tmp.bias.shape, dtype=weight.dtype, device=device) if layer.bias.is_meta else layer.bias
        tmp.bias = nn.Parameter(bias.detach().to(device=device, dtype=weight.dtype), requires_grad=False)
    return tmp


def _check_no_disk_offload(method: str, device_map: Any, converted: list[str]) -> None:
    """Quantizing a float checkpoint while loading needs each layer's weight in memory; diffusers writes the weights
    of ``"disk"`` modules straight to the offload folder. Say so first."""
    if not isinstance(device_map, dict):
        return
    for key, dev in device_map.items():
        if dev != "disk":
            continue
        hit = next((c for c in converted if key == "" or c == key or c.startswith(key + ".") or key.startswith(c + ".")),
                   None)  # fmt: skip
        if hit is not None:
            raise ValueError(
                f"{method}: device_map puts {key or 'the model'!r} on 'disk', which holds {hit!r}, a layer to quantize "
                "while loading; quantize first (from_pretrained without device_map, then save_pretrained) and load "
                "the quantized folder with the device_map"
            )


class EffalgDiffusersQuantizer(DiffusersQuantizer):
    """Base quantizer for effalg configs (:class:`~effalg.diffusers.config.EffalgDiffusersConfig`).

    Subclasses usually only override :meth:`convert_module` (which modules become what) and, for calibration-based
    methods, :meth:`_process_model_after_weight_loading`.
    """

    requires_calibration = False
    use_keep_in_fp32_modules = True
    required_packages = None

    def __init__(self, quantization_config: EffalgDiffusersConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, EffalgDiffusersConfig):
            raise TypeError(
                f"{type(self).__name__}: quantization_config must be an EffalgDiffusersConfig, "
                f"got {type(quantization_config).__name__}"
            )
        super().__init__(quantization_config, **kwargs)
        self.converted: list[str] = []  # names of the layers that are (or become) quantized modules
        self._converted_names: frozenset[str] = frozenset()
        self.checkpoint_files: list[str] = []
        self._core_config = None

    # ---- extension hook -------------------------------------------------------------------------------------------
    def convert_module(self, module: nn.Module, name: str) -> nn.Module | None:
        """Quantized replacement for ``module`` (meta modules give an empty one), or None to keep it.

        Default: the ``effalg.core`` handler registered for the core config.
        """
        return get_handler(self._core_config)(module, self._core_config, name)

    # ---- diffusers hooks ------------------------------------------------------------------------------------------
    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        # With None, diffusers casts checkpoint tensors to the placeholders' dtype: keep float placeholders fp32.
        return torch.float32 if torch_dtype is None else torch_dtype

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # modules are swapped while loading

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self.checkpoint_files = [
            os.path.abspath(f) for f in checkpoint_files or [] if isinstance(f, (str, os.PathLike))
        ]
        return loaded_keys

    def _check_quantize_on_load(self) -> None:
        """A float checkpoint cannot carry what calibration computes: fields in ``calibrated_fields``, or a
        ``mixed_precision`` search without a ``plan``."""
        cfg = self.quantization_config
        name = type(cfg).__name__
        for field in cfg.calibrated_fields:
            if getattr(cfg, field, None):
                raise ValueError(
                    f"{name}.{field} is set but the checkpoint is not quantized: it comes from "
                    "effalg.diffusers.calibrate(...)"
                )
        if getattr(cfg, "mixed_precision", None) is not None and getattr(cfg, "plan", None) is None:
            raise ValueError(
                f"{name}.mixed_precision needs calibration data: use effalg.diffusers.calibrate(pipe, prompts, config) "
                "(or pass a plan)"
            )

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        if not self.pre_quantized:
            self._check_quantize_on_load()
        cfg = self.quantization_config.resolved_for(model)
        self.quantization_config = cfg
        model.register_to_config(quantization_config=cfg)  # what save_pretrained writes (resolved names)
        self.modules_to_not_convert = list(cfg.modules_to_not_convert)
        self._core_config = cfg.to_core_config()
        skip = set(self.modules_to_not_convert)
        self.converted = []
        for name, module in list(model.named_modules()):
            if not name or name in skip or any(name.startswith(s + ".") for s in skip):
                continue
            if _in_keep_fp32(name, keep_in_fp32_modules):
                continue
            if any(name.startswith(c + ".") for c in self.converted):
                continue
            with torch.device("meta"):
                new = self.convert_module(module, name)
            if new is None or new is module:
                continue
            if self.pre_quantized:
                model.set_submodule(name, new)
            self.converted.append(name)
        self._converted_names = frozenset(self.converted)
        if not self.pre_quantized:
            _check_no_disk_offload(cfg.method.value, device_map, self.converted)
        elif device_map is not None:  # accelerate offloads parameters only: hold the packed tensors as parameters
            for name in self.converted:
                buffers_to_parameters_(model.get_submodule(name))
        if not self.converted:
            raise ValueError(
                f"{cfg.method.value}: no quantizable layers in {type(model).__name__} "
                f"(modules_to_not_convert={self.modules_to_not_convert}, keep_in_fp32_modules={keep_in_fp32_modules})"
            )
        logger.info("%s: %d layer(s) of %s to quantize", cfg.method.value, len(self.converted), type(model).__name__)
        begin_bounded_allocations()  # until _process_model_after_weight_loading: transient buffers leave no heap
        return model

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        if not self.pre_quantized:
            return missing_keys
        quantized = [k for k in missing_keys if any(k.startswith(c + ".") for c in self.converted)]
        if quantized:
            raise ValueError(
                f"{self.quantization_config.method.value}: the pre-quantized checkpoint of {type(model).__name__} is "
                f"missing quantized tensor(s) {sorted(quantized)[:20]}"
                + (f" (+{len(quantized) - 20} more)" if len(quantized) > 20 else "")
                + ". Was it saved with a different config or without quantization?"
            )
        return missing_keys

    def _owner(self, param_name: str) -> tuple[str, str] | None:
        """``(converted layer, tensor path inside it)`` for a tensor of a converted layer (or of its submodules)."""
        parts = param_name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            layer = ".".join(parts[:i])
            if layer in self._converted_names:
                return layer, ".".join(parts[i:])
        return None

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        owner = self._owner(param_name)
        if owner is None:
            return False
        layer, tensor = owner
        if not self.pre_quantized:
            return tensor == "weight"
        # Integer codes and qparams load as stored (no torch_dtype cast); biases and the buffers a module lists in
        # ``_model_dtype_buffers`` (e.g. a float BOS weight) take diffusers' normal path and follow the model dtype.
        module_name, _, name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        return not (name == "bias" or name in getattr(module, "_model_dtype_buffers", ()))

    def create_quantized_param(
        self, model, param_value, param_name, target_device, state_dict=None, unexpected_keys=None, **kwargs
    ) -> None:
        module_name, _, tensor_name = param_name.rpartition(".")
        if self.pre_quantized:
            # ``param_value`` may already be cast to torch_dtype: take the stored tensor (fp32 scales stay exact).
            value = state_dict[param_name] if state_dict is not None and param_name in state_dict else param_value
            set_module_tensor_to_device(model, param_name, target_device, value=value)
            return
        layer = model.get_submodule(module_name)
        tmp = _float_twin(layer, param_value, torch.device(target_device))  # "cpu", an index or a torch.device
        if tmp is None:
            raise TypeError(
                f"{type(self).__name__}: {module_name} is {type(layer).__name__}, expected nn.Linear or nn.Conv2d"
            )
        new = self.convert_module(tmp, module_name)
        if new is None:
            raise RuntimeError(
                f"{type(self).__name__}: {module_name} was selected for conversion but the handler declined it"
            )
        model.set_submodule(module_name, new)
        account_transient(param_value.numel() * param_value.element_size())

    def _process_model_after_weight_loading(self, model, **kwargs):
        end_bounded_allocations()
        left = [n for n in self.converted if not isinstance(model.get_submodule(n), QuantModuleBase)]
        if left:
            logger.warning(
                "%s: layers not quantized (no weight in the checkpoint): %s",
                self.quantization_config.method.value,
                left,
            )
        parameters_to_buffers_(model, keep_offloaded=True)  # buffers again where no offload hook reloads them
        prepack_model_(model)
        from .hub import install_save_hook

        install_save_hook(model, self.checkpoint_files)
        if self.quantization_config.attention_plan is not None:
            from .ditfastattn import apply_ditfastattn

            apply_ditfastattn(model, self.quantization_config.attention_plan, record=False)
        return model

    def _dequantize(self, model):
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantModuleBase) and hasattr(module, "dequantize_weight"):
                bias = getattr(module, "bias", None)
                dtype = bias.dtype if bias is not None else torch.float32
                w = module.dequantize_weight(dtype)
                lin = nn.Linear(
                    module.in_features, module.out_features, bias=bias is not None, device=w.device, dtype=dtype
                )
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if bias is not None:
                        lin.bias.copy_(bias)
                model.set_submodule(name, lin)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


class EffalgLinearQuantizer(EffalgDiffusersQuantizer):
    """Quantizer for :class:`~effalg.diffusers.config.EffalgLinearConfig` (all behaviour from the base)."""
