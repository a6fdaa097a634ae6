"""MixDQ (Zhao et al., ECCV 2024) for diffusers UNets: config, quantizer and calibration.

Mixed-precision W8A8 / W4A8 / W2A8 quantization of every ``nn.Linear`` **and** ``nn.Conv2d`` of a
``UNet2DConditionModel`` on effalg's kernels (``effalg.kernels.wxa8_linear``: int8, packed int4 and int2
per-output-channel weights x int8 activations, static per-tensor asymmetric or dynamic per token), with MixDQ's own
pieces:

* **BOS-aware cross-attention**: token 0 of the text embedding (CLIP's BOS, orders of magnitude larger than the
  other tokens) takes a float path in ``attn2.to_k`` / ``attn2.to_v`` (:class:`~effalg.core.modules.BOSAwareWxA8Linear`);
  for a causal text encoder :func:`calibrate` stores the precomputed float K/V rows instead of float weights.
* **static activation ranges** (EMA min-max over timesteps and both CFG branches) with the **shortcut split** of
  up-block layers whose input concatenates a skip connection (:class:`~effalg.core.modules.InputSplitConv2d`);
* **activation-sensitive layers kept in float**, picked by measured sensitivity;
* **metric-decoupled mixed precision**: content layers (``attn2``, ``ff``) scored by image SSIM, quality layers by
  the UNet output's SQNR, per-group MILP budgets swept over the content/quality ratio, final pick by pixel error.

Running the pipeline, per-layer sensitivity and the MILP are shared with ViDiT-Q
(:mod:`effalg.diffusers.pipeline_calibration`, :mod:`effalg.core.allocation`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from diffusers.utils import logging
from effalg.core.allocation import allocate_bits, allocate_bits_by_group, normalize_costs_by_group
from effalg.core.calibration import RangeCollector, static_act_qparams
from effalg.core.config import EffalgConfig
from effalg.core.metrics import mse, ssim
from effalg.core.modules import BOSAwareWxA8Linear, InputSplitConv2d, QuantModuleBase, WxA8Conv2d, WxA8Linear
from effalg.core.plans import BitPlan, Plan

from .config import (
    EffalgDiffusersConfig,
    EffalgQuantMethod,
    check_plan_layers,
    match_module_names,
    normalize_bit_plan,
)
from .pipeline_calibration import (
    CalibrationRun,
    FinalImageMetric,
    MetricGroup,
    ModuleOutputMetric,
    PipelineRunner,
    check_prompts,
    float_denoiser,
    install_quantized,
    layer_sensitivity,
    register_calibrator,
    run_float,
    select_layers,
    swap_layers,
)
from .quantizer import EffalgDiffusersQuantizer

__all__ = [
    "MIXDQ_DEFAULT_FLOAT_MODULES",
    "MixDQConfig",
    "MixDQQuantizer",
    "calibrate",
    "is_bos_layer",
    "is_content_layer",
    "load_mixdq_bit_maps",
]

logger = logging.get_logger(__name__)

_WEIGHT_BITS = (2, 4, 8)
_CONTENT_BITS = (2, 4, 8)
_QUALITY_BITS = (4, 8)
#: Modules kept in float by default: the layers MixDQ's own activation sensitivity ranks first (``conv_in``,
#: ``conv_out``) and the time / added-condition embeddings.
MIXDQ_DEFAULT_FLOAT_MODULES: tuple[str, ...] = (
    "conv_in",
    "conv_out",
    "time_embedding",
    "add_embedding",
    "class_embedding",
    "encoder_hid_proj",
)
_MP_KEYS = ("avg_bits", "metric", "num_ratios", "num_targets")
_MILP_SECONDS = 10.0  # per MILP of the sweep (a near-optimal candidate is fine: the pixel-error pick decides)


def is_content_layer(name: str) -> bool:
    """MixDQ's content group: cross-attention (``attn2``) and feed-forward (``ff``) layers."""
    return re.search(r"(^|\.)(attn2|ff)\.", name) is not None


