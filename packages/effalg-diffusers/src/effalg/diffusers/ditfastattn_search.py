"""DiTFastAttn's greedy plan search (the paper's Algorithm 1) on a diffusers pipeline.

The pipeline runs once over the calibration prompts (one batch) with every cache kept. At each step after the
first, the denoiser is first run with every layer at full attention for this step (the reference output ``O``); then
block by block, in order, the candidates are tried from the most compressed: AST, WA-RS+ASC, WA-RS, full+ASC. The
first whose output ``O'`` keeps ``loss(O, O') < threshold * (i + 1) / L`` (block ``i`` of ``L``) is kept and stays
applied while the later blocks are tried; otherwise the block runs full. The step then runs with the plan found so
far, so the trajectory the next step calibrates on is the compressed one. ASC is only tried when the calls carry a
``[uncond, cond]`` batch.

``loss`` is the mean relative L1 error of the denoiser output, ``mean(clip(|O - O'| / (max(|O|, |O'|) + 1e-6),
0, 10))``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import logging
from effalg.core.distributed import process_count, sharded_map
from effalg.core.ditfastattn_plan import DiTFastAttnPlan
from effalg.core.memory import reports_peak_memory

from .ditfastattn import apply_ditfastattn, attention_layers, ditfastattn_runtime, remove_ditfastattn
from .pipeline_calibration import quiet_progress

__all__ = ["search_ditfastattn", "relative_l1"]

logger = logging.get_logger(__name__)

_SEARCH_HOOK = "effalg_ditfastattn_search"
_CANDIDATES = ("ast", "wars+asc", "wars", "full+asc")


def relative_l1(ref: torch.Tensor, out: torch.Tensor) -> float:
    """DiTFastAttn's output loss: ``mean(clip(|ref - out| / (max(|ref|, |out|) + 1e-6), 0, 10))``."""
    ref, out = ref.double(), out.double()
    return float(((ref - out).abs() / (torch.maximum(ref.abs(), out.abs()) + 1e-6)).clamp(0, 10).mean())


def _tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


class _Probe(Exception):
    pass


