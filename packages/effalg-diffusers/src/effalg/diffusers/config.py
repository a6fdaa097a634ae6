"""diffusers quantization configs for effalg methods.

An effalg diffusers config mirrors an ``effalg.core`` config (:meth:`EffalgDiffusersConfig.to_core_config`) and is
accepted in three places:

* ``SomeModel.from_pretrained(path, quantization_config=cfg)``;
* ``DiffusionPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(quant_mapping={...}))``;
* ``DiffusionPipeline.from_pretrained(path, quantization_config=cfg)`` directly (see :class:`EffalgDiffusersConfig`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any, ClassVar

from torch import nn

from diffusers.quantizers.pipe_quant_config import PipelineQuantizationConfig
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from effalg.core.config import EffalgConfig, LinearQuantConfig
from effalg.core.plans import BitPlan, Plan, PlanError

__all__ = [
    "DEFAULT_MODULES_TO_NOT_CONVERT",
    "EffalgQuantMethod",
    "EffalgDiffusersConfig",
    "EffalgLinearConfig",
    "default_modules_to_not_convert",
    "match_module_names",
    "normalize_bit_plan",
    "check_plan_layers",
]


class EffalgQuantMethod(str, Enum):
    """``quant_method`` values of effalg configs (diffusers reads ``quant_method.value``)."""

    LINEAR = "effalg_linear"
    VIDIT_Q = "effalg_vidit_q"
    MIXDQ = "effalg_mixdq"
    DITFASTATTN = "effalg_ditfastattn"


#: Full-match regexes of module names kept in float by default: embedders, adaLN modulation, final layers
#: (PixArt, SD3, Flux, UNet2DConditionModel and similar models).
DEFAULT_MODULES_TO_NOT_CONVERT: tuple[str, ...] = (
    # input / patch / caption / time embedders
    "pos_embed",
    "x_embedder",
    "context_embedder",
    "caption_projection",
    "adaln_single",
    "time_text_embed",
    "time_embedding",
    "add_embedding",
    "class_embedding",
    "encoder_hid_proj",
    # adaLN modulation inside blocks (SD3 / Flux AdaLayerNormZero, UNet resnet time projections)
    r".*transformer_blocks\.\d+\.norm1(_context)?",
    r"single_transformer_blocks\.\d+\.norm",
    r".*\.time_emb_proj",
    # final layers
    "norm_out",
    "proj_out",
)


def _matches(name: str, entry: str) -> bool:
    if name == entry or name.startswith(entry + "."):
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def match_module_names(model: nn.Module, entries: Iterable[str], strict: bool = True) -> list[str]:
    """Names of ``model``'s modules selected by ``entries`` (exact names, their subtrees, or full-match regexes).

    Only the top-most selected names are returned. With ``strict``, an entry that selects nothing raises
    ``ValueError`` naming it.
    """
    entries = list(entries)
    names = [n for n, _ in model.named_modules() if n]
    selected: list[str] = []
    unused = []
    for e in entries:
        hit = [n for n in names if _matches(n, e)]
        if not hit:
            unused.append(e)
        selected.extend(hit)
    if strict and unused:
        raise ValueError(f"modules_to_not_convert: no module of {type(model).__name__} matches {unused}")
    chosen = set(selected)
    return [n for n in names if n in chosen and not any(n.startswith(p + ".") for p in chosen)]


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Module names of ``model`` (holding ``nn.Linear`` layers) that :data:`DEFAULT_MODULES_TO_NOT_CONVERT` keeps in float."""
    names = match_module_names(model, DEFAULT_MODULES_TO_NOT_CONVERT, strict=False)
    return [n for n in names if any(isinstance(m, nn.Linear) for m in model.get_submodule(n).modules())]


def normalize_bit_plan(plan: Any, weight_bits: Iterable[int], act_bits: int = 8) -> dict | None:
    """A plan argument (a :class:`~effalg.core.plans.BitPlan`, its dict, or ``{layer: bits | None}``) as a
    ``BitPlan`` dict; each entry must be ``(b, act_bits)`` with ``b`` in ``weight_bits``, or ``(None, None)`` (float).
    """
    if plan is None:
        return None
    if isinstance(plan, Plan):
        plan = plan.to_dict()
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a BitPlan, its dict or {{layer: bits}}, got {type(plan).__name__}")
    if plan.get("format") is None:  # {layer: bits | {"weight_bits": .., "act_bits": ..}}
        entries = {}
        for name, v in plan.items():
            if v is None or isinstance(v, int):
                entries[name] = {"weight_bits": v, "act_bits": None if v is None else act_bits}
            else:
                entries[name] = v
        bp = BitPlan(entries=entries)
    else:
        bp = Plan.from_dict(plan)
        if not isinstance(bp, BitPlan):
            raise ValueError(f"plan must be a bit_plan, got kind {bp.kind!r}")
    allowed = [(b, act_bits) for b in weight_bits] + [(None, None)]
    for name, e in bp.entries.items():
        combo = (e["weight_bits"], e["act_bits"])
        if combo not in allowed:
            raise ValueError(
                f"plan: layer {name!r} has (weight_bits, act_bits)={combo}; allowed: weight_bits in "
                f"{list(weight_bits)} with act_bits {act_bits}, or None (float)"
            )
    return bp.to_dict()