def is_bos_layer(name: str) -> bool:
    """Cross-attention key / value projections (where MixDQ keeps the BOS token in float)."""
    return re.search(r"(^|\.)attn2\.to_[kv]$", name) is not None


def _is_quantizable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


class MixDQConfig(EffalgDiffusersConfig):
    """MixDQ quantization of a ``UNet2DConditionModel`` (every ``nn.Linear`` and ``nn.Conv2d``).

    Args:
        weight_bits: default weight bits: 2, 4 or 8 (per output channel, symmetric; 2-bit packed four per byte).
        act_bits: 8 (int8 activations: dynamic per token after quantize-on-load, static per tensor after
            :func:`calibrate`).
        bos_aware: keep token 0 of the text embedding in float in ``attn2.to_k`` / ``attn2.to_v``.
        mixed_precision: ask :func:`calibrate` for MixDQ's metric-decoupled weight bits: ``{"avg_bits": 4.0}`` (or
            the number), the parameter-weighted average over the quantized layers; optional ``"metric"``
            (``"decoupled"``, default, or ``"sqnr"``: one SQNR group, for ablations), ``"num_ratios"`` (10) and
            ``"num_targets"`` (5) of the content/quality budget sweep.
        plan: per-layer bits, a :class:`~effalg.core.plans.BitPlan` (or its dict) or ``{layer: bits | None}``
            (None = float); :func:`load_mixdq_bit_maps` reads the original's YAML bit maps.
        float_layers: how many of the most activation-sensitive layers :func:`calibrate` keeps in float:
            ``"auto"`` (``round(sqrt(n) / 3)``, at least 1, for ``n`` quantized layers: 9 of SDXL's 794 as in the
            original, 3 of a 60-layer UNet) or an int (0: none). Ignored when ``plan`` is given.
        modules_to_not_convert: see :class:`~effalg.diffusers.config.EffalgDiffusersConfig` (None:
            :data:`MIXDQ_DEFAULT_FLOAT_MODULES`).
        static_act_layers, split_layers, bos_rows: written by :func:`calibrate` (layers with static activation
            ranges, ``{layer: channel range sizes}`` of the shortcut split, ``"precomputed"`` when the BOS rows are
            stored); leave them unset.
        version: config schema version.
        attention_plan: a DiTFastAttn plan active on the model after loading (see :class:`EffalgDiffusersConfig`).
    """

    method = EffalgQuantMethod.MIXDQ
    core_config_cls = EffalgConfig
    pipeline_components = ("unet",)
    calibrated_fields = ("static_act_layers", "split_layers", "bos_rows")
    _fields = (
        "weight_bits",
        "act_bits",
        "bos_aware",
        "mixed_precision",
        "plan",
        "float_layers",
        "static_act_layers",
        "split_layers",
        "bos_rows",
    )

    def __init__(
        self,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        bos_aware: bool = True,
        mixed_precision: float | Mapping[str, Any] | None = None,
        plan: BitPlan | Mapping[str, Any] | None = None,
        float_layers: int | str = "auto",
        modules_to_not_convert: Iterable[str] | None = None,
        static_act_layers: Sequence[str] | None = None,
        split_layers: Mapping[str, Sequence[int]] | None = None,
        bos_rows: str | None = None,
        version: int = 1,
        quant_method: str | None = None,
        attention_plan: Any = None,
    ) -> None:
        super().__init__(
            weight_bits=weight_bits,
            act_bits=act_bits,
            bos_aware=bos_aware,
            mixed_precision=mixed_precision,
            plan=plan,
            float_layers=float_layers,
            static_act_layers=static_act_layers,
            split_layers=split_layers,
            bos_rows=bos_rows,
            modules_to_not_convert=modules_to_not_convert,
            version=version,
            quant_method=quant_method,
            attention_plan=attention_plan,
        )

    # ---- validation ----------------------------------------------------------------------------------------------
    def to_core_config(self, modules_to_not_convert: Iterable[str] | None = None) -> EffalgConfig:
        """Validates (and normalizes) the fields."""
        wb, ab = self.weight_bits, self.act_bits
        if isinstance(wb, bool) or wb not in _WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {list(_WEIGHT_BITS)}, got {wb!r}")
        if ab is None:
            raise ValueError(
                "act_bits=None (weight-only) is not available for MixDQ yet: effalg has no weight-only Conv2d "
                "kernel, and MixDQ quantizes the convolutions; use act_bits=8"
            )
        if isinstance(ab, bool) or ab != 8:
            raise ValueError(f"act_bits must be 8, got {ab!r}")
        if not isinstance(self.bos_aware, bool):
            raise TypeError(f"bos_aware must be a bool, got {self.bos_aware!r}")
        self.plan = normalize_bit_plan(self.plan, _WEIGHT_BITS)
        self.mixed_precision = _normalize_mixed_precision(self.mixed_precision)
        fl = self.float_layers
        if fl != "auto" and (isinstance(fl, bool) or not isinstance(fl, int) or fl < 0):
            raise ValueError(f"float_layers must be 'auto' or an int >= 0, got {fl!r}")
        sal = self.static_act_layers
        if sal is not None:
            if isinstance(sal, str) or not all(isinstance(x, str) for x in sal):
                raise TypeError(f"static_act_layers must be None or a list of layer names, got {sal!r}")
            self.static_act_layers = list(sal)
        sl = self.split_layers
        if sl is not None:
            if not isinstance(sl, Mapping) or not all(
                isinstance(v, (list, tuple)) and len(v) >= 2 and all(isinstance(c, int) and c > 0 for c in v)
                for v in sl.values()
            ):
                raise TypeError(f"split_layers must be None or {{layer: [channels, ...]}}, got {sl!r}")
            self.split_layers = {k: list(v) for k, v in sl.items()}
        if self.bos_rows not in (None, "precomputed"):
            raise ValueError(f"bos_rows must be None or 'precomputed', got {self.bos_rows!r}")
        return EffalgConfig(version=self.version)

    @property
    def bit_plan(self) -> BitPlan | None:
        """The parsed ``plan`` (None if not set)."""
        return None if self.plan is None else Plan.from_dict(self.plan)

    def layer_bits(self, name: str) -> int | None:
        """Weight bits of layer ``name`` (plan entry, else ``weight_bits``); None = float."""
        if self.plan is not None:
            e = self.plan["entries"].get(name)
            if e is not None:
                return e["weight_bits"]
        return self.weight_bits

    def resolved_for(self, model: nn.Module) -> MixDQConfig:
        """A copy with exact ``modules_to_not_convert`` names; checks ``plan``, ``bos_aware`` and the calibrated
        fields against ``model`` (``ValueError`` naming what it lacks)."""
        out = super().resolved_for(model)
        if self.modules_to_not_convert is None:
            names = match_module_names(model, MIXDQ_DEFAULT_FLOAT_MODULES, strict=False)
            out.modules_to_not_convert = [
                n for n in names if any(_is_quantizable(m) for m in model.get_submodule(n).modules())
            ]
        check_plan_layers(self.plan, model, out.modules_to_not_convert, _is_quantizable, "MixDQConfig")
        named = dict(model.named_modules())
        for field in ("static_act_layers", "split_layers"):
            missing = [n for n in (getattr(self, field) or ()) if n not in named]
            if missing:
                raise ValueError(f"MixDQConfig.{field}: not in {type(model).__name__}: {missing[:20]}")
        if self.bos_aware and not any(is_bos_layer(n) and _is_quantizable(m) for n, m in named.items()):
            raise ValueError(
                f"MixDQConfig: bos_aware=True, but {type(model).__name__} has no cross-attention over text tokens "
                "(no attn2.to_k / attn2.to_v layers); use bos_aware=False"
            )
        return out

    @property
    def method_tag(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}" + ("-mp" if self.plan is not None else "")

    @property
    def card_tags(self) -> list[str]:
        """Extra model-card tags."""
        return ["mixdq"] + (["mixed-precision"] if self.plan is not None else [])


