"""MBQ (modality-balanced quantization) of a vision-language model's language decoder.

:func:`calibrate_mbq` runs MBQ's calibration on image+text samples and quantizes the decoder's linears in place with
effalg's packed modules (weight-only W3 / W4, asymmetric, groups of 128; or W4A8: per-channel symmetric int4 weights
with dynamic per-token int8 activations):

1. **Modality sensitivity**: one backward pass per sample of the answer loss; per decoder layer, the mean
   ``|dL/dy|`` at the outputs of ``o_proj`` (attention) and ``down_proj`` (MLP) over the vision tokens (the image-token
   positions) and over the text tokens (the positions the answer loss reads: those predicting a token with
   ``labels != -100``, i.e. the labels shifted by one as causal LMs align them); the vision weight of a group is
   ``max(g_vision / g_text, median over layers)``.
2. **Scale search** (AWQ-style channel equalisation), layer by layer on the calibration activations, four groups per
   layer: q/k/v after ``input_layernorm`` (compared on the self-attention output), o after ``v_proj`` (when their
   shapes match), gate/up after ``post_attention_layernorm`` (the MLP output) and down after ``up_proj``. Candidates
   ``s = mean|x|^r / sqrt(max * min)``, ``r`` on a ``grid``-point grid in ``[0, 1)``; the loss is MBQ's
   modality-balanced mean absolute error ``(sum_text |dY| + w * sum_vision |dY|) / (n_text + n_vision)`` with the
   candidate weights (and, for W4A8, activations) quantized as the kernels will. ``balance_modalities=False`` is the
   same search with every token weighted 1 and squared error: plain AWQ, the baseline.
3. The best scales are folded into the previous op (norm weight or linear rows) and the linears' input columns, then
   the decoder's linears are quantized and packed. The vision tower, projector, embeddings and LM head stay float.

The quantized model saves with ``save_pretrained`` (config ``quant_method="effalg_mbq"``) and reloads with a plain
``from_pretrained`` after ``import effalg.transformers``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from effalg.core.config import EffalgConfig, LinearQuantConfig, ModuleConfigMap, quantize_
from effalg.core.memory import reports_peak_memory
from effalg.core.quant.spec import Granularity, QuantSpec, fake_quantize
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

from .config import EffalgHfConfigMixin
from .quantizer import EffalgHfQuantizer

__all__ = ["MBQConfig", "MBQQuantizer", "calibrate_mbq", "decoder_layers", "vision_tower"]

logger = logging.get_logger(__name__)

#: The modules MBQ's scale groups need in every decoder layer (Llama / Qwen2 / Mistral layout).
_LAYER_MODULES = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class MBQConfig(EffalgHfConfigMixin):
    """MBQ on a VLM's language decoder (a transformers quantization config; calibrate with :func:`calibrate_mbq`).

    Args:
        weight_bits: 3 or 4 weight-only (``act_bits=None``), or 4 with ``act_bits=8`` (W4A8).
        act_bits: None (weight-only) or 8 (dynamic per-token int8 activations).
        group_size: weight-only group size along the input dim (default 128); W4A8 weights are per channel (0).
        balance_modalities: weigh vision-token errors by the measured gradient ratio (MBQ); False: plain AWQ.
        loss: ``"mae"`` (MBQ's default) or ``"mse"``; None = ``"mae"`` with balancing, ``"mse"`` without (AWQ).
        grid: number of scale exponents tried per group.
        distort: search each layer on the outputs of the already-quantized previous layers (against the float
            model's outputs), the original's ``distort`` option.
        quantize_vision_tower: also quantize the vision tower's linears at W4A8 (per-channel symmetric int4 weights,
            dynamic per-token int8 activations; round-to-nearest), as in MBQ's prefill demo.
        vision_tower: the vision tower's module name (filled in by :func:`calibrate_mbq`).
        modules_to_not_convert: float modules (filled in by :func:`calibrate_mbq`: everything but the decoder).
        calibration: what the calibration measured (per-layer vision/text gradient ratios and chosen exponents).
    """

    quant_method_name: ClassVar[str] = "effalg_mbq"
    core_config_class: ClassVar[type] = LinearQuantConfig

    def __init__(
        self,
        weight_bits: int = 4,
        act_bits: int | None = None,
        group_size: int | None = None,
        balance_modalities: bool = True,
        loss: str | None = None,
        grid: int = 20,
        distort: bool = False,
        quantize_vision_tower: bool = False,
        vision_tower: str | None = None,
        modules_to_not_convert: list[str] | None = None,
        calibration: dict | None = None,
        version: int = 1,
        quant_method: str | None = None,
        **kwargs: Any,
    ) -> None:
        if quant_method not in (None, self.quant_method_name):
            raise ValueError(f"MBQConfig: quant_method must be {self.quant_method_name!r}, got {quant_method!r}")
        if kwargs:
            raise TypeError(f"MBQConfig: unknown argument(s) {sorted(kwargs)}")
        self.quant_method = self.quant_method_name
        if act_bits not in (None, 8) or isinstance(act_bits, bool):
            raise ValueError(f"MBQConfig: act_bits must be None (weight-only) or 8 (W4A8), got {act_bits!r}")
        allowed = (4,) if act_bits == 8 else (3, 4)
        if isinstance(weight_bits, bool) or weight_bits not in allowed:
            raise ValueError(
                f"MBQConfig: weight_bits must be one of {list(allowed)} with act_bits={act_bits}, got {weight_bits!r}"
            )
        if group_size is None:
            group_size = 0 if act_bits == 8 else 128
        if act_bits == 8 and group_size != 0:
            raise ValueError(f"MBQConfig: W4A8 weights are per output channel (group_size=0), got {group_size!r}")
        if loss is None:
            loss = "mae" if balance_modalities else "mse"
        if loss not in ("mae", "mse"):
            raise ValueError(f"MBQConfig: loss must be 'mae' or 'mse', got {loss!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"MBQConfig: grid must be a positive int, got {grid!r}")
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.group_size = group_size
        self.balance_modalities = bool(balance_modalities)
        self.loss = loss
        self.grid = grid
        if not isinstance(distort, bool):
            raise TypeError(f"MBQConfig: distort must be a bool, got {distort!r}")
        self.distort = distort
        if not isinstance(quantize_vision_tower, bool):
            raise TypeError(f"MBQConfig: quantize_vision_tower must be a bool, got {quantize_vision_tower!r}")
        if vision_tower is not None and not isinstance(vision_tower, str):
            raise TypeError(f"MBQConfig: vision_tower must be a module name (str), got {vision_tower!r}")
        self.quantize_vision_tower = quantize_vision_tower
        self.vision_tower = vision_tower
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.calibration = calibration
        self.version = version
        self.to_core_config()

    def _core_fields(self) -> dict[str, Any]:
        return {
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "weight_group_size": self.group_size,
            "weight_symmetric": self.act_bits == 8,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "version": self.version,
        }

    def to_core_config(self) -> EffalgConfig:
        """The decoder's ``LinearQuantConfig``; with ``quantize_vision_tower`` a ``ModuleConfigMap`` that adds W4A8
        for the vision tower."""
        decoder = LinearQuantConfig.from_dict(self._core_fields())
        if not (self.quantize_vision_tower and self.vision_tower):
            return decoder
        decoder.modules_to_not_convert = []
        return ModuleConfigMap(
            {"": decoder, self.vision_tower: LinearQuantConfig(weight_bits=4, act_bits=8)},
            modules_to_not_convert=list(self.modules_to_not_convert),
            version=self.version,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "group_size": self.group_size,
            "balance_modalities": self.balance_modalities,
            "loss": self.loss,
            "grid": self.grid,
            "distort": self.distort,
            "quantize_vision_tower": self.quantize_vision_tower,
            "vision_tower": self.vision_tower,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "calibration": self.calibration,
            "version": self.version,
        }

    @property
    def method_tag(self) -> str:
        """``w3a16-g128``, ``w4a8``, ``w4a8+vision-w4a8``, ..."""
        tag = f"w{self.weight_bits}a{self.act_bits or 16}" + (f"-g{self.group_size}" if self.group_size else "")
        return tag + ("+vision-w4a8" if self.quantize_vision_tower else "")

    @property
    def card_tags(self) -> list[str]:
        return ["mbq"]


class MBQQuantizer(EffalgHfQuantizer):
    """Loads MBQ checkpoints (pre-quantized); a float checkpoint needs :func:`calibrate_mbq`."""

    def _process_model_before_weight_loading(self, model: nn.Module, keep_in_fp32_modules=None, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError(
                "MBQConfig needs calibration data: load the float model, then "
                "effalg.transformers.calibrate_mbq(model, processor, samples, MBQConfig(...)); for plain "
                "round-to-nearest use EffalgLinearConfig"
            )
        return super()._process_model_before_weight_loading(model, keep_in_fp32_modules=keep_in_fp32_modules, **kwargs)


# ---- model layout ----------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, layers)`` of the language decoder's layer list, checked to have MBQ's modules."""
    candidates = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and n.endswith("layers") and "vision" not in n and "visual" not in n
        and len(m) and hasattr(m[0], "self_attn")
    ]  # fmt: skip
    if not candidates:
        raise ValueError(
            f"MBQ: {type(model).__name__} has no language decoder layer list (a ModuleList named '*layers' of "
            "blocks with self_attn); unsupported architecture"
        )
    name, layers = min(candidates, key=lambda c: c[0].count("."))
    for i, layer in enumerate(layers):
        for sub in _LAYER_MODULES:
            try:
                layer.get_submodule(sub)
            except AttributeError:
                raise ValueError(
                    f"MBQ: {type(model).__name__} layer {name}.{i} has no module '{sub}' (MBQ's scale groups need "
                    f"{list(_LAYER_MODULES)}); unsupported architecture"
                ) from None
    return name, layers


