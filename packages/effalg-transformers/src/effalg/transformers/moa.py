"""MoA (per-KV-head elastic sliding-window attention) as ``attn_implementation="moa"`` with a compact KV cache.

``import effalg.transformers`` registers ``"moa"`` with transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (``sdpa_mask``: a 4-D bool mask carrying the left padding) and makes ``generate()`` use a
:class:`MoACache` for MoA models.

- The plan (:class:`~effalg.core.ElasticWindowPlan`) lives in ``config.moa_plan`` (a JSON dict); :func:`apply_moa`
  sets it together with ``config.attn_implementation = "moa"``, so ``save_pretrained`` persists both and a plain
  ``from_pretrained`` (with ``import effalg.transformers``) loads the MoA model. To give a plan at load time use
  :func:`moa_config`: ``from_pretrained(path, config=moa_config(path, plan))`` (transformers 5.23 routes unknown
  ``from_pretrained`` kwargs to the model's ``__init__``, not to the config, so ``moa_plan=`` cannot be a kwarg).
- Prefill (and any forward without a cache): ``effalg.kernels.band_attention(causal=True)`` with the plan's windows at
  ``N`` = the key length (or the :class:`MoACache`'s ``N``), ``pad`` read from the attention mask.
- Decode: :class:`MoACacheLayer` keeps, per KV head, its first ``sink`` real tokens plus a ring buffer of the last
  ``window`` ones, packed back to back as ``[B, T, D]`` (``T = sum(sink + window)``), and the attention function
  runs ``effalg.kernels.band_decode_attention`` on it.

How the attention function finds the cache layer: transformers calls ``cache.update()`` and then the attention
function with the tensors ``update()`` returned, but never passes the cache. :class:`MoACacheLayer` therefore tags
the tensors it returns with a weak reference to itself (attribute ``_effalg_moa_layer``). Decode returns the layer's
own compact ``[B, T, D]`` buffers (tagged once at allocation); prefill returns the incoming ``[B, Hkv, L, D]`` keys,
tagged, and the attention function hands the layer the padding it derived from the mask so the layer can compact the
prompt (the layer cannot see the mask itself). A weak reference keeps no cache alive through a tensor.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from effalg.core.attention_plan import ElasticWindowPlan
from effalg.core.plans import PlanError
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

from ._version_gate import MAX_VERSION, MIN_VERSION

logger = logging.get_logger(__name__)

__all__ = [
    "MOA",
    "MoACache",
    "MoACacheLayer",
    "apply_moa",
    "dense_attention",
    "get_moa_plan",
    "moa_attention_forward",
    "moa_config",
    "register_moa",
]

MOA = "moa"
_PLAN_ATTR = "moa_plan"
_TAG = "_effalg_moa_layer"
_HOW_TO = (
    "give a plan with effalg.transformers.apply_moa(model, plan), or load with "
    "from_pretrained(path, config=effalg.transformers.moa_config(path, plan)), or save a model with a plan "
    "(config.json 'moa_plan')"
)


# ---------------------------------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------------------------------
def _coerce_plan(plan: Any, where: str = "plan") -> ElasticWindowPlan:
    """An :class:`ElasticWindowPlan` from a plan, its ``to_dict()`` dict, a JSON string or a JSON file path."""
    if isinstance(plan, ElasticWindowPlan):
        return plan
    if isinstance(plan, Mapping):
        return ElasticWindowPlan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        text = os.fspath(plan)
        if isinstance(plan, str) and text.lstrip().startswith("{"):
            try:
                return ElasticWindowPlan.from_dict(json.loads(text))
            except json.JSONDecodeError as e:
                raise PlanError(f"{where}: not valid JSON: {e}") from None
        if not os.path.isfile(text):
            raise ValueError(f"{where}: plan file {text!r} does not exist")
        return ElasticWindowPlan.load(text)  # type: ignore[return-value]
    raise TypeError(
        f"{where}: expected an ElasticWindowPlan, its dict, a JSON string or a path, got {type(plan).__name__}"
    )


_PLAN_CACHE: dict[int, tuple[Any, ElasticWindowPlan]] = {}


def get_moa_plan(config: Any) -> ElasticWindowPlan:
    """The :class:`ElasticWindowPlan` stored in ``config.moa_plan`` (parsed once per stored dict)."""
    config = getattr(config, "config", config)
    raw = getattr(config, _PLAN_ATTR, None)
    if raw is None and hasattr(config, "get_text_config"):
        raw = getattr(config.get_text_config(), _PLAN_ATTR, None)
    if raw is None:
        raise ValueError(
            f'attn_implementation="moa" needs a plan but {type(config).__name__} has no moa_plan; {_HOW_TO}'
        )
    if isinstance(raw, ElasticWindowPlan):
        return raw
    hit = _PLAN_CACHE.get(id(raw))
    if hit is not None and hit[0] is raw:
        return hit[1]
    plan = _coerce_plan(raw, "config.moa_plan")
    if len(_PLAN_CACHE) > 64:
        _PLAN_CACHE.clear()
    _PLAN_CACHE[id(raw)] = (raw, plan)  # the strong ref to raw keeps its id from being reused
    return plan


def _layer_rules(plan: ElasticWindowPlan, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(windows int64[L, Hkv], sinks int64[L, Hkv])`` on ``device``: the plan's cache rules at ``n``
    (:meth:`~effalg.core.ElasticWindowPlan.cache_rules`: ``sink + window <= n``, the same mask as the plan's rules for
    every query ``i < n``), memoized per (plan, n, device)."""
    memo = plan.__dict__.setdefault("_effalg_rules", {})
    key = (n, str(device))
    if key not in memo:
        w, s = plan.cache_rules(n)
        memo[key] = (w.to(device), s.to(device))
    return memo[key]