def _normalize_mixed_precision(mp: Any) -> dict | None:
    if mp is None:
        return None
    if isinstance(mp, (int, float)) and not isinstance(mp, bool):
        mp = {"avg_bits": float(mp)}
    if not isinstance(mp, Mapping):
        raise TypeError(f"mixed_precision must be None, a number or {{'avg_bits': ...}}, got {mp!r}")
    unknown = sorted(set(mp) - set(_MP_KEYS))
    if unknown:
        raise ValueError(f"mixed_precision: unknown key(s) {unknown}; allowed: {list(_MP_KEYS)}")
    avg = mp.get("avg_bits")
    if isinstance(avg, bool) or not isinstance(avg, (int, float)) or not 2.0 <= float(avg) <= 8.0:
        raise ValueError(f"mixed_precision: avg_bits must be a number in [2, 8], got {avg!r}")
    metric = mp.get("metric", "decoupled")
    if metric not in ("decoupled", "sqnr"):
        raise ValueError(f"mixed_precision: metric must be 'decoupled' or 'sqnr', got {metric!r}")
    out = {"avg_bits": float(avg), "metric": metric}
    for key, default in (("num_ratios", 10), ("num_targets", 5)):
        v = mp.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"mixed_precision: {key} must be an int >= 1, got {v!r}")
        out[key] = v
    return out