def _float_modules(model: nn.Module, *prefixes: str) -> list[str]:
    """The top-most modules holding ``nn.Linear`` layers outside the subtrees ``prefixes`` (the quantized parts)."""
    insides = [p + "." for p in prefixes]
    outside = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(n.startswith(i) for i in insides)
    ]
    out: list[str] = []
    for n in outside:
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            top = ".".join(parts[:i])
            if not any(inside.startswith(top + ".") for inside in insides) and top not in prefixes:
                break
        if top not in out:
            out.append(top)
    return out


def vision_tower(model: nn.Module) -> str:
    """The name of the vision tower module (``*vision_tower`` or ``*visual``, the outermost one)."""
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in ("vision_tower", "visual", "vision_model")]
    if not names:
        raise ValueError(
            f"MBQ: {type(model).__name__} has no vision tower module (named 'vision_tower', 'visual' or "
            "'vision_model'); quantize_vision_tower needs one"
        )
    return min(names, key=lambda n: n.count("."))


# ---- calibration -----------------------------------------------------------------------------------------------


def _image_token_id(model: nn.Module, processor: Any) -> int:
    for src in (model.config, processor, getattr(processor, "tokenizer", None)):
        tid = getattr(src, "image_token_id", None) if src is not None else None
        if isinstance(tid, int):
            return tid
    raise ValueError(f"MBQ: cannot find the image token id of {type(model).__name__} (config.image_token_id)")