# ---------------------------------------------------------------------------------------------------------------------
# the compact cache
# ---------------------------------------------------------------------------------------------------------------------
class MoACacheLayer(CacheLayerMixin):
    """One decoder layer's MoA KV cache: per KV head ``sink`` slots + a ``window``-slot ring buffer (the plan's
    cache rules at ``N``, so ``min(N, sink + window)`` slots: ``plan.density(N)`` x a dense cache's bytes).

    ``keys`` / ``values`` are ``[B, T, D]``, KV head ``h`` owning slots ``head_start[h] .. head_start[h+1]``:
    the first ``sink[h]`` hold the row's first real tokens, the rest the last ``window[h]`` non-sink tokens (a ring
    buffer indexed by the real-token count). The live slots are always a prefix of the segment (``length()``).
    ``N`` (and so the windows) is fixed at the first update: ``max_length`` if given, else the prefill length.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, plan: ElasticWindowPlan, layer_idx: int, max_length: int | None = None):
        super().__init__()
        self.plan, self.layer_idx, self.max_length = plan, layer_idx, max_length
        self.cumulative_length = 0
        self.n: int | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- allocation ---------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, L, D = key_states.shape
        if H != self.plan.num_kv_heads:
            raise ValueError(
                f"MoACache layer {self.layer_idx}: plan has {self.plan.num_kv_heads} KV heads, "
                f"the model's keys have {H}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.n = self.max_length or L
        windows, sinks = _layer_rules(self.plan, self.n, self.device)
        self.window, self.sink = windows[self.layer_idx], sinks[self.layer_idx]
        cap = self.window + self.sink
        self.head_start = torch.zeros(H + 1, dtype=torch.int64, device=self.device)
        self.head_start[1:] = cap.cumsum(0)
        T = int(self.head_start[-1])
        # per-slot bookkeeping used to compact the prompt
        self._slot_head = torch.repeat_interleave(torch.arange(H, device=self.device), cap)
        self._slot_local = torch.arange(T, device=self.device) - self.head_start[self._slot_head]
        self.keys = key_states.new_zeros(B, T, D)
        self.values = value_states.new_zeros(B, T, value_states.shape[-1])
        setattr(self.keys, _TAG, weakref.ref(self))
        setattr(self.values, _TAG, weakref.ref(self))
        self.count = torch.zeros(B, dtype=torch.int64, device=self.device)  # real tokens seen per row
        self.is_initialized = True

    # ---- transformers API ---------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._pending is not None:
            raise RuntimeError(
                f"MoACache layer {self.layer_idx}: the prefill was never compacted; a MoACache only "
                'works with attn_implementation="moa"'
            )
        q_len = key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.cumulative_length = q_len
            self._pending = (key_states, value_states)
            setattr(key_states, _TAG, weakref.ref(self))
            return key_states, value_states
        if q_len != 1:
            raise NotImplementedError(
                f"MoACache layer {self.layer_idx}: {q_len} new tokens on a filled MoA cache (chunked prefill or a "
                "multi-turn continuation) is not supported; MoA's compact cache takes one prefill and then one-token "
                "decode steps. Run the whole prompt as a new prefill (a fresh MoACache)."
            )
        B = key_states.shape[0]
        r = self.count  # real index of the new token, per row
        local = torch.where(
            r[:, None] < self.sink, r[:, None], self.sink + (r[:, None] - self.sink) % self.window
        )  # [B, H]
        slot = self.head_start[:-1] + local
        rows = torch.arange(B, device=self.device)[:, None]
        self.keys[rows, slot] = key_states[:, :, 0].to(self.dtype)
        self.values[rows, slot] = value_states[:, :, 0].to(self.dtype)
        self.count += 1
        self.cumulative_length += 1
        return self.keys, self.values

    def compact_prefill(self, pad: torch.Tensor) -> None:
        """Store the pending prompt K/V (``[B, H, L, D]``, ``pad[b]`` left-padding tokens) in the compact layout."""
        if self._pending is None:
            return
        k, v = self._pending
        self._pending = None
        B, H, L, _ = k.shape
        n_real = (L - pad.to(self.device)).view(B, 1)  # [B, 1]
        head = self._slot_head
        s, w = self.sink[head], self.window[head]  # [T]
        c = self._slot_local
        is_sink = c < s
        # sink slot c holds real token c; ring slot k = c - s holds the latest real token r >= s with (r - s) % w == k
        m = n_real - 1 - s - (c - s)  # [B, T]
        ring_r = c + w * torch.div(m, w, rounding_mode="floor")
        r = torch.where(is_sink, c.expand_as(m), ring_r)
        valid = torch.where(is_sink, c < n_real, m >= 0)
        pos = (pad.view(B, 1) + r).clamp(0, L - 1)
        rows = torch.arange(B, device=self.device)[:, None]
        keep = valid.unsqueeze(-1)
        self.keys.copy_(torch.where(keep, k[rows, head, pos], 0))
        self.values.copy_(torch.where(keep, v[rows, head, pos], 0))
        self.count = n_real.view(B).clone()

    def length(self) -> torch.Tensor:
        """int64 ``[B, Hkv]``: live slots per row and KV head."""
        c = self.count[:, None]
        return torch.minimum(self.sink, c) + torch.minimum(self.window, (c - self.sink).clamp(min=0))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._pending = None
        self.cumulative_length = 0
        self.n = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MoACache cannot be cropped: the ring buffers drop old tokens")

    def _select(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values, self.count = fn(self.keys), fn(self.values), fn(self.count)
            setattr(self.keys, _TAG, weakref.ref(self))
            setattr(self.values, _TAG, weakref.ref(self))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.is_initialized else -1

    def nbytes(self) -> int:
        """Bytes held by the compact K and V buffers."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class MoACache(Cache):
    """transformers ``Cache`` holding one :class:`MoACacheLayer` per decoder layer.

    Args:
        plan: an :class:`~effalg.core.ElasticWindowPlan` (or its dict / JSON path), or a model / config carrying
            ``moa_plan``.
        max_length: size the windows for this ``N`` instead of the prefill length.
    """

    def __init__(self, plan: Any, max_length: int | None = None):
        if isinstance(plan, (PreTrainedModel,)) or hasattr(plan, "to_json_string"):
            plan = get_moa_plan(plan)
        plan = _coerce_plan(plan, "MoACache: plan")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"MoACache: max_length must be a positive int or None, got {max_length!r}")
        self.plan, self.max_length = plan, max_length
        super().__init__(layers=[MoACacheLayer(plan, i, max_length) for i in range(plan.num_layers)])

    def kv_cache_bytes(self) -> int:
        """Bytes of all layers' compact K and V buffers."""
        return sum(layer.nbytes() for layer in self.layers)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(f"MoACache: layer_idx {layer_idx} is outside the plan's {len(self.layers)} layers")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------------------------------