def load_mixdq_bit_maps(
    weight_yaml: str | Mapping[str, int], act_yaml: str | Mapping[str, int] | None = None
) -> dict[str, dict[str, int | None]]:
    """Read the original MixDQ's released bit maps (flat YAML ``{"model.<diffusers module path>": bits}``) into a
    ``plan`` for :class:`MixDQConfig`.

    Weight bits 2 / 4 / 8 are kept; 16 / 32 mean float. With ``act_yaml``, layers it omits (the original's
    FP16-protected layers) or gives 16 / 32 bits are kept in float; 4-bit activations run at 8 bits (effalg's
    activation kernels are int8; logged). Layer names are checked against the UNet when the config is used.
    """

    def read(src, what):
        if isinstance(src, Mapping):
            data = dict(src)
        else:
            import yaml

            try:
                with open(src, encoding="utf-8") as f:
                    data = yaml.safe_load(f)
            except OSError as e:
                raise ValueError(f"load_mixdq_bit_maps: cannot read {what} {src!r}: {e}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"load_mixdq_bit_maps: {what} must map layer names to bits, got {type(data).__name__}")
        out = {}
        for k, v in data.items():
            name = k[len("model.") :] if isinstance(k, str) and k.startswith("model.") else k
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"load_mixdq_bit_maps: {what}: layer {k!r} has bits {v!r}, expected an int")
            out[name] = v
        return out

    wmap = read(weight_yaml, "weight bit map")
    bad = {n: b for n, b in wmap.items() if b not in (*_WEIGHT_BITS, 16, 32)}
    if bad:
        raise ValueError(
            f"load_mixdq_bit_maps: weight bits must be 2, 4, 8 (16/32: float); got {dict(list(bad.items())[:5])}"
        )
    plan = {n: {"weight_bits": (b if b in _WEIGHT_BITS else None)} for n, b in wmap.items()}
    if act_yaml is not None:
        amap = read(act_yaml, "activation bit map")
        bad = {n: b for n, b in amap.items() if b not in (4, 8, 16, 32)}
        if bad:
            raise ValueError(
                f"load_mixdq_bit_maps: activation bits must be 4, 8 (16/32: float); got {dict(list(bad.items())[:5])}"
            )
        unknown = sorted(set(amap) - set(wmap))
        if unknown:
            raise ValueError(
                f"load_mixdq_bit_maps: the activation map names layers the weight map lacks: {unknown[:10]}"
            )
        a4 = [n for n, b in amap.items() if b == 4]
        if a4:
            logger.warning("MixDQ bit maps: %d layer(s) with 4-bit activations run with int8 activations", len(a4))
        float_act = [n for n in wmap if amap.get(n, 16) > 8]
        if float_act:
            logger.warning("MixDQ bit maps: %d layer(s) with float activations are kept in float: %s",
                           len(float_act), float_act[:10])  # fmt: skip
        for n in float_act:
            plan[n]["weight_bits"] = None
    return {n: {"weight_bits": e["weight_bits"], "act_bits": None if e["weight_bits"] is None else 8}
            for n, e in plan.items()}  # fmt: skip