def _check_samples(samples: Sequence[Mapping[str, Any]], image_token: int) -> None:
    if isinstance(samples, Mapping) or not len(samples):
        raise ValueError("calibrate_mbq: samples must be a non-empty list of processor outputs with labels")
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping) or "input_ids" not in s:
            raise ValueError(f"calibrate_mbq: sample {i} must be a dict of model inputs with input_ids and labels")
        if "labels" not in s or not bool((torch.as_tensor(s["labels"]) != -100).any()):
            raise ValueError(f"calibrate_mbq: sample {i} has no labels (answer tokens with labels != -100)")
        if not bool((torch.as_tensor(s["input_ids"]) == image_token).any()):
            raise ValueError(f"calibrate_mbq: sample {i} has no image tokens (id {image_token})")


def _text_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose outputs predict an answer token (``labels[:, t + 1] != -100``)."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != -100
    return out


def _sensitivity(model, layers, samples, image_token: int, progress: bool) -> tuple[list[float], list[float]]:
    """Per layer, the vision/text ratio of mean |dL/dy| at o_proj and at down_proj outputs."""
    n = len(layers)
    sums = {k: torch.zeros(n, 2, dtype=torch.float64) for k in ("attn", "mlp")}  # [vision, text] sums
    counts = torch.zeros(2, dtype=torch.float64)
    masks: dict[str, torch.Tensor] = {}

    def hook(kind, i):
        def fn(module, grad_input, grad_output):
            g = grad_output[0].detach().abs().float().sum(-1)[0]  # [T]
            sums[kind][i, 0] += float(g[masks["vision"]].sum())
            sums[kind][i, 1] += float(g[masks["text"]].sum())

        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_full_backward_hook(hook("attn", i)))
        handles.append(layer.mlp.down_proj.register_full_backward_hook(hook("mlp", i)))
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for s in tqdm(samples, desc="MBQ sensitivity", disable=not progress):
            ids = torch.as_tensor(s["input_ids"])
            labels = torch.as_tensor(s["labels"])
            masks["vision"] = (ids == image_token)[0]
            masks["text"] = _text_positions(labels)[0]
            counts[0] += int(masks["vision"].sum())
            counts[1] += int(masks["text"].sum())
            with torch.enable_grad():
                out = model(**s, use_cache=False)
                (out.loss / len(samples)).backward()
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    ratios = {}
    for kind, s in sums.items():
        mean = s / counts.clamp_min(1)
        ratios[kind] = (mean[:, 0] / mean[:, 1].clamp_min(1e-30)).tolist()
    return ratios["attn"], ratios["mlp"]


