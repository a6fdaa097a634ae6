"""DiTFastAttn at run time: a step-tracking hook on the denoiser plus attention processors on its self-attention.

:func:`apply_ditfastattn` installs, for a :class:`~effalg.core.ditfastattn_plan.DiTFastAttnPlan`:

* the ``"effalg_ditfastattn_step"`` :class:`~diffusers.hooks.ModelHook` on the denoiser. It reads each call's
  ``timestep``, advances the step, checks the call against the plan (timesteps, hence step count and scheduler;
  the ``[uncond, cond]`` CFG batch where the step shares across branches) and frees every cache after the last step
  and at the start of each pipeline call;
* a :class:`DiTFastAttnProcessor` on each block's self-attention (cross-attention and feed-forward are untouched).
  It wraps the layer's own processor: a plain full step calls it unchanged, so an all-full plan is the unmodified
  model. The other methods recompute the same projections around :func:`effalg.kernels.band_attention`.

Supported (``attention families``, keyed by the layer's original processor type): ``AttnProcessor2_0`` self-attention
(PixArt-α/Σ, DiT, Latte's spatial blocks), ``JointAttnProcessor2_0`` (SD3: image and text tokens attend jointly; the
band applies to the image tokens and the text tokens stay global) and ``FluxAttnProcessor`` (Flux, likewise).

The plan is recorded in the denoiser's ``quantization_config`` (an effalg config's ``attention_plan``, or a
:class:`DiTFastAttnConfig` on a float model), so ``save_pretrained`` writes it and a plain ``from_pretrained`` after
``import effalg.diffusers`` loads the model with DiTFastAttn active again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import logging
from effalg.core.ditfastattn_plan import DiTFastAttnPlan, output_steps, residual_steps
from effalg.core.plans import Plan, PlanError
from effalg.kernels import band_attention
from effalg.kernels.allocator import begin_bounded_allocations

from .config import EffalgDiffusersConfig, EffalgQuantMethod
from .quantizer import EffalgDiffusersQuantizer

__all__ = [
    "DITFASTATTN_HOOK",
    "DiTFastAttnConfig",
    "DiTFastAttnMismatch",
    "DiTFastAttnQuantizer",
    "DiTFastAttnProcessor",
    "DiTFastAttnRuntime",
    "apply_ditfastattn",
    "as_ditfastattn_plan",
    "attention_layers",
    "ditfastattn_runtime",
    "remove_ditfastattn",
]

logger = logging.get_logger(__name__)

#: Name of the step-tracking hook in the denoiser's ``HookRegistry``.
DITFASTATTN_HOOK = "effalg_ditfastattn_step"

#: Self-attention layers per denoiser class (full-match regexes on module names).
_LAYERS: dict[str, str] = {
    "PixArtTransformer2DModel": r"transformer_blocks\.\d+\.attn1",
    "DiTTransformer2DModel": r"transformer_blocks\.\d+\.attn1",
    "LatteTransformer3DModel": r"transformer_blocks\.\d+\.attn1",  # spatial blocks (temporal ones are separate)
    "SD3Transformer2DModel": r"transformer_blocks\.\d+\.attn",
    "FluxTransformer2DModel": r"(single_)?transformer_blocks\.\d+\.attn",
}
#: Denoisers whose pipelines order the CFG batch ``[cond, uncond]`` (the others use ``[uncond, cond]``).
_COND_FIRST = frozenset({"DiTTransformer2DModel"})


class DiTFastAttnMismatch(ValueError):
    """A call does not match the plan (steps, timesteps, resolution or CFG)."""


# ---- attention families ----------------------------------------------------------------------------------------
# Each mirrors its diffusers processor line by line, with the attention call replaced by ``attend(q, k, v, full)``:
# ``q, k, v`` are ``[B, H, S, D]``, ``full()`` is the processor's own attention call (its result in that layout).
# ``text`` is the number of global (text) tokens and where they sit in the sequence.


def _qkv_heads(attn, hidden_states, batch_size: int):
    """The legacy ``Attention`` processors' q / k / v as ``[B, heads, S, head_dim]`` (with ``norm_q`` / ``norm_k``)."""
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