# ---- building quantized layers -------------------------------------------------------------------------------------
def _build(
    cfg: MixDQConfig,
    module: nn.Module,
    name: str,
    bits: int | None = None,
    act: Sequence[tuple[float, int]] | None = None,
    bos_input: torch.Tensor | None = None,
) -> QuantModuleBase | None:
    """The MixDQ module for ``module`` (None: keep it float). Meta modules give empty ones shaped by the config's
    calibrated fields; real ones are quantized with ``act`` (static ``(scale, zero)`` per channel range, None:
    dynamic) and, for BOS layers, ``bos_input`` (precomputed row; None: float BOS weight)."""
    if not _is_quantizable(module):
        return None
    bits = cfg.layer_bits(name) if bits is None else bits
    if bits is None:
        return None
    bos = cfg.bos_aware and is_bos_layer(name) and isinstance(module, nn.Linear)
    split = (cfg.split_layers or {}).get(name) if isinstance(module, nn.Conv2d) else None
    if module.weight.is_meta:
        static = name in (cfg.static_act_layers or ())
        kw = dict(weight_bits=bits, static_act=static, device="meta", dtype=module.weight.dtype)
        has_bias = module.bias is not None
        if bos:
            return BOSAwareWxA8Linear(module.in_features, module.out_features, has_bias,
                                      precomputed=cfg.bos_rows == "precomputed", **kw)  # fmt: skip
        if isinstance(module, nn.Linear):
            return WxA8Linear(module.in_features, module.out_features, has_bias, **kw)
        geo = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
               module.dilation, has_bias)  # fmt: skip
        if split:
            return InputSplitConv2d(*geo, split_sizes=split, **kw)
        return WxA8Conv2d(*geo, **kw)
    if isinstance(module, nn.Linear):
        sa, za = act[0] if act else (None, None)
        if bos:
            return BOSAwareWxA8Linear.from_float(module, weight_bits=bits, act_scale=sa, act_zero=za,
                                                 bos_input=bos_input, prepack=False)  # fmt: skip
        return WxA8Linear.from_float(module, weight_bits=bits, act_scale=sa, act_zero=za, prepack=False)
    if act is not None and len(act) > 1:
        return InputSplitConv2d.from_float(module, [int(c) for c in split], weight_bits=bits, act_qparams=act)
    sa, za = act[0] if act else (None, None)
    return WxA8Conv2d.from_float(module, weight_bits=bits, act_scale=sa, act_zero=za)


class MixDQQuantizer(EffalgDiffusersQuantizer):
    """diffusers quantizer for :class:`MixDQConfig` (quantize-on-load and pre-quantized checkpoints)."""

    def convert_module(self, module: nn.Module, name: str) -> nn.Module | None:
        return _build(self.quantization_config, module, name)


# ---- calibration ----------------------------------------------------------------------------------------------------
def _skip_splits(model: nn.Module, layers: Mapping[str, nn.Module], splits: dict[str, list[int]]) -> list[Any]:
    """Forward pre-hooks on the up blocks that fill ``splits`` (``{layer: [channels, skip channels]}``) for the
    resnet ``conv1`` / ``conv_shortcut`` layers whose input concatenates a skip connection."""
    handles = []
    for bname, block in model.named_modules():
        resnets = getattr(block, "resnets", None)
        if not re.fullmatch(r"up_blocks\.\d+", bname) or not isinstance(resnets, nn.ModuleList):
            continue

        def hook(_m, args, kwargs, _bname=bname, _resnets=resnets):
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if not isinstance(res, (tuple, list)):
                return
            for j, resnet in enumerate(_resnets):
                if j >= len(res):
                    break
                skip = int(res[-1 - j].shape[1])
                main = int(getattr(resnet, "in_channels", 0)) - skip
                for conv in ("conv1", "conv_shortcut"):
                    name = f"{_bname}.resnets.{j}.{conv}"
                    if main > 0 and name in layers:
                        splits[name] = [main, skip]

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


