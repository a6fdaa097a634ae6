"""Config dataclasses and the config-type -> handler registry behind :func:`quantize_` (torchao style).

A handler is ``handler(module, config, name) -> nn.Module | None``: it returns the replacement for ``module`` or None
to leave it alone. Methods register handlers for their own config types::

    @dataclass
    class MyConfig(EffalgConfig):
        bits: int = 8

    @register_handler(MyConfig)
    def _swap(module, config, name):
        return MyModule.from_float(module, config.bits) if isinstance(module, nn.Linear) else None

    quantize_(model, MyConfig(bits=4))
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

__all__ = [
    "EffalgConfig",
    "LinearQuantConfig",
    "register_handler",
    "get_handler",
    "quantize_",
    "check_module_names",
    "BitPlanConfig",
    "ModuleConfigMap",
]

logger = logging.getLogger(__name__)

Handler = Callable[[nn.Module, "EffalgConfig", str], "nn.Module | None"]
_HANDLERS: dict[type, Handler] = {}


@dataclass
class EffalgConfig:
    """Base for effalg configs. ``version`` (keyword-only) is the config's schema version (bump on breaking changes)."""

    version: int = field(default=1, kw_only=True)

    SUPPORTED_VERSIONS: ClassVar[tuple[int, ...]] = (1,)

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError(f"{type(self).__name__}: version must be an int, got {self.version!r}")
        if self.version not in self.SUPPORTED_VERSIONS:
            raise ValueError(
                f"{type(self).__name__}: version {self.version} is not supported (supported: {list(self.SUPPORTED_VERSIONS)})"
            )

    def check_model(self, model: nn.Module) -> None:
        """Hook called by :func:`quantize_` before swapping; raise ``ValueError`` if the config does not fit ``model``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serializable when the fields are)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them and the allowed keys."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict: data must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown key(s) {unknown}; allowed: {names}")
        return cls(**dict(data))


def register_handler(config_type: type[EffalgConfig]) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler(module, config, name)`` for ``config_type`` (and its subclasses)."""
    if not (isinstance(config_type, type) and issubclass(config_type, EffalgConfig)):
        raise TypeError(f"register_handler: config_type must be an EffalgConfig subclass, got {config_type!r}")

    def deco(fn: Handler) -> Handler:
        if not callable(fn):
            raise TypeError(f"register_handler: handler must be callable, got {fn!r}")
        _HANDLERS[config_type] = fn
        return fn

    return deco


def get_handler(config: EffalgConfig) -> Handler:
    """The handler registered for ``type(config)`` or its nearest registered base class."""
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise TypeError(f"no handler registered for config type {type(config).__name__}; use @register_handler")


def check_module_names(model: nn.Module, names: Iterable[str], what: str = "modules_to_not_convert") -> None:
    """Raise ``ValueError`` listing the ``names`` that are not module names of ``model``."""
    all_names = {n for n, _ in model.named_modules()}
    missing = [n for n in names if n not in all_names]
    if missing:
        raise ValueError(f"{what}: module name(s) not in the model {type(model).__name__}: {missing}")


