"""ViDiT-Q (Zhao et al., ICLR 2025) for diffusers DiTs: config, quantizer and calibration.

W8A8 / W4A8 ``nn.Linear`` layers of image and video diffusion transformers on effalg's kernels (int8 / packed int4
per-output-channel weights, dynamic per-token int8 activations), with ViDiT-Q's *static-dynamic channel balance*
(SmoothQuant-style per-input-channel scales from calibration, then a seeded randomized Hadamard rotation) and its
*metric-decoupled mixed precision* (per-layer W4-vs-W8 sensitivity under the metric of the layer's type, bits
allocated by ``effalg.core``'s MILP under an average-bit budget). Three pieces:

* :class:`ViDiTQConfig`: the ``quantization_config`` (model level, ``PipelineQuantizationConfig`` or directly at the
  pipeline level). Quantize-on-load applies the data-free parts (weights, dynamic activations, rotation, a given
  ``plan``); the saved config also records which layers carry calibrated smooth scales.
* :class:`ViDiTQQuantizer`: the diffusers quantizer (registered on ``import effalg.diffusers``).
* :func:`calibrate` (registered for :class:`ViDiTQConfig` with ``effalg.diffusers.calibrate``): computes smooth
  scales, rotations and (if asked) the mixed-precision plan from a float run of the pipeline, and quantizes the
  pipeline's denoiser in place. Running the pipeline, the per-layer sensitivity loop and the MILP are shared with
  the other calibration-based methods (:mod:`effalg.diffusers.pipeline_calibration`, :mod:`effalg.core.allocation`);
  this module holds ViDiT-Q's own pieces: its metric groups, channel balance and layer choice.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from diffusers.utils import logging
from effalg.core.allocation import allocate_bits, normalize_costs_by_group
from effalg.core.config import LinearQuantConfig
from effalg.core.modules import QuantModuleBase, W4A8Linear, W8A8Linear
from effalg.core.plans import BitPlan, Plan
from effalg.core.quant.rotation import HadamardRotation
from effalg.core.quant.smooth import compute_smooth_scale
from effalg.kernels import hadamard_block_size

from .config import EffalgDiffusersConfig, EffalgQuantMethod, _matches, check_plan_layers, normalize_bit_plan
from .pipeline_calibration import (
    CalibrationRun,
    FinalLatentsMetric,
    MetricGroup,
    ModuleOutputMetric,
    PipelineRunner,
    check_prompts,
    float_denoiser,
    install_quantized,
    layer_sensitivity,
    register_calibrator,
    relative_error,
    run_float,
    select_layers,
)
from .quantizer import EffalgDiffusersQuantizer

__all__ = ["AUTO_BALANCE", "ViDiTQConfig", "ViDiTQQuantizer", "calibrate", "layer_metric_group"]

logger = logging.get_logger(__name__)

_ALLOWED_WEIGHT_BITS = (4, 8)
_ALLOWED_ACT_BITS = (8,)
_MODULES = {8: W8A8Linear, 4: W4A8Linear}
#: ``balance_layers`` value asking :func:`calibrate` to balance only layers whose calibrated input channels are
#: imbalanced (per-channel abs-max max / median >= 8); the chosen names are then stored in the config.
AUTO_BALANCE = "auto"


def _layer_seed(base: int, name: str) -> int:
    """Per-layer rotation seed derived from ``rotation_seed`` and the layer name (stable across processes)."""
    return (int(base) * 1000003 + zlib.crc32(name.encode("utf-8"))) % (2**31 - 1)


def layer_metric_group(name: str) -> str:
    """ViDiT-Q's metric group of a layer: ``"temporal"`` (temporal attention: temporal consistency), ``"cross"``
    (cross-attention ``attn2``: text alignment) or ``"visual"`` (everything else: visual quality)."""
    if re.search(r"temporal", name) and re.search(r"attn", name):
        return "temporal"
    if re.search(r"(^|\.)attn2\.", name):
        return "cross"
    return "visual"


def _is_quantizable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


class ViDiTQConfig(EffalgDiffusersConfig):
    """ViDiT-Q W8A8 / W4A8 quantization of a diffusion transformer's ``nn.Linear`` layers.

    Args:
        weight_bits: default weight bits, 4 or 8 (per output channel, symmetric; packed int4 for 4).
        act_bits: 8 (dynamic per-token symmetric int8 activations).
        weight_group_size: 0 = per output channel; > 0 = groups along the input dim (W4 layers only).
        smooth_alpha: SmoothQuant migration strength in (0, 1] for the calibrated channel balance,
            ``s = max|W|**alpha / max|X|**(1 - alpha)`` applied as ``x * s`` (weights ``W / s``); None disables
            smoothing. Needs :func:`calibrate` (quantize-on-load has no activation statistics).
        rotation: apply a randomized Hadamard rotation to the balanced layers' inputs (data-free; folded into the
            weights, signs saved in the checkpoint).
        rotation_seed: seed of the rotations' random signs (per layer, derived from this and the layer name).
        rotation_block_size: Hadamard block size (a power of two dividing every balanced layer's in_features);
            None = ``effalg.kernels.hadamard_block_size(in_features)`` per layer.
        balance_layers: which quantized layers get smoothing and rotation: ``"auto"`` (default): :func:`calibrate`
            picks the layers whose input channels are imbalanced (abs-max max / median >= 8; ViDiT-Q's released
            heuristic) and stores their names (quantize-on-load with ``"auto"`` balances nothing); None = all; a regex
            (``re.search`` on the layer name, e.g. ``"attn|ff"``); or a list of names / full-match regexes.
        plan: mixed-precision plan, a :class:`~effalg.core.plans.BitPlan` (or its dict) or ``{layer: bits}``;
            entries are ``weight_bits`` 4 / 8 (``act_bits`` 8) or None (keep the layer in float). Layers not in the
            plan use ``weight_bits``. Names must be layers of the model.
        mixed_precision: ask :func:`calibrate` for ViDiT-Q's metric-decoupled plan: ``{"avg_bits": 6.0}`` (or just
            the number), the size-weighted average weight bits over the quantized layers, in [4, 8].
        smoothed_layers: set by :func:`calibrate` (the layers whose checkpoint holds ``smooth_scale``); leave None.
        modules_to_not_convert: see :class:`~effalg.diffusers.config.EffalgDiffusersConfig` (None: embedders, adaLN
            modulation and final layers stay in float).
        version: config schema version.
        attention_plan: a DiTFastAttn plan active on the model after loading (see :class:`EffalgDiffusersConfig`).
    """

    method = EffalgQuantMethod.VIDIT_Q
    core_config_cls = LinearQuantConfig
    calibrated_fields = ("smoothed_layers",)
    _fields = (
        "weight_bits",
        "act_bits",
        "weight_group_size",
        "smooth_alpha",
        "rotation",
        "rotation_seed",
        "rotation_block_size",
        "balance_layers",
        "plan",
        "mixed_precision",
        "smoothed_layers",
    )

    def __init__(
        self,
        weight_bits: int = 8,
        act_bits: int = 8,
        weight_group_size: int = 0,
        smooth_alpha: float | None = 0.5,
        rotation: bool = True,
        rotation_seed: int = 0,
        rotation_block_size: int | None = None,
        balance_layers: str | Sequence[str] | None = "auto",
        plan: BitPlan | Mapping[str, Any] | None = None,
        mixed_precision: float | Mapping[str, Any] | None = None,
        smoothed_layers: Sequence[str] | None = None,
        modules_to_not_convert: Iterable[str] | None = None,
        version: int = 1,
        quant_method: str | None = None,
        attention_plan: Any = None,
    ) -> None:
        super().__init__(
            weight_bits=weight_bits,
            act_bits=act_bits,
            weight_group_size=weight_group_size,
            smooth_alpha=smooth_alpha,
            rotation=rotation,
            rotation_seed=rotation_seed,
            rotation_block_size=rotation_block_size,
            balance_layers=balance_layers,
            plan=plan,
            mixed_precision=mixed_precision,
            smoothed_layers=smoothed_layers,
            modules_to_not_convert=modules_to_not_convert,
            version=version,
            quant_method=quant_method,
            attention_plan=attention_plan,
        )

    # ---- validation ----------------------------------------------------------------------------------------------
    def to_core_config(self, modules_to_not_convert: Iterable[str] | None = None) -> LinearQuantConfig:
        """Validates the ViDiT-Q fields (normalizing ``plan`` / ``mixed_precision``); returns the default-bits
        :class:`~effalg.core.config.LinearQuantConfig`."""
        wb, ab = self.weight_bits, self.act_bits
        if isinstance(wb, bool) or wb not in _ALLOWED_WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {list(_ALLOWED_WEIGHT_BITS)}, got {wb!r}")
        if isinstance(ab, bool) or ab not in _ALLOWED_ACT_BITS:
            raise ValueError(f"act_bits must be one of {list(_ALLOWED_ACT_BITS)}, got {ab!r}")
        gs = self.weight_group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 0 or gs % 2:
            raise ValueError(f"weight_group_size must be an even int >= 0, got {gs!r}")
        a = self.smooth_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < float(a) <= 1.0):
            raise ValueError(f"smooth_alpha must be a float in (0, 1] or None, got {a!r}")
        if not isinstance(self.rotation, bool):
            raise TypeError(f"rotation must be a bool, got {self.rotation!r}")
        if isinstance(self.rotation_seed, bool) or not isinstance(self.rotation_seed, int) or self.rotation_seed < 0:
            raise ValueError(f"rotation_seed must be an int >= 0, got {self.rotation_seed!r}")
        rb = self.rotation_block_size
        if rb is not None and (isinstance(rb, bool) or not isinstance(rb, int) or rb < 1 or rb & (rb - 1)):
            raise ValueError(f"rotation_block_size must be None or a power of two, got {rb!r}")
        bl = self.balance_layers
        if isinstance(bl, str):
            try:
                re.compile(bl)
            except re.error as e:
                raise ValueError(f"balance_layers: invalid regex {bl!r}: {e}") from None
        elif bl is not None:
            if not isinstance(bl, (list, tuple)) or not all(isinstance(x, str) for x in bl):
                raise TypeError(f"balance_layers must be None, a regex string or a list of names, got {bl!r}")
            self.balance_layers = list(bl)
        self.plan = normalize_bit_plan(self.plan, _ALLOWED_WEIGHT_BITS)
        self.mixed_precision = self._normalize_mixed_precision(self.mixed_precision)
        sl = self.smoothed_layers
        if sl is not None:
            if isinstance(sl, str) or not all(isinstance(x, str) for x in sl):
                raise TypeError(f"smoothed_layers must be None or a list of layer names, got {sl!r}")
            self.smoothed_layers = list(sl)
        mtnc = self.modules_to_not_convert if modules_to_not_convert is None else modules_to_not_convert
        return LinearQuantConfig(
            weight_bits=wb,
            act_bits=ab,
            weight_group_size=0 if wb == 8 else gs,
            modules_to_not_convert=list(mtnc or []),
            version=self.version,
        )

    @staticmethod
    def _normalize_mixed_precision(mp: Any) -> dict | None:
        if mp is None:
            return None
        if isinstance(mp, (int, float)) and not isinstance(mp, bool):
            mp = {"avg_bits": float(mp)}
        if not isinstance(mp, Mapping):
            raise TypeError(f"mixed_precision must be None, a number or {{'avg_bits': ...}}, got {mp!r}")
        unknown = sorted(set(mp) - {"avg_bits", "candidate_bits"})
        if unknown:
            raise ValueError(f"mixed_precision: unknown key(s) {unknown}; allowed: ['avg_bits', 'candidate_bits']")
        avg = mp.get("avg_bits")
        if isinstance(avg, bool) or not isinstance(avg, (int, float)) or not 4.0 <= float(avg) <= 8.0:
            raise ValueError(f"mixed_precision: avg_bits must be a number in [4, 8], got {avg!r}")
        cand = list(mp.get("candidate_bits", _ALLOWED_WEIGHT_BITS))
        if sorted(set(cand)) != sorted(cand) or not set(cand) <= set(_ALLOWED_WEIGHT_BITS) or not cand:
            raise ValueError(
                f"mixed_precision: candidate_bits must be distinct values of {list(_ALLOWED_WEIGHT_BITS)}, got {cand}"
            )
        return {"avg_bits": float(avg), "candidate_bits": sorted(cand)}

    # ---- resolution on a model -------------------------------------------------------------------------------------
    @property
    def bit_plan(self) -> BitPlan | None:
        """The parsed ``plan`` (None if not set)."""
        return None if self.plan is None else Plan.from_dict(self.plan)

    def resolved_for(self, model: nn.Module) -> ViDiTQConfig:
        """A copy with exact ``modules_to_not_convert`` names; checks ``plan`` and ``balance_layers`` against ``model``
        (``ValueError`` naming the layers it lacks)."""
        out = super().resolved_for(model)
        check_plan_layers(self.plan, model, out.modules_to_not_convert, _is_quantizable_linear, "ViDiTQConfig")
        if isinstance(self.balance_layers, list):
            names = [n for n, _ in model.named_modules() if n]
            unused = [e for e in self.balance_layers if not any(_matches(n, e) for n in names)]
            if unused:
                raise ValueError(f"ViDiTQConfig.balance_layers: no module of {type(model).__name__} matches {unused}")
        if self.smoothed_layers:
            named = dict(model.named_modules())
            missing = [n for n in self.smoothed_layers if n not in named]
            if missing:
                raise ValueError(f"ViDiTQConfig.smoothed_layers: not in {type(model).__name__}: {missing[:20]}")
        return out

    def is_balanced(self, name: str) -> bool:
        """Whether layer ``name`` gets channel balancing (smoothing + rotation) under ``balance_layers``."""
        bl = self.balance_layers
        if bl is None:
            return True
        if bl == AUTO_BALANCE:
            return False
        if isinstance(bl, str):
            return re.search(bl, name) is not None
        return any(_matches(name, e) for e in bl)

    def layer_bits(self, name: str) -> int | None:
        """Weight bits of layer ``name`` (plan entry, else ``weight_bits``); None = float."""
        if self.plan is not None:
            e = self.plan["entries"].get(name)
            if e is not None:
                return e["weight_bits"]
        return self.weight_bits

    @property
    def method_tag(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}" + ("-mp" if self.plan is not None else "")

    @property
    def card_tags(self) -> list[str]:
        """Extra model-card tags."""
        return ["vidit-q"] + (["mixed-precision"] if self.plan is not None else [])


# ---- building quantized layers -------------------------------------------------------------------------------------
def _layer_kind(cfg: ViDiTQConfig, module: nn.Module, name: str) -> tuple[int, int] | None:
    """``(bits, group_size)`` for a layer, or None to keep it float."""
    if not _is_quantizable_linear(module):
        return None
    bits = cfg.layer_bits(name)
    if bits is None:
        return None
    k = module.in_features
    gs = cfg.weight_group_size if bits == 4 else 0
    if bits == 4 and k % 2:
        logger.warning("ViDiT-Q: keeping %s in float (W4A8 needs an even in_features, got %d)", name, k)
        return None
    if gs and k % gs:
        logger.warning("ViDiT-Q: keeping %s in float (in_features=%d not divisible by group size %d)", name, k, gs)
        return None
    return bits, gs


def _quantized_linear(
    linear: nn.Linear,
    bits: int,
    group_size: int,
    smooth_scale: torch.Tensor | None,
    rotation_seed: int | None,
    rotation_block_size: int | None = None,
    prepack: bool = True,
) -> QuantModuleBase:
    """The W8A8 / W4A8 module for ``linear`` (empty on ``meta`` if ``linear`` is), with optional smoothing/rotation.

    Smoothing and rotation are folded into the quantized weight (``(W / s) @ R``); at run time the module applies
    ``x * s`` and ``x @ R`` in one fused ``effalg.kernels.smooth_hadamard`` call before the low-bit GEMM.
    """
    cls = _MODULES[bits]
    kw = {"group_size": group_size} if bits == 4 else {}
    k = linear.in_features
    block = None
    if rotation_seed is not None:
        block = rotation_block_size or hadamard_block_size(k)
    if linear.weight.is_meta:
        return cls(
            k,
            linear.out_features,
            bias=linear.bias is not None,
            has_smooth_scale=smooth_scale is not None,
            input_rotation_block=block,
            device="meta",
            dtype=linear.weight.dtype,
            **kw,
        )
    rot = None if block is None else HadamardRotation(k, block, seed=rotation_seed, device=linear.weight.device)
    return cls.from_float(linear, smooth_scale=smooth_scale, input_transform=rot, prepack=prepack, **kw)


class ViDiTQQuantizer(EffalgDiffusersQuantizer):
    """diffusers quantizer for :class:`ViDiTQConfig` (quantize-on-load and pre-quantized checkpoints)."""

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        if not self.pre_quantized and self.quantization_config.smooth_alpha is not None:
            logger.info("ViDiT-Q: quantize-on-load has no activation statistics; smoothing needs calibrate()")
        return super()._process_model_before_weight_loading(model, device_map, keep_in_fp32_modules, **kwargs)

    def convert_module(self, module: nn.Module, name: str) -> nn.Module | None:
        cfg = self.quantization_config
        kind = _layer_kind(cfg, module, name)
        if kind is None:
            return None
        bits, gs = kind
        smoothed = set(cfg.smoothed_layers or ())
        smooth = None
        if name in smoothed:
            if not module.weight.is_meta:  # pragma: no cover - guarded in _process_model_before_weight_loading
                raise ValueError(f"ViDiT-Q: {name} needs its calibrated smooth_scale from a pre-quantized checkpoint")
            smooth = torch.ones(module.in_features, device="meta")
        seed = _layer_seed(cfg.rotation_seed, name) if cfg.rotation and cfg.is_balanced(name) else None
        return _quantized_linear(module, bits, gs, smooth, seed, cfg.rotation_block_size, prepack=False)


# ---- calibration ----------------------------------------------------------------------------------------------------
@register_calibrator(ViDiTQConfig)
@torch.no_grad()
def calibrate(
    pipe,
    prompts: Sequence[str],
    config: ViDiTQConfig,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    sensitivity_prompts: int = 1,
    progress: bool = True,
    **call_kwargs: Any,
):
    """Calibrate ViDiT-Q on ``pipe`` with ``prompts`` and quantize its denoiser in place; returns ``pipe``.

    What ``effalg.diffusers.calibrate`` runs for a :class:`ViDiTQConfig`. Runs the float pipeline on every prompt
    (``num_inference_steps``, ``guidance_scale``, generator seeded with ``seed + i``, any other ``call_kwargs`` such
    as ``height``/``width``) under a tqdm bar over prompts x steps, collecting the per-input-channel activation
    abs-max of every quantized linear over all timesteps and both CFG branches. Then, per ``config``: smooth scales
    with ``smooth_alpha`` on the ``balance_layers``, seeded Hadamard rotations, and, with ``mixed_precision``, the
    metric-decoupled plan: each layer's sensitivity is the error when it alone is quantized (W4A8 and W8A8,
    everything else float) under the metric of its type (cross-attention: the ``attn2`` output's
    conditional-minus-unconditional difference, temporal attention: frame-to-frame differences of its output, others:
    final latents vs float, on the first ``sensitivity_prompts`` prompts), normalized per group and allocated by
    :func:`effalg.core.allocation.allocate_bits` under ``avg_bits``. The resulting config (with its plan and the
    smoothed layers) is what ``pipe.save_pretrained`` writes.

    Raises:
        ValueError: empty ``prompts``, an already quantized denoiser, no quantizable layers, a bad plan.
        TypeError: ``config`` is not a :class:`ViDiTQConfig` or ``pipe`` has no denoiser.
    """
    if not isinstance(config, ViDiTQConfig):
        raise TypeError(f"calibrate: config must be a ViDiTQConfig, got {type(config).__name__}")
    prompts = check_prompts(prompts, num_inference_steps)
    _, model = float_denoiser(pipe, config)
    cfg = config.resolved_for(model)
    layers: dict[str, tuple[nn.Linear, int, int]] = select_layers(
        model, cfg.modules_to_not_convert, lambda n, m: _calibrated_layer(cfg, m, n)
    )
    auto = cfg.balance_layers == AUTO_BALANCE
    balanced = list(layers) if auto else [n for n in layers if cfg.is_balanced(n)]
    want_mp = cfg.mixed_precision is not None and cfg.plan is None
    runner = PipelineRunner(pipe, model, num_inference_steps, guidance_scale, seed, call_kwargs)
    n_sens = max(1, min(int(sensitivity_prompts), len(prompts))) if want_mp else 0

    # 1. float run: activation statistics, recorded denoiser calls and final latents (sensitivity prompts).
    stat_layers = {n: layers[n][0] for n in balanced} if cfg.smooth_alpha is not None or auto else {}
    run = run_float(
        runner, prompts, modules=stat_layers, record=n_sens, desc="ViDiT-Q calibration", progress=progress,
        per_call=False,
    )  # fmt: skip
    stats = run.stats
    if auto:  # ViDiT-Q's heuristic: balance the layers whose input channels are imbalanced
        balanced = [n for n in balanced if stats is not None and n in stats and _imbalance(stats[n].absmax) >= 8.0]
        cfg.balance_layers = list(balanced)

    smooth: dict[str, torch.Tensor] = {}
    if stats is not None:
        for n in balanced:
            if n in stats:
                smooth[n] = compute_smooth_scale(stats[n].absmax, layers[n][0].weight, float(cfg.smooth_alpha))
    seeds = {n: _layer_seed(cfg.rotation_seed, n) for n in balanced} if cfg.rotation else {}

    def build(name: str, bits: int) -> QuantModuleBase:
        linear, _, gs = layers[name]
        return _quantized_linear(
            linear, bits, gs if bits == 4 else 0, smooth.get(name), seeds.get(name), cfg.rotation_block_size
        )

    # 2. metric-decoupled mixed precision.
    if want_mp:
        cfg.plan = _search_plan(run, layers, build, cfg.mixed_precision, progress).to_dict()
        for name in list(layers):
            bits = cfg.layer_bits(name)
            linear, _, gs = layers[name]
            if bits is None:
                del layers[name]
            else:
                layers[name] = (linear, bits, gs)

    # 3. swap in the quantized layers.
    cfg.smoothed_layers = sorted(n for n in smooth if n in layers)
    install_quantized(model, cfg, ViDiTQQuantizer, {name: build(name, bits) for name, (_, bits, _) in layers.items()})
    logger.info(
        "ViDiT-Q: quantized %d layer(s) of %s (%d smoothed, %d rotated)",
        len(layers),
        type(model).__name__,
        len(cfg.smoothed_layers),
        sum(1 for n in layers if n in seeds),
    )
    return pipe


def _calibrated_layer(cfg: ViDiTQConfig, module: nn.Module, name: str) -> tuple[nn.Linear, int, int] | None:
    kind = _layer_kind(cfg, module, name)
    return None if kind is None else (module, *kind)


def _imbalance(absmax: torch.Tensor) -> float:
    """Channel imbalance of an activation: max / median of the per-channel abs-max."""
    med = float(absmax.float().median())
    return float(absmax.max()) / med if med > 0 else math.inf


def _parent_attention(name: str) -> str:
    """Name of the attention module holding layer ``name`` (e.g. ``...attn2`` for ``...attn2.to_out.0``)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].startswith("attn"):
            return ".".join(parts[:i])
    return name.rpartition(".")[0] or name