class _BOSRecorder:
    """Records token 0 of every denoiser call's ``encoder_hidden_states`` (reference row + max deviation)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.row, self.dev, self.handle = model, None, 0.0, None

    def __enter__(self):
        def hook(_m, args, kwargs):
            ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3 or ehs.shape[1] < 2:
                return
            rows = ehs[:, 0].detach().float().cpu()
            if self.row is None:
                self.row = rows[0].clone()
            self.dev = max(self.dev, float((rows - self.row).abs().max()))

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def prompt_independent(self) -> bool:
        return self.row is not None and self.dev <= 1e-4 * float(self.row.abs().max()) + 1e-6


def _global_ssim_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``1 - SSIM`` with one window over (almost) the whole image, as MixDQ's content metric."""
    win = min(a.shape[-1], a.shape[-2])
    win = win if win % 2 else win - 1
    return 1.0 - float(ssim(a.clamp(0, 1), b.clamp(0, 1), win_size=max(3, win)))


def _auto_float_layers(n: int) -> int:
    return max(1, round(math.sqrt(n) / 3))


@register_calibrator(MixDQConfig)
@torch.no_grad()
def calibrate(
    pipe,
    prompts: Sequence[str],
    config: MixDQConfig,
    *,
    num_inference_steps: int = 4,
    guidance_scale: float | None = None,
    seed: int = 0,
    sensitivity_prompts: int = 1,
    momentum: float = 0.95,
    split_shortcuts: bool = True,
    progress: bool = True,
    **call_kwargs: Any,
):
    """Calibrate MixDQ on ``pipe`` with ``prompts`` and quantize its UNet in place; returns ``pipe``.

    What ``effalg.diffusers.calibrate`` runs for a :class:`MixDQConfig`. One float run over prompts x steps (tqdm;
    ``num_inference_steps``, ``guidance_scale``, generator ``seed + i``, other ``call_kwargs`` such as ``height``)
    collects each layer's static activation range (min-max over each prompt's timesteps and both CFG branches, EMA
    with ``momentum`` across prompts; per channel range for the shortcut split unless ``split_shortcuts=False``; without the BOS token for
    BOS-aware layers) and checks
    whether the BOS features are prompt-independent (then their float K/V rows are stored). Unless ``config.plan``
    is given, the ``float_layers`` most activation-sensitive layers (UNet output error with the layer alone at
    W8A8) stay float, and ``mixed_precision`` runs the metric-decoupled search (see :class:`MixDQConfig`) on the
    first ``sensitivity_prompts`` prompts. The resulting config is what ``pipe.save_pretrained`` writes.

    Raises:
        ValueError: empty ``prompts``, an already quantized UNet, a bad plan, an infeasible ``avg_bits``.
        TypeError: ``config`` is not a :class:`MixDQConfig` or ``pipe`` has no UNet.
    """
    if not isinstance(config, MixDQConfig):
        raise TypeError(f"calibrate: config must be a MixDQConfig, got {type(config).__name__}")
    prompts = check_prompts(prompts, num_inference_steps)
    _, model = float_denoiser(pipe, config)
    cfg = config.resolved_for(model)
    layers: dict[str, nn.Module] = select_layers(
        model,
        cfg.modules_to_not_convert,
        lambda n, m: m if cfg.layer_bits(n) is not None and _is_quantizable(m) else None,
    )
    bos_layers = [n for n in layers if cfg.bos_aware and is_bos_layer(n)]
    want_mp = cfg.mixed_precision is not None and cfg.plan is None
    n_float = 0 if cfg.plan is not None else (
        _auto_float_layers(len(layers)) if cfg.float_layers == "auto" else min(int(cfg.float_layers), len(layers) - 1)
    )  # fmt: skip
    n_sens = max(1, min(int(sensitivity_prompts), len(prompts))) if (want_mp or n_float) else 0
    runner = PipelineRunner(pipe, model, num_inference_steps, guidance_scale, seed, call_kwargs)

    # 1. float run: activation ranges (with the skip splits found on the way), BOS rows, recorded calls.
    splits: dict[str, list[int]] = {}
    ranges = RangeCollector(layers, splits=splits, skip_tokens=dict.fromkeys(bos_layers, 1), momentum=momentum,
                            calls_per_batch=num_inference_steps)  # fmt: skip
    bos = _BOSRecorder(model)
    handles = _skip_splits(model, layers, splits) if split_shortcuts else []
    try:
        run = run_float(runner, prompts, record=n_sens, observers=[ranges, bos], desc="MixDQ calibration",
                        progress=progress)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    act = {n: [static_act_qparams(lo, hi) for lo, hi in r.tolist()] for n, r in ranges.ranges().items()}
    never = [n for n in layers if n not in act]
    if never:
        logger.warning("MixDQ: %d layer(s) never ran during calibration, kept with dynamic activations: %s",
                       len(never), never[:10])  # fmt: skip
    bos_row = bos.row if bos_layers and bos.prompt_independent() else None
    if bos_layers and bos_row is None:
        logger.info(
            "MixDQ: the BOS features vary across prompts (non-causal text encoder?): BOS rows computed on the fly"
        )
    cfg.split_layers = {n: s for n, s in splits.items() if n in act and len(act[n]) > 1} or None
    cfg.bos_rows = "precomputed" if bos_row is not None else None

    cache: dict[tuple[str, int], nn.Module] = {}

    def build(name: str, bits: int) -> nn.Module:
        key = (name, bits)
        if key not in cache:
            cache[key] = _build(cfg, layers[name], name, bits, act.get(name), bos_row if name in bos_layers else None)
        return cache[key]

    # 2. activation-sensitive layers kept in float.
    float_layers: list[str] = []
    if n_float:
        sens = layer_sensitivity(run, dict.fromkeys(layers, "all"), {"all": MetricGroup(ModuleOutputMetric(), (8,))},
                                 build, desc="MixDQ activation sensitivity", progress=progress)  # fmt: skip
        ranked = sorted(layers, key=lambda n: -sens[n][8])
        float_layers = ranked[:n_float]
        logger.info("MixDQ: keeping the %d most activation-sensitive layer(s) in float: %s", n_float, float_layers)

    # 3. metric-decoupled mixed precision.
    quantized = [n for n in layers if n not in float_layers]
    meta: dict[str, Any] = {"method": "mixdq", "float_layers": float_layers}
    if want_mp:
        bits, search = _search_bits(run, quantized, layers, build, cfg.mixed_precision, progress)
        meta.update(search)
    else:
        bits = {n: cfg.layer_bits(n) for n in quantized}
    if want_mp or float_layers:
        cfg.plan = BitPlan.from_bits(
            weight_bits={**bits, **dict.fromkeys(float_layers)},
            act_bits={**dict.fromkeys(bits, 8), **dict.fromkeys(float_layers)},
            model={"class": type(model).__name__, "name_or_path": str(getattr(model.config, "_name_or_path", ""))},
            metadata=meta,
        ).to_dict()
    cfg.static_act_layers = sorted(n for n in act if n in bits) or None
    if cfg.split_layers:
        cfg.split_layers = {n: s for n, s in cfg.split_layers.items() if n in bits} or None

    # 4. swap in the quantized layers.
    modules = {n: build(n, b) for n, b in bits.items()}
    install_quantized(model, cfg, MixDQQuantizer, modules)
    logger.info(
        "MixDQ: quantized %d layer(s) of %s (%d float, %d split, BOS rows %s)",
        len(modules), type(model).__name__, len(float_layers), len(cfg.split_layers or {}),
        "precomputed" if bos_row is not None else "on the fly",
    )  # fmt: skip
    return pipe