def _is_excluded(name: str, excluded: Iterable[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in excluded)


def quantize_(
    model: nn.Module,
    config: EffalgConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    modules_to_not_convert: Iterable[str] = (),
) -> nn.Module:
    """Swap modules of ``model`` in place using the handler registered for ``type(config)``; returns ``model``.

    Every named module (the root excluded) that passes ``filter_fn(module, name)`` and is not in, or under, a name of
    ``modules_to_not_convert`` (plus ``config.modules_to_not_convert`` if the config has it) is offered to the handler.
    Names are exact module names (as in ``named_modules()``); excluding a name excludes its whole subtree.

    Raises:
        ValueError: a name to skip is not in the model, or no module was converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, EffalgConfig):
        raise TypeError(f"quantize_: config must be an EffalgConfig, got {type(config).__name__}")
    if isinstance(modules_to_not_convert, str):
        raise TypeError("quantize_: modules_to_not_convert must be a list of names, not a string")
    handler = get_handler(config)
    excluded = list(modules_to_not_convert) + list(getattr(config, "modules_to_not_convert", None) or [])
    check_module_names(model, excluded)
    config.check_model(model)
    candidates = [(n, m) for n, m in model.named_modules() if n]
    replaced: list[str] = []
    for name, module in candidates:
        if _is_excluded(name, excluded) or _is_excluded(name, replaced):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        new = handler(module, config, name)
        if new is None or new is module:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced.append(name)
    if not replaced:
        raise ValueError(
            f"quantize_: no quantizable layers found in {type(model).__name__} for {type(config).__name__} "
            f"(filter_fn={'set' if filter_fn else 'None'}, excluded={excluded})"
        )
    logger.info("quantize_: converted %d module(s) with %s", len(replaced), type(config).__name__)
    return model


@dataclass
class LinearQuantConfig(EffalgConfig):
    """Quantize every ``nn.Linear``: W8A8 / W4A8 (dynamic per-token int8 activations) or weight-only (``act_bits=None``).

    Args:
        weight_bits: {4, 8} with ``act_bits=8``; {3, 4, 8} weight-only.
        act_bits: 8 or None (weight-only).
        weight_group_size: 0 = per output channel; > 0 = groups along K (not for W8A8).
        weight_symmetric: symmetric weights (weight-only may set False for an asymmetric zero point).
        modules_to_not_convert: module names (subtrees) kept in float.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    weight_group_size: int = 0
    weight_symmetric: bool = True
    modules_to_not_convert: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_bits not in (8, None) or isinstance(self.act_bits, bool):
            raise ValueError(f"LinearQuantConfig: act_bits must be 8 or None, got {self.act_bits!r}")
        allowed = (4, 8) if self.act_bits == 8 else (3, 4, 8)
        if isinstance(self.weight_bits, bool) or self.weight_bits not in allowed:
            raise ValueError(
                f"LinearQuantConfig: weight_bits must be one of {list(allowed)} with act_bits={self.act_bits}, "
                f"got {self.weight_bits!r}"
            )
        if (
            isinstance(self.weight_group_size, bool)
            or not isinstance(self.weight_group_size, int)
            or self.weight_group_size < 0
        ):
            raise ValueError(
                f"LinearQuantConfig: weight_group_size must be an int >= 0, got {self.weight_group_size!r}"
            )
        if self.act_bits == 8 and self.weight_bits == 8 and self.weight_group_size != 0:
            raise ValueError("LinearQuantConfig: weight_group_size must be 0 for W8A8 (per-channel weight scales only)")
        if not isinstance(self.weight_symmetric, bool):
            raise TypeError(f"LinearQuantConfig: weight_symmetric must be a bool, got {self.weight_symmetric!r}")
        if self.act_bits == 8 and not self.weight_symmetric:
            raise ValueError(
                "LinearQuantConfig: weight_symmetric=False is only supported for weight-only (act_bits=None)"
            )
        if isinstance(self.modules_to_not_convert, str):
            raise TypeError("LinearQuantConfig: modules_to_not_convert must be a list of names, not a string")
        self.modules_to_not_convert = list(self.modules_to_not_convert or [])


@register_handler(LinearQuantConfig)
def _linear_quant_handler(module: nn.Module, config: LinearQuantConfig, name: str) -> nn.Module | None:
    # nn.Linear and subclasses, except MultiheadAttention's out_proj (MHA reads its .weight directly).
    if not isinstance(module, nn.Linear) or isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None
    from .modules import W4A8Linear, W8A8Linear, WeightOnlyLinear

    k, gs = module.in_features, config.weight_group_size
    if gs and k % gs:
        logger.warning("quantize_: skipping %s (in_features=%d not divisible by group size %d)", name, k, gs)
        return None
    if config.act_bits == 8 and config.weight_bits == 8:
        cls, kwargs = W8A8Linear, {}
    elif config.act_bits == 8:
        if k % 2:
            logger.warning("quantize_: skipping %s (W4A8 needs an even in_features, got %d)", name, k)
            return None
        cls, kwargs = W4A8Linear, {"group_size": gs}
    else:
        cls, kwargs = (
            WeightOnlyLinear,
            {"bits": config.weight_bits, "group_size": gs, "symmetric": config.weight_symmetric},
        )
    if module.weight.is_meta:
        return cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
            dtype=module.weight.dtype,
            **kwargs,
        )
    return cls.from_float(module, **kwargs)