def _cfg_difference_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Text alignment: error of the conditional-minus-unconditional output (CFG batch ``[uncond; cond]``)."""
    if ref.shape[0] % 2 == 0 and ref.shape[0] >= 2:
        u, c = ref.chunk(2)
        uo, co = out.chunk(2)
        return relative_error(c - u, co - uo)
    return relative_error(ref, out)


def _frame_difference_error(ref: torch.Tensor, out: torch.Tensor) -> float | None:
    """Temporal consistency: error of the frame-to-frame differences (None: a single frame)."""
    return relative_error(ref.diff(dim=-2), out.diff(dim=-2)) if ref.shape[-2] > 1 else None


def _search_plan(run: CalibrationRun, layers, build, mp, progress) -> BitPlan:
    """ViDiT-Q's metric-decoupled mixed-precision search (see :func:`calibrate`)."""
    cand = tuple(mp["candidate_bits"])
    groups = {n: layer_metric_group(n) for n in layers}
    metrics = {
        "cross": MetricGroup(ModuleOutputMetric(_parent_attention, _cfg_difference_error), cand),
        "temporal": MetricGroup(ModuleOutputMetric(_parent_attention, _frame_difference_error), cand),
        "visual": MetricGroup(FinalLatentsMetric(), cand),
    }
    sens = layer_sensitivity(run, groups, metrics, build, desc="ViDiT-Q sensitivity", progress=progress)
    # Normalize per metric group (mean sensitivity of the group's lowest bit width = 1), then allocate.
    costs, norms = normalize_costs_by_group(sens, groups)
    sizes = {n: layers[n][0].weight.numel() for n in layers}
    alloc = allocate_bits(costs, sizes, avg_bits=mp["avg_bits"])
    model = run.runner.model
    logger.info("ViDiT-Q mixed precision: %s average weight bits over %d layers", alloc.avg_bits, len(layers))
    return BitPlan.from_bits(
        weight_bits=alloc.bits,
        act_bits={n: 8 for n in alloc.bits},
        model={"class": type(model).__name__, "name_or_path": str(getattr(model.config, "_name_or_path", ""))},
        metadata={
            "method": "vidit_q",
            "avg_bits_budget": mp["avg_bits"],
            "avg_bits": alloc.avg_bits,
            "groups": groups,
            "group_norms": norms,
            "sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in sens.items()},
        },
    )