def _self_attention(attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
    """``AttnProcessor2_0`` (diffusers 0.42) with a pluggable attention call."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query, key, value, head_dim = _qkv_heads(attn, hidden_states, batch_size)

    def full():
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )

    hidden_states = attend(query, key, value, full, text=(0, "first"), masked=attention_mask is not None)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _joint_attention(attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
    """``JointAttnProcessor2_0`` (SD3, diffusers 0.42) with a pluggable attention call; text tokens come last."""
    residual = hidden_states
    batch_size = hidden_states.shape[0]
    query, key, value, head_dim = _qkv_heads(attn, hidden_states, batch_size)
    n_text = 0
    if encoder_hidden_states is not None:
        n_text = encoder_hidden_states.shape[1]
        eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query = torch.cat([query, eq], dim=2)
        key = torch.cat([key, ek], dim=2)
        value = torch.cat([value, ev], dim=2)

    def full():
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

    hidden_states = attend(query, key, value, full, text=(n_text, "last"), masked=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    if encoder_hidden_states is not None:
        hidden_states, encoder_hidden_states = (
            hidden_states[:, : residual.shape[1]],
            hidden_states[:, residual.shape[1] :],
        )
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if encoder_hidden_states is not None:
        return hidden_states, encoder_hidden_states
    return hidden_states


def _flux_attention(attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None,
                    image_rotary_emb=None, *, processor=None, text_tokens: int = 0, **kw):  # fmt: skip
    """``FluxAttnProcessor`` (diffusers 0.42) with a pluggable attention call; text tokens come first (in single
    blocks the sequence is already ``[text, image]``; ``text_tokens`` comes from the denoiser call)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
        attn, hidden_states, encoder_hidden_states
    )
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    n_text = text_tokens
    if attn.added_kv_proj_dim is not None:
        n_text = encoder_hidden_states.shape[1]
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

    def full():
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask,
            backend=processor._attention_backend, parallel_config=processor._parallel_config,
        )  # fmt: skip
        return out.transpose(1, 2)

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    hidden_states = attend(q, k, v, full, text=(n_text, "first"), masked=attention_mask is not None)
    hidden_states = hidden_states.transpose(1, 2).flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is not None:
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states
    return hidden_states


def _family_registry() -> dict[type, Callable]:
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return {
        AttnProcessor2_0: _self_attention,
        JointAttnProcessor2_0: _joint_attention,
        FluxAttnProcessor: _flux_attention,
    }


# ---- plan helpers ----------------------------------------------------------------------------------------------