def check_plan_layers(plan: dict | None, model: nn.Module, skip: Iterable[str], quantizable, owner: str) -> None:
    """Check that every layer of ``plan`` is a module of ``model`` and every quantized one is ``quantizable(module)``
    and not under ``skip``; ``ValueError`` naming the offending layers otherwise."""
    if plan is None:
        return
    bp = Plan.from_dict(plan)
    try:
        bp.validate_against(model)
    except PlanError as e:
        raise ValueError(f"{owner}.plan: {e}") from None
    skip = list(skip)
    bad = [
        n
        for n, e in bp.entries.items()
        if e["weight_bits"] is not None
        and (not quantizable(model.get_submodule(n)) or any(n == s or n.startswith(s + ".") for s in skip))
    ]
    if bad:
        raise ValueError(
            f"{owner}.plan: layer(s) {bad[:20]} of {type(model).__name__} are not quantizable layers (or are kept in "
            "float by modules_to_not_convert)"
        )


def _attention_plan_dict(plan: Any, owner: str) -> dict | None:
    """``plan`` (a DiTFastAttn plan or its dict) validated, as a dict."""
    if plan is None:
        return None
    from effalg.core.ditfastattn_plan import DiTFastAttnPlan

    if isinstance(plan, Mapping):
        plan = Plan.from_dict(plan, source=f"{owner}.attention_plan")
    if not isinstance(plan, DiTFastAttnPlan):
        got = plan.kind if isinstance(plan, Plan) else type(plan).__name__
        raise TypeError(f"{owner}: attention_plan must be a DiTFastAttn plan or its dict, got {got}")
    return plan.to_dict()