def _probe(pipe, model, layer, call) -> dict[str, Any]:
    """Shapes of the first denoiser call (image and text tokens, CFG batch), read from the first attention layer;
    the pipeline call is stopped there."""
    seen: dict[str, Any] = {}

    def on_model(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        b = hidden.shape[0]
        seen["cfg"] = b % 2 == 0 and torch.equal(hidden[: b // 2], hidden[b // 2 :])

    def on_attn(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seen["num_tokens"] = hidden.shape[1]
        seen["text_tokens"] = enc.shape[1] if isinstance(enc, torch.Tensor) and enc is not hidden else 0
        raise _Probe

    handles = [
        model.register_forward_pre_hook(on_model, with_kwargs=True),
        layer.register_forward_pre_hook(on_attn, with_kwargs=True),
    ]
    try:
        call()
    except _Probe:
        pass
    finally:
        for h in handles:
            h.remove()
    if "num_tokens" not in seen:
        raise RuntimeError(f"search_ditfastattn: the pipeline never ran {type(model).__name__}'s attention")
    return seen


class _SearchHook(ModelHook):
    """Inside the step hook: at each step, the trial forwards of the greedy search, then the real forward."""

    def __init__(self, runtime, layers: list[str], threshold: float, cfg: bool, bar) -> None:
        super().__init__()
        self.runtime = runtime
        self.layers = layers
        self.threshold = threshold
        self.cfg = cfg
        self.bar = bar
        self.timesteps: list[float] = []

    def new_forward(self, module, *args, **kwargs):
        rt = self.runtime
        step = rt.step
        t = kwargs["timestep"]
        self.timesteps.append(float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t))
        forward = self.fn_ref.original_forward
        if step > 0:
            rt.trial = True
            try:
                ref = _tensor(forward(*args, **kwargs))
                cands = [c for c in _CANDIDATES if self.cfg or not c.endswith("+asc")]
                sharded = process_count() > 1
                for i, name in enumerate(self.layers):
                    bound = self.threshold * (i + 1) / len(self.layers)

                    def trial(cand, name=name):
                        rt.set_method(name, step, cand)
                        return relative_l1(ref, _tensor(forward(*args, **kwargs)))

                    if sharded:  # a launch: the candidates split across processes, the first one under the bound
                        losses = sharded_map(trial, cands, desc="DiTFastAttn candidates", progress=False)
                        chosen = next((c for c, loss in zip(cands, losses) if loss < bound), "full")
                    else:  # one process: stop at the first candidate under the bound
                        chosen = next((c for c in cands if trial(c) < bound), "full")
                    rt.set_method(name, step, chosen)
                    self.bar.update(1)
            finally:
                rt.trial = False
            self.bar.set_postfix(attn_flops=f"{self._fraction():.1%}")
        return forward(*args, **kwargs)

    def _fraction(self) -> float:
        plan = self.runtime.plan
        return DiTFastAttnPlan(entries=self.runtime.methods, metadata=plan.metadata).attention_flops_fraction()


def _call_kwargs(pipe, prompts, num_inference_steps, guidance_scale, seed, extra) -> dict[str, Any]:
    params = inspect.signature(type(pipe).__call__).parameters
    kw: dict[str, Any] = {"num_inference_steps": num_inference_steps}
    kw["class_labels" if "class_labels" in params and "prompt" not in params else "prompt"] = list(prompts)
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    if "generator" in params:
        kw["generator"] = torch.Generator().manual_seed(seed)
    if "output_type" in params:
        kw["output_type"] = "latent"
    kw.update(extra)
    return kw


def _guidance(pipe, kw) -> float | None:
    if "guidance_scale" in kw:
        return float(kw["guidance_scale"])
    p = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return None if p is None or p.default is inspect.Parameter.empty else float(p.default)


@torch.no_grad()
@reports_peak_memory(logger, "DiTFastAttn search")
def search_ditfastattn(
    pipe,
    prompts: Sequence[Any],
    threshold: float = 0.05,
    window: int | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    progress: bool = True,
    **call_kwargs: Any,
) -> DiTFastAttnPlan:
    """Search a DiTFastAttn plan for ``pipe``'s denoiser (see the module docstring).

    Args:
        pipe: a diffusers pipeline whose denoiser DiTFastAttn supports (PixArt, DiT, SD3, Flux, Latte).
        prompts: the calibration prompts (class labels for ``DiTPipeline``), run as one batch.
        threshold: δ, the output-loss budget of the last block.
        window: tokens per side of window attention (default: an eighth of the image tokens, as in the paper).
        num_inference_steps, guidance_scale: the sampling setting the plan is for (guidance: the pipeline default).
        seed: seed of the calibration latents.
        progress: the tqdm bar over steps x blocks.
        call_kwargs: further pipeline arguments (e.g. ``height``/``width``, ``use_resolution_binning=False``).

    Returns the plan; apply it with :func:`~effalg.diffusers.apply_ditfastattn`.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"search_ditfastattn: threshold must be a number >= 0, got {threshold!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"search_ditfastattn: num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("search_ditfastattn: prompts must be a non-empty list")
    model = getattr(pipe, "transformer", None)
    if model is None:
        raise TypeError(f"search_ditfastattn: {type(pipe).__name__} has no transformer")
    layers = attention_layers(model)
    if ditfastattn_runtime(model) is not None:
        logger.info("search_ditfastattn: removing the plan active on %s", type(model).__name__)
        remove_ditfastattn(model)
    kw = _call_kwargs(pipe, prompts, num_inference_steps, guidance_scale, seed, call_kwargs)
    first = next(iter(layers.values()))
    with quiet_progress(pipe):
        shapes = _probe(pipe, model, first, lambda: pipe(**kw))
    n = shapes["num_tokens"]
    if window is None:
        window = max(1, n // 8)
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window < n:
        raise ValueError(
            f"search_ditfastattn: window must be an int in [1, {n - 1}] ({n} image tokens), got {window!r}"
        )
    metadata = {
        "window": window,
        "num_steps": num_inference_steps,
        "num_tokens": n,
        "text_tokens": shapes["text_tokens"],
        "cfg": bool(shapes["cfg"]),
        "hidden_size": int(first.to_q.out_features),
        "guidance_scale": _guidance(pipe, kw),
        "scheduler": type(pipe.scheduler).__name__,
        "threshold": float(threshold),
    }
    names = list(layers)
    plan = DiTFastAttnPlan.uniform(names, ["full"] * num_inference_steps, **metadata)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    bar = tqdm(total=max(num_inference_steps - 1, 0) * len(names), desc="DiTFastAttn search", unit="block",
               disable=not progress)  # fmt: skip
    hook = _SearchHook(None, names, float(threshold), metadata["cfg"], bar)
    registry.register_hook(hook, _SEARCH_HOOK)  # inside the step hook: one step per pipeline step
    try:
        hook.runtime = ditfastattn_runtime(apply_ditfastattn(model, plan, record=False))
        hook.runtime.cache_all = True
        with quiet_progress(pipe):
            pipe(**_call_kwargs(pipe, prompts, num_inference_steps, guidance_scale, seed, call_kwargs))
        methods = {k: list(v) for k, v in hook.runtime.methods.items()}
    finally:
        bar.close()
        remove_ditfastattn(model, record=False)
        registry.remove_hook(_SEARCH_HOOK, recurse=False)
    metadata["timesteps"] = hook.timesteps
    metadata["search"] = {"prompts": len(prompts), "seed": seed}
    result = DiTFastAttnPlan(
        entries=methods,
        model={"class": type(model).__name__, "name_or_path": str(getattr(model.config, "_name_or_path", ""))},
        metadata=metadata,
    )
    logger.info(
        "search_ditfastattn: threshold %g -> %.1f%% of the attention FLOPs; methods %s",
        threshold, 100 * result.attention_flops_fraction(), result.method_counts(),
    )  # fmt: skip
    return result