def as_ditfastattn_plan(plan: Any, where: str = "plan") -> DiTFastAttnPlan:
    """A :class:`DiTFastAttnPlan` from a plan, its dict or a JSON file path (``PlanError`` naming the source)."""
    if isinstance(plan, DiTFastAttnPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    elif isinstance(plan, Mapping):
        plan = Plan.from_dict(plan, source=where)
    if not isinstance(plan, DiTFastAttnPlan):
        got = plan.kind if isinstance(plan, Plan) else type(plan).__name__
        raise PlanError(f"{where}: expected a 'ditfastattn' plan (DiTFastAttnPlan, its dict or file), got {got}")
    return plan


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: attention module}`` of the self-attention layers DiTFastAttn compresses in ``model``."""
    pattern = _LAYERS.get(type(model).__name__)
    if pattern is None:
        raise ValueError(
            f"DiTFastAttn: {type(model).__name__} has no supported self-attention blocks; supported denoisers: "
            f"{sorted(_LAYERS)}"
        )
    layers = {n: m for n, m in model.named_modules() if re.fullmatch(pattern, n) and hasattr(m, "set_processor")}
    if not layers:
        raise ValueError(f"DiTFastAttn: {type(model).__name__} has no self-attention blocks ({pattern!r} matches none)")
    return layers


def _denoiser(pipe_or_model) -> nn.Module:
    if isinstance(pipe_or_model, nn.Module):
        return pipe_or_model
    for name in ("transformer", "unet"):
        model = getattr(pipe_or_model, name, None)
        if isinstance(model, nn.Module):
            return model
    raise TypeError(f"DiTFastAttn: expected a pipeline with a transformer or a denoiser model, got {pipe_or_model!r}")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(t) for t in x)
    return 0


def _duplicate(x):
    if isinstance(x, tuple):
        return tuple(_duplicate(t) for t in x)
    return torch.cat([x, x], dim=0)


def _cond_half(x, cond_first: bool):
    if not isinstance(x, torch.Tensor):
        return x
    half = x.shape[0] // 2
    return x[:half] if cond_first else x[half:]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


# ---- runtime ---------------------------------------------------------------------------------------------------


class DiTFastAttnRuntime:
    """Shared state of one denoiser: the plan, the current step and the per-layer caches.

    ``methods`` (``{layer: [method per step]}``) is what the processors run; the search edits it in place.
    ``cache_all`` keeps every layer's output and residual (the search does not know the later steps yet);
    ``trial`` runs a forward without writing any cache.
    """

    def __init__(self, plan: DiTFastAttnPlan, model: nn.Module) -> None:
        self.plan = plan
        self.model_class = type(model).__name__
        self.cond_first = self.model_class in _COND_FIRST
        self.methods = {k: list(v) for k, v in plan.entries.items()}
        self.step: int | None = None
        self.finished = True
        self.in_forward = False
        self.last_t: float | None = None
        self.text_tokens = 0
        self.outputs: dict[str, Any] = {}
        self.residuals: dict[str, torch.Tensor] = {}
        self.peak_cache_bytes = 0
        self.cache_all = False
        self.trial = False
        self._residual = {n: residual_steps(m) for n, m in self.methods.items()}
        self._output = {n: output_steps(m) for n, m in self.methods.items()}

    def set_method(self, layer: str, step: int, method: str) -> None:
        """Run ``method`` at ``step`` in ``layer`` (the search's edits)."""
        methods = self.methods[layer]
        methods[step] = method
        self._residual[layer] = residual_steps(methods)
        self._output[layer] = output_steps(methods)

    # ---- caches ------------------------------------------------------------------------------------------------
    @property
    def cache_bytes(self) -> int:
        """Bytes held by the cached outputs and residuals now."""
        return _nbytes(list(self.outputs.values())) + _nbytes(list(self.residuals.values()))

    def _stored(self) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)

    def release(self) -> None:
        """Free every cached output and residual."""
        self.outputs.clear()
        self.residuals.clear()

    def wants_residual(self, layer: str, step: int) -> bool:
        return not self.trial and (self.cache_all or self._residual[layer][step])

    def wants_output(self, layer: str, step: int) -> bool:
        return not self.trial and (self.cache_all or self._output[layer][step])

    # ---- steps -------------------------------------------------------------------------------------------------
    def begin_call(self, t: float, hidden_states: torch.Tensor, encoder_hidden_states) -> int:
        """Advance to the step of a denoiser call at timestep ``t``; raise :class:`DiTFastAttnMismatch` on a
        mismatch with the plan."""
        md = self.plan.metadata
        n, timesteps = md["num_steps"], md.get("timesteps")
        new_call = (
            self.finished
            or self.in_forward  # the previous forward raised
            or self.step is None
            or (timesteps is not None and _close(t, timesteps[0]) and not _close(t, self.last_t))
            or (timesteps is None and t > self.last_t)
        )
        if new_call:
            self.release()
            self.step, self.finished = 0, False
        elif self.last_t is not None and _close(t, self.last_t):
            raise DiTFastAttnMismatch(
                f"DiTFastAttn: {self.model_class} was called twice at timestep {t:g} (separate CFG calls, e.g. Flux "
                "true_cfg_scale); the plan needs one call per step with a batched [uncond, cond] CFG batch"
            )
        else:
            self.step += 1
        step = self.step
        if step >= n:
            raise DiTFastAttnMismatch(
                f"DiTFastAttn: this call runs more than the plan's {n} steps: call the pipeline with "
                f"num_inference_steps={n} (or search a plan for this step count)"
            )
        if timesteps is not None and not _close(t, timesteps[step]):
            raise DiTFastAttnMismatch(
                f"DiTFastAttn: step {step} runs at timestep {t:g} but the plan was searched at timestep "
                f"{timesteps[step]:g} ({n} steps with {md.get('scheduler', 'its scheduler')}): call the pipeline "
                f"with num_inference_steps={n} and the same scheduler, or search a plan for this schedule"
            )
        self.last_t = t
        if md["cfg"] and any(m[step].endswith("+asc") for m in self.methods.values()):
            b = hidden_states.shape[0]
            if b % 2 or not torch.equal(hidden_states[: b // 2], hidden_states[b // 2 :]):
                raise DiTFastAttnMismatch(
                    f"DiTFastAttn: the plan shares attention across CFG branches at step {step} (searched with "
                    f"guidance_scale={md.get('guidance_scale')}), but this call's batch of {b} is not a "
                    "[uncond, cond] CFG batch: enable classifier-free guidance (guidance_scale > 1) or search a plan "
                    "without CFG"
                )
        self.text_tokens = encoder_hidden_states.shape[1] if isinstance(encoder_hidden_states, torch.Tensor) else 0
        return step

    def reset(self) -> None:
        """Forget the current call (the next denoiser call starts at step 0) and free the caches."""
        self.release()
        self.step, self.finished, self.in_forward, self.last_t = None, True, False, None

    def end_call(self) -> None:
        self.in_forward = False
        if self.step is not None and self.step == self.plan.metadata["num_steps"] - 1:
            self.release()
            self.finished = True


class _StepHook(ModelHook):
    """Pre-forward: the step of this call (checked against the plan); post-forward: free the caches after the
    last step."""

    _is_stateful = True

    def __init__(self, runtime: DiTFastAttnRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def pre_forward(self, module, *args, **kwargs):
        t = kwargs.get("timestep")
        if t is None:
            raise DiTFastAttnMismatch(
                f"DiTFastAttn: {type(module).__name__} was called without a `timestep` keyword argument; the plan "
                "is indexed by denoising step"
            )
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        try:
            self.runtime.begin_call(t, hidden, kwargs.get("encoder_hidden_states"))
        except DiTFastAttnMismatch:
            self.runtime.reset()
            raise
        self.runtime.in_forward = True
        return args, kwargs

    def post_forward(self, module, output):
        self.runtime.end_call()
        return output

    def reset_state(self, module):
        self.runtime.reset()
        return module


class DiTFastAttnProcessor:
    """Runs one self-attention layer's method for the current step (see the module docstring)."""

    def __init__(self, name: str, base, family: Callable, runtime: DiTFastAttnRuntime) -> None:
        self.name = name
        self.base = base
        self.family = family
        self.runtime = runtime

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 temb=None, **kwargs):  # fmt: skip
        # diffusers passes only the arguments a processor declares by name (Flux passes image_rotary_emb
        # positionally, legacy Attention may pass temb)
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        if temb is not None:
            kwargs["temb"] = temb
        rt = self.runtime
        if rt.step is None:
            raise DiTFastAttnMismatch(
                f"DiTFastAttn: {self.name} ran outside a denoiser call (the step hook did not run); call the model "
                "itself, not the attention module"
            )
        step = rt.step
        method = rt.methods[self.name][step]
        if method == "ast":
            if self.name not in rt.outputs:
                raise DiTFastAttnMismatch(f"DiTFastAttn: {self.name} shares step {step - 1}'s output, which is missing")
            return rt.outputs[self.name]
        core, _, share = method.partition("+")
        asc = share == "asc"
        if asc:
            hidden_states = _cond_half(hidden_states, rt.cond_first)
            encoder_hidden_states = _cond_half(encoder_hidden_states, rt.cond_first)
            attention_mask = _cond_half(attention_mask, rt.cond_first)
            if "temb" in kwargs:
                kwargs["temb"] = _cond_half(kwargs["temb"], rt.cond_first)
        residual = core == "full" and rt.wants_residual(self.name, step)
        if core == "full" and not residual:
            out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        else:
            extra = {"processor": self.base, "text_tokens": rt.text_tokens} if self.family is _flux_attention else {}

            def attend(q, k, v, full, text, masked):
                return self._attend(q, k, v, full, text, masked, core, residual, asc, step)

            out = self.family(attn, attend, hidden_states, encoder_hidden_states, attention_mask, **kwargs, **extra)
        if asc:
            out = _duplicate(out)
        if rt.wants_output(self.name, step):
            rt.outputs[self.name] = out
            rt._stored()
        return out

    def _attend(self, q, k, v, full, text, masked, core, residual, asc, step):
        rt = self.runtime
        n_text, where = text
        n_img = q.shape[2] - n_text
        expected = rt.plan.metadata["num_tokens"]
        if n_img != expected:
            raise DiTFastAttnMismatch(
                f"DiTFastAttn: {self.name} got {n_img} image tokens but the plan was searched at {expected} (another "
                "resolution or frame count); search a plan for this resolution"
            )
        if masked:
            raise DiTFastAttnMismatch(f"DiTFastAttn: {self.name} got an attention mask; window attention has none")
        if core == "full":
            out = full()
            r = out - self._window(q, k, v, n_text, where)
            rt.residuals[self.name] = _duplicate(r) if asc else r
            rt._stored()
            return out
        if self.name not in rt.residuals:
            raise DiTFastAttnMismatch(f"DiTFastAttn: {self.name} runs WA-RS at step {step} without a cached residual")
        r = rt.residuals[self.name]
        if asc:
            r = _cond_half(r, rt.cond_first)
        return self._window(q, k, v, n_text, where) + r

    def _window(self, q, k, v, n_text: int, where: str) -> torch.Tensor:
        window = self.runtime.plan.window + 1  # the kernel's window counts the diagonal: |i - j| < window
        if n_text and where == "last":  # the kernel wants the global tokens first
            n = q.shape[2] - n_text
            q, k, v = (torch.cat([t[:, :, n:], t[:, :, :n]], dim=2) for t in (q, k, v))
            o = band_attention(q, k, v, window, sink=n_text)
            return torch.cat([o[:, :, n_text:], o[:, :, :n_text]], dim=2)
        return band_attention(q, k, v, window, sink=n_text)


# ---- public API ------------------------------------------------------------------------------------------------


def ditfastattn_runtime(pipe_or_model) -> DiTFastAttnRuntime | None:
    """The :class:`DiTFastAttnRuntime` active on a denoiser (or a pipeline's), or None."""
    return getattr(_denoiser(pipe_or_model), "_effalg_ditfastattn", None)


def apply_ditfastattn(pipe_or_model, plan, *, record: bool = True) -> nn.Module:
    """Activate a DiTFastAttn ``plan`` (a :class:`DiTFastAttnPlan`, its dict or JSON file) on a pipeline's denoiser
    (or on a denoiser); replaces a plan applied before. Returns the denoiser.

    With ``record`` the plan is written into the denoiser's ``quantization_config`` so that ``save_pretrained``
    saves it (see the module docstring).
    """
    model = _denoiser(pipe_or_model)
    layers = attention_layers(model)
    plan = as_ditfastattn_plan(plan)
    plan.check_model(layers)
    if ditfastattn_runtime(model) is not None:
        remove_ditfastattn(model, record=False)
    families = _family_registry()
    runtime = DiTFastAttnRuntime(plan, model)
    for name, attn in layers.items():
        base = attn.processor
        family = families.get(type(base))
        if family is None:
            raise TypeError(
                f"DiTFastAttn: {name} uses the attention processor {type(base).__name__}; supported: "
                f"{sorted(t.__name__ for t in families)} (reset custom processors first)"
            )
        attn.set_processor(DiTFastAttnProcessor(name, base, family, runtime))
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_StepHook(runtime), DITFASTATTN_HOOK)
    model._effalg_ditfastattn = runtime
    if record:
        _record_plan(model, plan)
    logger.info(
        "DiTFastAttn on %s: %d layers x %d steps, %.1f%% of the attention FLOPs (window ±%d of %d tokens)",
        type(model).__name__, len(layers), plan.num_steps, 100 * plan.attention_flops_fraction(), plan.window,
        plan.metadata["num_tokens"],
    )  # fmt: skip
    return model


def remove_ditfastattn(pipe_or_model, *, record: bool = True) -> nn.Module:
    """Restore the layers' own processors, remove the step hook and free the caches (and, with ``record``, drop the
    plan from the denoiser's ``quantization_config``)."""
    model = _denoiser(pipe_or_model)
    runtime = ditfastattn_runtime(model)
    if runtime is None:
        return model
    runtime.release()
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, DiTFastAttnProcessor):
            module.set_processor(proc.base)
    HookRegistry.check_if_exists_or_initialize(model).remove_hook(DITFASTATTN_HOOK, recurse=False)
    del model._effalg_ditfastattn
    if record:
        _record_plan(model, None)
    return model