class _Capture(Exception):
    pass


def _layer_inputs(model, layers, samples) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of the first decoder layer's call for every sample."""
    got: list[tuple[tuple, dict]] = []

    def pre(module, args, kwargs):
        got.append((args, dict(kwargs)))
        raise _Capture

    h = layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for s in samples:
            try:
                model(**{k: v for k, v in s.items() if k != "labels"}, use_cache=False)
            except _Capture:
                pass
    finally:
        h.remove()
    return got


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _out(y):
    return y[0] if isinstance(y, tuple) else y


class _ScaledQuant:
    """Temporarily runs linears as ``Q_a(x / s) @ Q_w(W * s).T + b`` (the candidate scales, quantized)."""

    def __init__(self, linears, s, w_spec: QuantSpec, a_spec: QuantSpec | None) -> None:
        self.linears, self.s, self.w_spec, self.a_spec = linears, s, w_spec, a_spec

    def __enter__(self):
        for lin in self.linears:
            wq = fake_quantize(lin.weight.float() * self.s, self.w_spec).to(lin.weight.dtype)
            s, a_spec, bias = self.s.to(lin.weight.dtype), self.a_spec, lin.bias

            def forward(x, wq=wq, s=s, bias=bias, a_spec=a_spec):
                x = x / s
                if a_spec is not None:
                    x = fake_quantize(x, a_spec)
                return F.linear(x, wq, bias)

            lin.forward = forward
        return self

    def __exit__(self, *exc):
        for lin in self.linears:
            del lin.forward


def _loss(ref: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, kind: str) -> float:
    d = (out.float() - ref.float()).abs()
    if kind == "mse":
        d = d * d
    per_token = d.mean(-1)  # [B, T]
    return float((per_token * weight).sum() / (weight > 0).sum().clamp_min(1))