class EffalgDiffusersConfig(QuantizationConfigMixin, PipelineQuantizationConfig):
    """Base of effalg diffusers configs.

    Subclasses set ``method`` (an :class:`EffalgQuantMethod`), ``core_config_cls`` and ``_fields`` (the saved keys
    besides ``quant_method``/``version``/``modules_to_not_convert``).

    ``modules_to_not_convert``: None (default) keeps :data:`DEFAULT_MODULES_TO_NOT_CONVERT` in float; otherwise a list
    of exact module names (whole subtrees) or full-match regexes; ``[]`` converts every supported layer. The names
    actually kept in float are resolved on the model at load time and saved with the checkpoint.

    **Pipeline-level use.** ``DiffusionPipeline.from_pretrained(..., quantization_config=...)`` only accepts a
    ``PipelineQuantizationConfig``, so this class also derives from it and implements its single per-component
    hook, ``_resolve_quant_config(is_diffusers, module_name)``: it returns the config itself for the pipeline's
    denoiser (a diffusers component named in :attr:`pipeline_components`, ``transformer`` or ``unet`` by default)
    and ``None`` for everything else, so text encoders and the VAE load in float. The other
    ``PipelineQuantizationConfig`` attributes are class-level ``None``/empty (not saved).

    ``attention_plan``: a DiTFastAttn plan (:class:`~effalg.core.ditfastattn_plan.DiTFastAttnPlan` or its dict)
    activated on the model after loading (:func:`effalg.diffusers.apply_ditfastattn`), so one denoiser carries
    quantized layers and compressed attention, saved in one folder.
    """

    method: ClassVar[EffalgQuantMethod]
    core_config_cls: ClassVar[type[EffalgConfig]]
    _fields: ClassVar[tuple[str, ...]] = ()
    #: Fields only ``effalg.diffusers.calibrate`` writes (set on a float checkpoint: a clear error at load).
    calibrated_fields: ClassVar[tuple[str, ...]] = ()
    pipeline_components: ClassVar[tuple[str, ...]] = ("transformer", "unet")

    # PipelineQuantizationConfig protocol (read by DiffusionPipeline.from_pretrained); nothing is stored per instance.
    quant_backend: ClassVar[None] = None
    quant_kwargs: ClassVar[dict] = {}
    components_to_quantize: ClassVar[None] = None
    quant_mapping: ClassVar[None] = None
    is_granular: ClassVar[bool] = False

    def __init__(
        self,
        *,
        modules_to_not_convert: Iterable[str] | None = None,
        version: int = 1,
        quant_method: str | None = None,
        attention_plan: Any = None,
        **fields: Any,
    ) -> None:
        name = type(self).__name__
        if quant_method is not None and str(getattr(quant_method, "value", quant_method)) != self.method.value:
            raise ValueError(f"{name}: quant_method must be {self.method.value!r}, got {quant_method!r}")
        unknown = sorted(set(fields) - set(self._fields))
        if unknown:
            raise TypeError(f"{name}: unknown argument(s) {unknown}; allowed: {list(self._fields)}")
        if isinstance(modules_to_not_convert, str):
            raise TypeError(f"{name}: modules_to_not_convert must be a list of names, not a string")
        self.quant_method = self.method
        self.version = version
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.attention_plan = _attention_plan_dict(attention_plan, name)
        for k in self._fields:
            if k in fields:
                setattr(self, k, fields[k])
        try:
            self.to_core_config()  # validates
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from e

    # ---- core config -------------------------------------------------------------------------------------------
    def to_core_config(self, modules_to_not_convert: Iterable[str] | None = None) -> EffalgConfig:
        """The ``effalg.core`` config this mirrors (``modules_to_not_convert`` overrides the stored one)."""
        kw = {k: getattr(self, k) for k in self._fields}
        mtnc = self.modules_to_not_convert if modules_to_not_convert is None else modules_to_not_convert
        return self.core_config_cls(**kw, modules_to_not_convert=list(mtnc or []), version=self.version)

    def resolved_for(self, model: nn.Module) -> EffalgDiffusersConfig:
        """A copy whose ``modules_to_not_convert`` holds the exact module names of ``model`` kept in float."""
        out = copy.deepcopy(self)
        if self.modules_to_not_convert is None:
            out.modules_to_not_convert = default_modules_to_not_convert(model)
        else:
            out.modules_to_not_convert = match_module_names(model, self.modules_to_not_convert)
        return out

    @property
    def method_tag(self) -> str:
        """Short tag for model cards, e.g. ``w8a8``."""
        return self.method.value.replace("_", "-")

    # ---- serialization -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": self.method.value, "version": self.version}
        d.update({k: copy.deepcopy(getattr(self, k)) for k in self._fields})
        d["modules_to_not_convert"] = copy.deepcopy(self.modules_to_not_convert)
        if self.attention_plan is not None:
            d["attention_plan"] = copy.deepcopy(self.attention_plan)
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    __hash__ = object.__hash__

    # ---- PipelineQuantizationConfig hook -----------------------------------------------------------------------
    def _resolve_quant_config(self, is_diffusers: bool = True, module_name: str | None = None):
        return self if is_diffusers and module_name in self.pipeline_components else None

    @property
    def config_mapping(self) -> dict[str, Any]:
        return {}


class EffalgLinearConfig(EffalgDiffusersConfig):
    """Quantize the denoiser's ``nn.Linear`` layers with ``effalg.core``'s :class:`~effalg.core.config.LinearQuantConfig`.

    Args:
        weight_bits: 4 or 8 with ``act_bits=8`` (W4A8 / W8A8, dynamic per-token int8 activations); 3, 4 or 8
            weight-only (``act_bits=None``).
        act_bits: 8 or None.
        weight_group_size: 0 = per output channel scales; > 0 = groups along the input dim (not for W8A8).
        weight_symmetric: False only for weight-only.
        modules_to_not_convert: see :class:`EffalgDiffusersConfig` (None = embedders, adaLN modulation and final
            layers stay in float).
        version: config schema version.
        attention_plan: a DiTFastAttn plan active on the model after loading (see :class:`EffalgDiffusersConfig`).
    """

    method = EffalgQuantMethod.LINEAR
    core_config_cls = LinearQuantConfig
    _fields = ("weight_bits", "act_bits", "weight_group_size", "weight_symmetric")

    def __init__(
        self,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        weight_group_size: int = 0,
        weight_symmetric: bool = True,
        modules_to_not_convert: Iterable[str] | None = None,
        version: int = 1,
        quant_method: str | None = None,
        attention_plan: Any = None,
    ) -> None:
        super().__init__(
            weight_bits=weight_bits,
            act_bits=act_bits,
            weight_group_size=weight_group_size,
            weight_symmetric=weight_symmetric,
            modules_to_not_convert=modules_to_not_convert,
            version=version,
            quant_method=quant_method,
            attention_plan=attention_plan,
        )

    @property
    def method_tag(self) -> str:
        act = f"a{self.act_bits}" if self.act_bits else "a16"
        return f"w{self.weight_bits}{act}"