@dataclass
class BitPlanConfig(EffalgConfig):
    """Per-layer bit widths from a :class:`~effalg.core.plans.BitPlan` (e.g. a mixed-precision search result).

    Each plan entry selects the module for that layer: ``(8, 8)`` -> :class:`W8A8Linear` / :class:`W8A8Conv2d`,
    ``(4, 8)`` -> :class:`W4A8Linear`, ``(3|4|8, None)`` -> :class:`WeightOnlyLinear`, ``(None, None)`` -> float.
    Layers absent from the plan stay float. ``quantize_`` raises if the plan names layers the model lacks.

    Args:
        plan: the plan as a dict (``BitPlan.to_dict()``), or a :class:`BitPlan` (stored as its dict).
        weight_group_size: group size for W4A8 / weight-only layers (0 = per output channel).
    """

    plan: dict = field(default_factory=dict)
    weight_group_size: int = 0
    modules_to_not_convert: list[str] = field(default_factory=list)

    _SUPPORTED: ClassVar[set] = {(8, 8), (4, 8), (3, None), (4, None), (8, None), (None, None)}

    def __post_init__(self) -> None:
        super().__post_init__()
        from .plans import BitPlan, Plan

        if isinstance(self.plan, Plan):
            self.plan = self.plan.to_dict()
        bp = Plan.from_dict(self.plan)
        if not isinstance(bp, BitPlan):
            raise ValueError(f"BitPlanConfig: plan must be a bit_plan, got kind {bp.kind!r}")
        for name, e in bp.entries.items():
            combo = (e["weight_bits"], e["act_bits"])
            if combo not in self._SUPPORTED:
                raise ValueError(
                    f"BitPlanConfig: layer {name!r} has (weight_bits, act_bits)={combo}, not supported by the kernels "
                    f"(supported: {sorted(self._SUPPORTED, key=str)})"
                )
        if (
            isinstance(self.weight_group_size, bool)
            or not isinstance(self.weight_group_size, int)
            or self.weight_group_size < 0
        ):
            raise ValueError(f"BitPlanConfig: weight_group_size must be an int >= 0, got {self.weight_group_size!r}")
        self._bit_plan = bp
        self.modules_to_not_convert = list(self.modules_to_not_convert or [])

    @property
    def bit_plan(self):
        """The parsed :class:`~effalg.core.plans.BitPlan`."""
        return self._bit_plan

    def check_model(self, model: nn.Module) -> None:
        self._bit_plan.validate_against(model)


@register_handler(BitPlanConfig)
def _bit_plan_handler(module: nn.Module, config: BitPlanConfig, name: str) -> nn.Module | None:
    entry = config.bit_plan.entries.get(name)
    if entry is None or (entry["weight_bits"], entry["act_bits"]) == (None, None):
        return None
    wb, ab = entry["weight_bits"], entry["act_bits"]
    if isinstance(module, nn.Conv2d):
        from .modules import W8A8Conv2d

        if (wb, ab) != (8, 8):
            raise ValueError(
                f"BitPlanConfig: layer {name!r} is a Conv2d; only (8, 8) is supported for convs, got {(wb, ab)}"
            )
        if module.weight.is_meta:
            return W8A8Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, module.bias is not None, device="meta",
                              dtype=module.weight.dtype)  # fmt: skip
        return W8A8Conv2d.from_float(module)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"BitPlanConfig: layer {name!r} is a {type(module).__name__}, not an nn.Linear or nn.Conv2d")
    sub = LinearQuantConfig(
        weight_bits=wb, act_bits=ab, weight_group_size=0 if (wb, ab) == (8, 8) else config.weight_group_size
    )
    return _linear_quant_handler(module, sub, name)