def _pad_from_mask(mask: torch.Tensor | None, B: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """int64 ``[B]`` left-padding counts from a transformers attention mask (4-D bool/float or 2-D 0/1)."""
    if mask is None:
        return torch.zeros(B, dtype=torch.int64, device=device)
    cached = getattr(mask, "_effalg_moa_pad", None)
    if cached is not None:
        return cached
    if mask.dim() == 4:
        row = mask[:, 0, -1, -kv_len:]  # the last query (always a real token with left padding)
    elif mask.dim() == 2:
        row = mask[:, -kv_len:]
    else:
        raise ValueError(f'attn_implementation="moa": unsupported attention mask shape {tuple(mask.shape)}')
    valid = row if row.dtype == torch.bool else (row > 0 if mask.dim() == 2 else row == 0)
    valid = valid.expand(B, kv_len)
    pad = (~valid).sum(-1)
    if not torch.equal(valid, torch.arange(kv_len, device=valid.device)[None] >= pad[:, None]):
        raise ValueError(
            'attn_implementation="moa" supports left padding only (the attention mask has padding '
            "after real tokens); use tokenizer.padding_side = 'left'"
        )
    pad = pad.to(device=device, dtype=torch.int64)
    with contextlib.suppress(Exception):
        mask._effalg_moa_pad = pad  # every layer receives the same mask object
    return pad


def moa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``"moa"``: ``query [B, Hq, q, D]`` -> ``([B, q, Hq, D], None)``."""
    import effalg.kernels as K

    ref = getattr(key, _TAG, None)
    layer: MoACacheLayer | None = ref() if ref is not None else None
    B, Hq, q_len, D = query.shape
    if scaling is None:
        scaling = D**-0.5
    if key.dim() == 3:  # compact decode
        if layer is None:
            raise RuntimeError('attn_implementation="moa": got 3-D keys that do not come from a MoACache')
        out = K.band_decode_attention(
            query[:, :, 0].to(layer.dtype), layer.keys, layer.values, layer.head_start, layer.length(), scaling
        )
        return out.to(query.dtype).unsqueeze(1), None
    kv_len = key.shape[-2]
    if kv_len != q_len:
        raise NotImplementedError(
            f'attn_implementation="moa" (layer {getattr(module, "layer_idx", "?")}): {q_len} queries over {kv_len} '
            "cached keys from a non-MoA cache; MoA decodes only from a MoACache (generate() creates one; or pass "
            "past_key_values=effalg.transformers.MoACache(model))"
        )
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(f'attn_implementation="moa": {type(module).__name__} has no layer_idx')
    if layer is not None:
        n = layer.n
    else:
        n = kv_len
    plan = layer.plan if layer is not None else get_moa_plan(module.config)
    windows, sinks = _layer_rules(plan, n, query.device)
    pad = _pad_from_mask(attention_mask, B, kv_len, query.device)
    out = K.band_attention(
        query, key.to(query.dtype), value.to(query.dtype), windows[layer_idx], sinks[layer_idx], pad, scaling,
        causal=True,
    )
    if layer is not None:
        layer.compact_prefill(pad)
    return out.transpose(1, 2).contiguous(), None


def register_moa() -> None:
    """Register ``"moa"`` with transformers' attention and mask interfaces and the generate() hook (idempotent)."""
    AttentionInterface.register(MOA, moa_attention_forward)
    AttentionMaskInterface.register(MOA, sdpa_mask)
    _install_generate_hook()


# ---------------------------------------------------------------------------------------------------------------------
# generate(): a MoACache by default
# ---------------------------------------------------------------------------------------------------------------------
_HOOK_PARAMS = ["self", "generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"]


def _is_moa_model(model: Any) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(config, "_attn_implementation", None) == MOA


def _install_generate_hook() -> None:
    """Wrap ``GenerationMixin._prepare_cache_for_generation`` (transformers 5.23) to create a :class:`MoACache`.

    Only this private method is patched; on another signature nothing is patched and MoA's decode raises an error
    asking for an explicit ``past_key_values=MoACache(model)``.
    """
    from transformers.generation.utils import GenerationMixin

    orig = GenerationMixin._prepare_cache_for_generation
    if getattr(orig, "_effalg_moa", False):
        return
    params = list(inspect.signature(orig).parameters)
    if params != _HOOK_PARAMS:
        logger.warning(
            f"effalg MoA: GenerationMixin._prepare_cache_for_generation has parameters {params} (tested with "
            f"transformers>={MIN_VERSION},<{MAX_VERSION}: {_HOOK_PARAMS}); generate() will not create a MoACache "
            "automatically, pass past_key_values=effalg.transformers.MoACache(model)"
        )
        return

    @functools.wraps(orig)
    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        if (
            _is_moa_model(self)
            and model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
            and not getattr(self.config, "is_encoder_decoder", False)
        ):
            model_kwargs["past_key_values"] = MoACache(get_moa_plan(self.config))
            return None
        return orig(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    _prepare_cache_for_generation._effalg_moa = True  # type: ignore[attr-defined]
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation


# ---------------------------------------------------------------------------------------------------------------------
# user API
# ---------------------------------------------------------------------------------------------------------------------
def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and "Attention" in type(m).__name__
    ]


def _check_supported(model: Any) -> None:
    """Raise ValueError naming ``model`` unless it is a decoder whose attention goes through AttentionInterface."""
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"apply_moa: expected a transformers PreTrainedModel, got {name}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"apply_moa: {name} is an encoder-decoder model; MoA supports decoder-only models")
    if not (model._supports_attention_backend and model._can_set_attn_implementation()):
        raise ValueError(
            f"apply_moa: {name} does not route its attention through transformers' AttentionInterface; "
            "MoA needs a decoder that does (e.g. Llama, Qwen2, Mistral)"
        )
    text = config.get_text_config(decoder=True)
    if getattr(text, "is_decoder", True) is False and not getattr(model, "can_generate", lambda: False)():
        raise ValueError(f"apply_moa: {name} is not a decoder (causal language) model")
    attn = _attention_modules(model)
    if not attn:
        raise ValueError(
            f"apply_moa: {name} has no attention modules with a layer_idx; MoA needs decoder layers "
            "whose attention calls transformers' attention interface"
        )
    if any(not getattr(m, "is_causal", True) for m in attn):
        raise ValueError(f"apply_moa: {name} has non-causal attention; MoA supports causal decoders only")


def apply_moa(model: PreTrainedModel, plan: Any) -> PreTrainedModel:
    """Switch ``model`` to MoA attention with ``plan`` (in place; returns ``model``).

    Validates the plan against the model (layers, KV heads), stores it as ``config.moa_plan`` (a dict) and sets
    ``config.attn_implementation = "moa"`` so that ``save_pretrained`` persists both.
    """
    _check_supported(model)
    plan = _coerce_plan(plan, "apply_moa: plan")
    text = model.config.get_text_config(decoder=True)
    plan.validate_against_config(text)
    data = plan.to_dict()
    for cfg in {id(c): c for c in (model.config, text)}.values():
        setattr(cfg, _PLAN_ATTR, data)
        cfg.attn_implementation = MOA
    model.set_attn_implementation(MOA)
    from .hub import install_save_hook

    install_save_hook(model)
    return model


def moa_config(pretrained: Any, plan: Any, **kwargs: Any):
    """A config for ``from_pretrained(path, config=moa_config(path, plan))``: ``AutoConfig`` of ``pretrained`` (a path,
    Hub id or config) with ``moa_plan`` and ``attn_implementation="moa"`` set and the plan validated.

    ``plan`` is an :class:`~effalg.core.ElasticWindowPlan`, its dict, a JSON string or a JSON file path.
    """
    from transformers import AutoConfig

    config = pretrained if hasattr(pretrained, "to_json_string") else AutoConfig.from_pretrained(pretrained, **kwargs)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"moa_config: {type(config).__name__} is an encoder-decoder config; MoA supports decoders")
    plan = _coerce_plan(plan, "moa_config: plan")
    text = config.get_text_config(decoder=True)
    plan.validate_against_config(text)
    data = plan.to_dict()
    for cfg in {id(c): c for c in (config, text)}.values():
        setattr(cfg, _PLAN_ATTR, data)
        cfg.attn_implementation = MOA
        cfg._attn_implementation = MOA
    return config


@contextlib.contextmanager
def dense_attention(model: PreTrainedModel, attn_implementation: str = "sdpa") -> Iterator[PreTrainedModel]:
    """Run ``model`` with dense attention (``"sdpa"`` or ``"eager"``) inside the block, restoring MoA afterwards.

    For profiling a MoA model (e.g. the plan search); the stored plan is untouched.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(attn_implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def _density_line(plan: ElasticWindowPlan, lengths=(4096, 16384)) -> str:
    return ", ".join(
        f"density (KV cache kept) {plan.density(n):.3f} / score density {plan.score_density(n):.3f} at N={n}"
        for n in lengths
    )


def plan_summary(plan: Any, lengths=(4096, 16384)) -> str:
    """Human-readable plan summary (shape, density = kept KV-cache fraction, and score density at ``lengths``)."""
    plan = _coerce_plan(plan)
    w = [float(plan.windows(n).double().mean()) for n in lengths]
    wins = ", ".join(f"mean window {x:.0f} at N={n}" for x, n in zip(w, lengths))
    return f"{plan.num_layers} layers x {plan.num_kv_heads} KV heads; {_density_line(plan, lengths)}; {wins}"