@reports_peak_memory(logger, "MBQ calibration")
def calibrate_mbq(
    model: nn.Module, processor: Any, samples: Sequence[Mapping[str, Any]], config: MBQConfig, progress: bool = True
) -> nn.Module:
    """Calibrate and quantize ``model``'s language decoder in place with MBQ (see the module docstring).

    Args:
        model: a float vision-language model (LLaVA, LLaVA-Next / OneVision, Qwen2-VL, ...).
        processor: its processor (for the image token id when the config has none).
        samples: processor outputs (batch 1) of image+text conversations, with ``labels`` on the answer tokens.
        config: an :class:`MBQConfig`.
        progress: tqdm bars.

    Returns the model, quantized, with ``config`` (resolved) as ``model.config.quantization_config``.
    """
    if not isinstance(config, MBQConfig):
        raise TypeError(f"calibrate_mbq: config must be an MBQConfig, got {type(config).__name__}")
    image_token = _image_token_id(model, processor)
    _check_samples(samples, image_token)
    prefix, layers = decoder_layers(model)
    if config.group_size:
        for name, m in layers.named_modules():
            if isinstance(m, nn.Linear) and m.in_features % config.group_size:
                raise ValueError(
                    f"calibrate_mbq: group_size {config.group_size} does not divide in_features={m.in_features} of "
                    f"{prefix}.{name}; choose a group_size that divides every decoder layer's input width"
                )
    model.eval()
    quantized = [prefix]
    if config.quantize_vision_tower:  # first, so the decoder is calibrated on the vision features it will get
        config.vision_tower = vision_tower(model)
        quantize_(model.get_submodule(config.vision_tower), LinearQuantConfig(weight_bits=4, act_bits=8))
        quantized.append(config.vision_tower)
    n = len(layers)
    if config.balance_modalities:
        attn_r, mlp_r = _sensitivity(model, layers, samples, image_token, progress)
        med_a, med_m = sorted(attn_r)[n // 2], sorted(mlp_r)[n // 2]
        w_attn = [max(r, med_a) for r in attn_r]
        w_mlp = [max(r, med_m) for r in mlp_r]
    else:
        attn_r = mlp_r = None
        w_attn = w_mlp = [1.0] * n
    w_spec = QuantSpec(
        config.weight_bits,
        Granularity.GROUP if config.group_size else Granularity.CHANNEL,
        config.group_size,
        symmetric=config.act_bits == 8,
    )
    a_spec = None if config.act_bits is None else QuantSpec(8, Granularity.TOKEN, 0, symmetric=True, dynamic=True)
    vision = [(torch.as_tensor(s["input_ids"]) == image_token) for s in samples]
    text = [_text_positions(torch.as_tensor(s["labels"])) for s in samples]
    exponents: list[dict[str, float]] = []
    with torch.no_grad():
        inputs = _layer_inputs(model, layers, samples)
        q_inputs = inputs  # with ``distort``: the inputs the quantized previous layers produce
        for i, layer in enumerate(tqdm(layers, desc="MBQ scale search", disable=not progress)):
            if config.balance_modalities:  # answer tokens weigh 1, vision tokens w, the prompt 0
                weights = [(t.float(), v.float()) for v, t in zip(vision, text)]
            else:  # AWQ: every token weighs 1
                weights = [(torch.ones_like(v, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
                           for v in vision]  # fmt: skip
            exponents.append(
                _search_layer(layer, inputs, q_inputs, weights, w_attn[i], w_mlp[i], w_spec, a_spec, config)
            )
            if config.distort:
                lins = [m for m in layer.modules() if isinstance(m, nn.Linear)]
                with _ScaledQuant(lins, torch.ones(()), w_spec, a_spec):
                    q_inputs = [_with_hidden(a, k, _out(layer(*a, **k))) for a, k in q_inputs]
            inputs = [_with_hidden(a, k, _out(layer(*a, **k))) for a, k in inputs]
            if not config.distort:
                q_inputs = inputs
    skip = _float_modules(model, *quantized)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if keep:  # resolved with transformers' own matching, as the quantizer applies them when reloading
        skip += [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not should_convert_module(n, keep)]
    config.modules_to_not_convert = sorted(set(skip))
    config.calibration = {
        "samples": len(samples),
        "vision_text_grad_ratio": None if attn_r is None else {"attn": attn_r, "mlp": mlp_r},
        "scale_exponents": exponents,
    }
    quantize_(model, config.to_core_config())
    from .hub import install_save_hook

    quantizer = MBQQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    model.hf_quantizer = quantizer
    model.is_quantized = True
    install_save_hook(model)
    if attn_r is not None:
        logger.info(
            "MBQ: text tokens are %.1fx (attention) / %.1fx (MLP) more sensitive than vision tokens (median over layers)",
            1 / max(sorted(attn_r)[n // 2], 1e-30), 1 / max(sorted(mlp_r)[n // 2], 1e-30),
        )  # fmt: skip
    return model


def _search_layer(layer, inputs, q_inputs, weights, w_attn, w_mlp, w_spec, a_spec, config) -> dict[str, float]:
    """Capture the layer's sub-module outputs on ``inputs`` (the float model's) and inputs on ``q_inputs`` (the same
    list, or the quantized previous layers' outputs with ``distort``), search the four groups' scales and fold them."""
    attn, mlp = layer.self_attn, layer.mlp
    cap: dict[str, list] = {k: [] for k in ("attn_in", "attn_out", "o_in", "o_out", "mlp_in", "mlp_out", "down_in",
                                            "down_out")}  # fmt: skip

    modules = {"attn": attn, "o": attn.o_proj, "mlp": mlp, "down": mlp.down_proj}

    def run(xs, want_in: bool, want_out: bool) -> None:
        """Run the layer on ``xs``, recording the four modules' inputs and / or outputs."""
        hs = []
        for key, m in modules.items():
            if want_in:
                hs.append(m.register_forward_pre_hook(lambda _m, a, k, key=key: cap[key + "_in"].append((a, dict(k))),
                                                      with_kwargs=True))  # fmt: skip
            if want_out:
                hs.append(m.register_forward_hook(lambda _m, a, k, y, key=key: cap[key + "_out"].append(_out(y)),
                                                  with_kwargs=True))  # fmt: skip
        try:
            for a, k in xs:
                layer(*a, **k)
        finally:
            for h in hs:
                h.remove()

    if q_inputs is inputs:
        run(inputs, True, True)
    else:  # reference outputs from the float stream, search inputs from the quantized one
        run(inputs, False, True)
        run(q_inputs, True, False)

    def token_weights(w_vision):
        return [t + w_vision * v for t, v in weights]

    groups = [
        ("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], attn, "attn_in", "attn_out", w_attn),
        ("gate_up", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp, "mlp_in", "mlp_out", w_mlp),
        ("down", mlp.up_proj, [mlp.down_proj], mlp.down_proj, "down_in", "down_out", w_mlp),
    ]
    if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA: o's input channels are v's outputs
        groups.insert(1, ("o", attn.v_proj, [attn.o_proj], attn.o_proj, "o_in", "o_out", w_attn))
    chosen = {}
    for name, prev, linears, module, key_in, key_out, w_vision in groups:
        tw = token_weights(w_vision)
        xs = [_hidden(a, k) for a, k in cap[key_in]]
        mean_abs = torch.cat([x.reshape(-1, x.shape[-1]).abs().float() for x in xs]).mean(0)
        best, best_r, best_s = math.inf, 0.0, None
        for j in range(config.grid):
            r = j / config.grid
            s = mean_abs.clamp_min(1e-8).pow(r)
            s = s / (s.max() * s.min()).sqrt()
            with _ScaledQuant(linears, s, w_spec, a_spec):
                loss = sum(
                    _loss(ref, _out(module(*a, **k)), w, config.loss)
                    for (a, k), ref, w in zip(cap[key_in], cap[key_out], tw)
                )
            if loss < best:
                best, best_r, best_s = loss, r, s
        _fold(prev, linears, best_s)
        chosen[name] = best_r
    return chosen


def _fold(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """``prev``'s outputs / s (a norm's weight, or a linear's rows and bias) and the linears' input columns * s."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.to(prev.weight.dtype).view(-1, 1))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:
            if getattr(prev, "weight", None) is None:
                raise ValueError(f"MBQ: cannot fold scales into {type(prev).__name__} (no weight)")
            prev.weight.div_(s.to(prev.weight.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype).view(1, -1))