def _registered_config_class(name: str) -> type[EffalgConfig]:
    for klass in _HANDLERS:
        if klass.__name__ == name:
            return klass
    raise ValueError(f"ModuleConfigMap: unknown config type {name!r} (registered: {sorted(k.__name__ for k in _HANDLERS)})")


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


@dataclass
class ModuleConfigMap(EffalgConfig):
    """Different configs for different parts of a model (torchao's ``ModuleFqnToConfig``).

    ``configs`` maps a module-name prefix to a config; each module is offered to the handler of the config with the
    longest prefix containing it (``""`` = every module no other prefix covers; a module no prefix covers is left
    alone). E.g. ``{"": LinearQuantConfig(3, None, 128), "model.vision_tower": LinearQuantConfig(4, 8)}``.

    Args:
        configs: prefix -> config (an :class:`EffalgConfig` of a registered type, or its ``to_dict()`` with a
            ``"type"`` key naming the class).
        modules_to_not_convert: module names (subtrees) kept in float, whatever their prefix.
    """

    configs: dict = field(default_factory=dict)
    modules_to_not_convert: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.configs, Mapping) or not self.configs:
            raise ValueError(f"ModuleConfigMap: configs must be a non-empty dict of prefix -> config, got {self.configs!r}")
        parsed: dict[str, EffalgConfig] = {}
        for prefix, cfg in self.configs.items():
            if not isinstance(prefix, str):
                raise TypeError(f"ModuleConfigMap: prefix {prefix!r} must be a module name (str)")
            if isinstance(cfg, Mapping):
                data = dict(cfg)
                if "type" not in data:
                    raise ValueError(f"ModuleConfigMap: config of {prefix!r} needs a 'type' key naming its class")
                cfg = _registered_config_class(data.pop("type")).from_dict(data)
            if not isinstance(cfg, EffalgConfig) or isinstance(cfg, ModuleConfigMap):
                raise TypeError(
                    f"ModuleConfigMap: config of {prefix!r} must be an EffalgConfig (not a map), got {type(cfg).__name__}"
                )
            get_handler(cfg)
            parsed[prefix] = cfg
        self.configs = parsed
        if isinstance(self.modules_to_not_convert, str):
            raise TypeError("ModuleConfigMap: modules_to_not_convert must be a list of names, not a string")
        self.modules_to_not_convert = list(self.modules_to_not_convert or [])

    def config_for(self, name: str) -> EffalgConfig | None:
        """The config of the longest prefix containing module ``name`` (None: no prefix does)."""
        best = None
        for prefix in self.configs:
            if _under(name, prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        return None if best is None else self.configs[best]

    def check_model(self, model: nn.Module) -> None:
        check_module_names(model, [p for p in self.configs if p], "ModuleConfigMap.configs")
        for cfg in self.configs.values():
            check_module_names(model, getattr(cfg, "modules_to_not_convert", None) or [])
            cfg.check_model(model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "configs": {p: {"type": type(c).__name__, **c.to_dict()} for p, c in self.configs.items()},
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "version": self.version,
        }


@register_handler(ModuleConfigMap)
def _module_config_map_handler(module: nn.Module, config: ModuleConfigMap, name: str) -> nn.Module | None:
    sub = config.config_for(name)
    if sub is None or _is_excluded(name, getattr(sub, "modules_to_not_convert", None) or []):
        return None
    return get_handler(sub)(module, sub, name)