def _search_bits(
    run: CalibrationRun, quantized: list[str], layers: Mapping[str, nn.Module], build, mp: dict, progress: bool
) -> tuple[dict[str, int], dict[str, Any]]:
    """MixDQ's weight bit search over the ``quantized`` layers; returns ``(bits, plan metadata)``."""
    from tqdm.auto import tqdm

    model = run.runner.model
    groups = {n: "content" if is_content_layer(n) else "quality" for n in quantized}
    sizes = {n: layers[n].weight.numel() for n in quantized}
    decoupled = mp["metric"] == "decoupled"
    avg = mp["avg_bits"]
    p_c = sum(sizes[n] for n in quantized if groups[n] == "content")
    p_q = sum(sizes[n] for n in quantized if groups[n] == "quality")
    lowest = (min(_QUALITY_BITS) * p_q + min(_CONTENT_BITS) * p_c) / (p_q + p_c)
    if avg < lowest - 1e-9:
        raise ValueError(
            f"MixDQConfig.mixed_precision: avg_bits={avg} is infeasible: quality layers take 4 or 8 bits and content "
            f"layers 2, 4 or 8, so the lowest average over these layers is {lowest:.3f}"
        )
    content_metric = FinalImageMetric(_global_ssim_error) if decoupled else ModuleOutputMetric()
    metrics = {
        "content": MetricGroup(content_metric, _CONTENT_BITS),
        "quality": MetricGroup(ModuleOutputMetric(), _QUALITY_BITS),
    }
    sens = layer_sensitivity(run, groups, metrics, build, desc="MixDQ weight sensitivity", progress=progress)
    meta: dict[str, Any] = {
        "avg_bits_budget": avg,
        "metric": mp["metric"],
        "groups": groups,
        "sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in sens.items()},
    }
    candidates: list[dict[str, int]] = []
    if not decoupled:  # one MILP over all layers on the SQNR errors
        candidates.append(allocate_bits(sens, sizes, avg_bits=avg, time_limit=_MILP_SECONDS).bits)
    else:
        costs, norms = normalize_costs_by_group(sens, groups)
        meta["group_norms"] = norms
        targets = [avg] if mp["num_targets"] == 1 else torch.linspace(avg - 0.3, avg, mp["num_targets"]).tolist()
        ratios = torch.linspace(0.46, 1.36, mp["num_ratios"]).tolist() if p_c and p_q else [1.0]
        for t in targets:
            for k in ratios:
                # b_q * p_q + b_c * p_c = t * (p_q + p_c) with b_c = k * b_q
                b_q = t * (p_q + p_c) / (p_q + k * p_c)
                budgets = {"content": min(8.0, k * b_q), "quality": min(8.0, b_q)}
                if (p_q and budgets["quality"] < 4.0) or (p_c and budgets["content"] < 2.0):
                    continue
                try:
                    alloc = allocate_bits_by_group(costs, sizes, groups, budgets, time_limit=_MILP_SECONDS)
                except ValueError:
                    continue
                if alloc.bits not in candidates:
                    candidates.append(alloc.bits)
    if not candidates:
        raise ValueError(f"MixDQConfig.mixed_precision: no content/quality budget split is feasible at avg_bits={avg}")
    # Final pick: lowest pixel error of the whole quantized pipeline against float.
    pixel = FinalImageMetric(mse)
    pixel.prepare(run, [])
    errors = []
    for bits in tqdm(candidates, desc="MixDQ candidate plans", disable=not progress or len(candidates) == 1):
        with swap_layers(model, {n: build(n, b) for n, b in bits.items()}):
            errors.append(pixel.error(run))
    best = min(range(len(candidates)), key=errors.__getitem__)
    bits = candidates[best]
    achieved = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes.values())
    meta.update(avg_bits=achieved, candidates=len(candidates), candidate_pixel_mse=errors, chosen=best)
    logger.info("MixDQ mixed precision: %.3f average weight bits over %d layers (%d candidate plans)",
                achieved, len(bits), len(candidates))  # fmt: skip
    return dict(bits), meta