def _record_plan(model: nn.Module, plan: DiTFastAttnPlan | None) -> None:
    qc = getattr(model.config, "quantization_config", None)
    data = None if plan is None else plan.to_dict()
    if isinstance(qc, DiTFastAttnConfig) and data is None:
        model.register_to_config(quantization_config=None)
    elif isinstance(qc, EffalgDiffusersConfig):
        qc.attention_plan = data
    elif qc is None and data is not None:
        model.register_to_config(quantization_config=DiTFastAttnConfig(attention_plan=data))
        from .hub import install_save_hook

        install_save_hook(model, [])
    elif data is not None:
        logger.warning(
            "DiTFastAttn: %s carries a %s quantization config, so save_pretrained will not save the plan; "
            "re-apply it after loading", type(model).__name__, type(qc).__name__,
        )  # fmt: skip


# ---- loading ---------------------------------------------------------------------------------------------------


class DiTFastAttnConfig(EffalgDiffusersConfig):
    """A DiTFastAttn plan alone (float weights) as a diffusers ``quantization_config``: the one load-time hook that
    runs plugin code, so ``from_pretrained`` activates the plan.

    ``DiffusionPipeline.from_pretrained(path, quantization_config=DiTFastAttnConfig(plan))`` gives it at load time;
    :func:`apply_ditfastattn` writes it into a float denoiser's config so that ``save_pretrained`` saves the plan.
    To combine with quantization, pass the plan as ``attention_plan`` of the quantization config instead (e.g.
    ``ViDiTQConfig(..., attention_plan=plan)``).

    Being "quantized" for diffusers means: ``low_cpu_mem_usage`` is forced on, ``model.hf_quantizer`` is set and
    ``torch_dtype=None`` loads float32 (as without a config). effalg resets ``model.is_quantized`` after loading, so
    ``.to(dtype)`` / ``.half()`` keep working on these float weights.
    """

    method = EffalgQuantMethod.DITFASTATTN

    def __init__(self, attention_plan: Any = None, version: int = 1, quant_method: str | None = None,
                 modules_to_not_convert: Any = None) -> None:  # fmt: skip
        if attention_plan is None:
            raise ValueError("DiTFastAttnConfig: attention_plan is required (search_ditfastattn(...) makes one)")
        super().__init__(version=version, quant_method=quant_method, attention_plan=attention_plan)

    def to_core_config(self, modules_to_not_convert=None):
        return None

    def resolved_for(self, model: nn.Module) -> DiTFastAttnConfig:
        return self

    @property
    def method_tag(self) -> str:
        return "ditfastattn"


class DiTFastAttnQuantizer(EffalgDiffusersQuantizer):
    """Loads float weights unchanged and activates the config's plan after loading."""

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        model.register_to_config(quantization_config=self.quantization_config)
        self.converted, self._converted_names = [], frozenset()
        begin_bounded_allocations()  # ended by the base class's _process_model_after_weight_loading
        return model

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        return False

    def _process_model_after_weight_loading(self, model, **kwargs):
        model = super()._process_model_after_weight_loading(model, **kwargs)
        model.is_quantized = False  # float weights: dtype casts stay allowed
        return model
