"""Pipeline calibration shared by the calibration-based diffusers methods (ViDiT-Q, MixDQ).

A method plugs its own pieces (which layers, how to build a quantized layer, its metric groups) into:

* :func:`calibrate` / :func:`register_calibrator`: the public entry point, dispatching on the config type.
* :func:`check_prompts`, :func:`float_denoiser`, :func:`select_layers`: argument checks and the layers to calibrate.
* :class:`PipelineRunner` and :func:`run_float`: deterministic pipeline calls; one float pass over prompts x steps
  (tqdm) collecting activation statistics over every timestep and both CFG branches, and recording the denoiser
  calls and final latents that the sensitivity metrics compare against.
* :class:`LayerMetric` (:class:`FinalLatentsMetric`, :class:`ModuleOutputMetric`), :class:`MetricGroup` and
  :func:`layer_sensitivity`: the error of each layer quantized alone, at each candidate setting of its group, under
  its group's metric. Group normalization and the MILP are framework-free: :mod:`effalg.core.allocation`.
* :func:`install_quantized`: swap the quantized layers in and make the model save / reload like a loaded one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffusers.utils import logging
from effalg.core.calibration import ActivationStatsCollector, CalibrationStats
from effalg.core.memory import reports_peak_memory
from effalg.core.modules import QuantModuleBase, prepack_model_

from .quantizer import _in_keep_fp32

__all__ = [
    "CalibrationRun",
    "FinalImageMetric",
    "FinalLatentsMetric",
    "LayerMetric",
    "MetricGroup",
    "ModuleOutputMetric",
    "PipelineRunner",
    "calibrate",
    "check_prompts",
    "float_denoiser",
    "install_quantized",
    "layer_sensitivity",
    "register_calibrator",
    "registered_calibrators",
    "relative_error",
    "run_float",
    "select_layers",
    "swap_layers",
]

logger = logging.get_logger(__name__)

Calibrator = Callable[..., Any]
_CALIBRATORS: dict[type, Calibrator] = {}


# ---- registry and entry point ---------------------------------------------------------------------------------------
def register_calibrator(config_type: type) -> Callable[[Calibrator], Calibrator]:
    """Decorator registering ``fn(pipe, prompts, config, **kwargs)`` as the calibration of ``config_type`` (and its
    subclasses) for :func:`calibrate`."""
    if not isinstance(config_type, type):
        raise TypeError(f"register_calibrator: config_type must be a class, got {config_type!r}")

    def deco(fn: Calibrator) -> Calibrator:
        if not callable(fn):
            raise TypeError(f"register_calibrator: calibrator must be callable, got {fn!r}")
        _CALIBRATORS[config_type] = fn
        return fn

    return deco


def registered_calibrators() -> dict[type, Calibrator]:
    """``{config type: calibration function}``."""
    return dict(_CALIBRATORS)


def calibrate(pipe, prompts: Sequence[str], config, **kwargs: Any):
    """Calibrate ``pipe`` on ``prompts`` with the method of ``config`` and quantize its denoiser in place.

    Dispatches to the function registered for ``type(config)`` (or its nearest registered base class) with
    :func:`register_calibrator`; ``kwargs`` are that function's (``num_inference_steps``, ``guidance_scale``,
    ``seed``, ``progress``, pipeline call arguments such as ``height`` / ``width``). Returns what it returns (``pipe``).

    Raises:
        TypeError: no calibration is registered for ``type(config)`` (the message lists the registered types).
    """
    for klass in type(config).__mro__:
        fn = _CALIBRATORS.get(klass)
        if fn is not None:
            return reports_peak_memory(logger, f"{type(config).__name__} calibration")(fn)(pipe, prompts, config, **kwargs)
    names = [t.__name__ for t in _CALIBRATORS]
    raise TypeError(
        f"calibrate: config must be a {' or '.join(names) or '(none registered)'}, got {type(config).__name__}: no "
        f"calibration is registered for {type(config).__name__} (registered config types: {names})"
    )


# ---- arguments and layers -------------------------------------------------------------------------------------------
def check_prompts(prompts: str | Sequence[str] | None, num_inference_steps: int) -> list[str]:
    """The calibration prompts as a non-empty list of strings (a single string is one prompt); checks the steps."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else []
    if not prompts:
        raise ValueError("calibrate: prompts is empty; give at least one calibration prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"calibrate: prompts must be strings, got {type(bad[0]).__name__}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"calibrate: num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    return prompts


def float_denoiser(pipe, config) -> tuple[str, nn.Module]:
    """``(component name, module)`` of the pipeline's denoiser (the first of ``config.pipeline_components``).

    Raises:
        TypeError: ``pipe`` has none of them. ValueError: it is already quantized.
    """
    for name in config.pipeline_components:
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            if getattr(model, "hf_quantizer", None) is not None or any(
                isinstance(m, QuantModuleBase) for m in model.modules()
            ):
                raise ValueError(f"calibrate: pipe.{name} is already quantized; calibrate the float pipeline")
            return name, model
    raise TypeError(
        f"calibrate: pipe must be a DiffusionPipeline with a denoiser component {list(config.pipeline_components)}, "
        f"got {type(pipe).__name__}"
    )


def select_layers(
    model: nn.Module, modules_to_not_convert: Sequence[str], select: Callable[[str, nn.Module], Any]
) -> dict[str, Any]:
    """``{name: select(name, module)}`` over the modules not under ``modules_to_not_convert`` (exact names) nor the
    model's ``_keep_in_fp32_modules``, where ``select`` returns something other than None (in module order).

    Raises:
        ValueError: nothing selected.
    """
    skip = set(modules_to_not_convert)
    keep_fp32 = getattr(type(model), "_keep_in_fp32_modules", None) or []
    keep_fp32 = [keep_fp32] if isinstance(keep_fp32, str) else list(keep_fp32)
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip) or _in_keep_fp32(name, keep_fp32):
            continue
        kind = select(name, m)
        if kind is not None:
            out[name] = kind
    if not out:
        raise ValueError(
            f"calibrate: no quantizable layers in {type(model).__name__} "
            f"(modules_to_not_convert={list(modules_to_not_convert)})"
        )
    return out


# ---- running the pipeline -------------------------------------------------------------------------------------------
def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"calibrate: cannot find the output tensor in {type(out).__name__}")


@contextlib.contextmanager
def quiet_progress(pipe) -> Iterator[None]:
    """The pipeline's own progress bar off (calibration and searches show their own), restored after."""
    old = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = old


def seeded_output(pipe, prompts: Sequence[str], num_inference_steps: int, seed: int, **call_kwargs: Any) -> torch.Tensor:
    """``pipe(prompts, ...)`` with a generator seeded ``seed``: its images (latents with ``output_type="latent"``) as
    float32, the candidates of a schedule search and their reference alike."""
    out = pipe(list(prompts), num_inference_steps=num_inference_steps, generator=torch.Generator("cpu").manual_seed(seed),
               **call_kwargs)  # fmt: skip
    return (out.images if hasattr(out, "images") else out[0]).float()


def reference_error(out: torch.Tensor, ref: torch.Tensor, metric: Callable | None = None) -> float:
    """A candidate's score against the reference output (lower is better): mean squared error, or ``metric``."""
    return float(((out - ref) ** 2).mean()) if metric is None else float(metric(out, ref))


def metric_name(metric: Callable | None) -> str:
    """How a search records the score :func:`reference_error` computes with ``metric``."""
    return "latent_mse_vs_reference" if metric is None else getattr(metric, "__name__", "custom")


class PipelineRunner:
    """Deterministic calls of ``pipe`` (prompt ``i`` uses a generator seeded ``seed + i``) and replays of recorded
    calls of its denoiser ``model``."""

    def __init__(
        self,
        pipe,
        model: nn.Module,
        num_inference_steps: int,
        guidance_scale: float | None = None,
        seed: int = 0,
        call_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.pipe, self.model = pipe, model
        self.steps, self.guidance_scale, self.seed = num_inference_steps, guidance_scale, seed
        self.call_kwargs = dict(call_kwargs or {})

    def run(self, prompt: str, i: int, output_type: str = "latent") -> torch.Tensor:
        """The pipeline's output tensor (``images`` / ``frames``) for ``prompt`` as the ``i``-th prompt."""
        kw = dict(self.call_kwargs)
        kw.update(prompt=prompt, num_inference_steps=self.steps, output_type=output_type)
        kw["generator"] = torch.Generator().manual_seed(self.seed + i)
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        out = self.pipe(**kw)
        for attr in ("images", "frames"):
            if hasattr(out, attr):
                return getattr(out, attr)
        return out[0]

    def latents(self, prompt: str, i: int) -> torch.Tensor:
        """Final latents (``output_type="latent"``)."""
        return self.run(prompt, i, "latent")

    def replay(
        self, calls: Sequence[tuple[tuple, dict]], watch: Sequence[str] = ("",)
    ) -> dict[str, list[torch.Tensor]]:
        """Run the denoiser on the recorded ``calls``; returns ``{module: [output per call]}`` (float32 copies) for
        the module names in ``watch`` (``""`` = the denoiser itself)."""
        captured: dict[str, list[torch.Tensor]] = {w: [] for w in watch}

        def hook_for(w):
            def h(_m, _a, out):
                captured[w].append(_first_tensor(out).detach().float().clone())

            return h

        hs = [self.model.get_submodule(w).register_forward_hook(hook_for(w)) for w in watch]
        try:
            for args, kwargs in calls:
                self.model(*args, **kwargs)
        finally:
            for h in hs:
                h.remove()
        return captured


@dataclass
class CalibrationRun:
    """What :func:`run_float` leaves: activation statistics (None if no modules were given), and for the first
    ``record`` prompts (``recorded_prompts``) the denoiser calls (args, kwargs) and the float final latents."""

    runner: PipelineRunner
    prompts: list[str]
    stats: CalibrationStats | None = None
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)

    @property
    def recorded_prompts(self) -> list[str]:
        return self.prompts[: len(self.latents)]


@torch.no_grad()
def run_float(
    runner: PipelineRunner,
    prompts: Sequence[str],
    *,
    modules: Mapping[str, nn.Module] | None = None,
    record: int = 0,
    observers: Sequence[contextlib.AbstractContextManager] = (),
    desc: str = "calibration",
    progress: bool = True,
    **collector_kwargs: Any,
) -> CalibrationRun:
    """Run the float pipeline on every prompt under a tqdm bar over prompts x steps (one tick per denoiser call).

    ``modules`` get an :class:`~effalg.core.calibration.ActivationStatsCollector` (``collector_kwargs``, e.g.
    ``per_call=False``) over every denoiser call: all timesteps, and both CFG branches (batched by diffusers). The
    first ``record`` prompts' denoiser calls and final latents are kept for :func:`layer_sensitivity`. ``observers``
    (context managers installing hooks, e.g. an :class:`~effalg.core.calibration.RangeCollector`) are active
    during the whole run.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    out = CalibrationRun(runner=runner, prompts=prompts)
    recording = [False]

    def record_call(_m, args, kwargs):
        if recording[0]:
            out.calls.append((_clone(args), _clone(kwargs)))

    collector = ActivationStatsCollector(modules=dict(modules), **collector_kwargs) if modules else None
    bar = tqdm(total=len(prompts) * runner.steps, desc=desc, disable=not progress)

    def tick(*_):  # a forward hook: must return None (a value would replace the denoiser's output)
        bar.update(1)

    model = runner.model
    hooks = []
    try:
        hooks += [model.register_forward_pre_hook(record_call, with_kwargs=True), model.register_forward_hook(tick)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(quiet_progress(runner.pipe))
            if collector is not None:
                stack.enter_context(collector)
            for obs in observers:
                stack.enter_context(obs)
            for i, p in enumerate(prompts):
                recording[0] = i < record
                lat = runner.latents(p, i)
                if i < record:
                    out.latents.append(lat.detach().clone())
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    out.stats = collector.stats() if collector is not None else None
    return out


# ---- per-layer sensitivity ------------------------------------------------------------------------------------------
def relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``||ref - out||^2 / ||ref||^2`` in float64 (the squared error itself when ``ref`` is zero)."""
    ref, out = ref.double(), out.double()
    den = ref.pow(2).sum().item()
    num = (ref - out).pow(2).sum().item()
    return num / den if den > 0 else num


class LayerMetric:
    """How to score a layer's error (a float >= 0, lower is better; turn a score into an error, e.g. ``1 - SSIM``).

    :meth:`prepare` runs once on the float model with the group's layers (compute references); :meth:`error` runs
    with one layer quantized.
    """

    def prepare(self, run: CalibrationRun, layers: Sequence[str]) -> None:
        """Called once, before any layer is quantized."""

    def error(self, run: CalibrationRun, layer: str) -> float:
        raise NotImplementedError


class FinalLatentsMetric(LayerMetric):
    """Mean ``compare(float latents, latents)`` of the pipeline's final latents over the recorded prompts."""

    def __init__(self, compare: Callable[[torch.Tensor, torch.Tensor], float] = relative_error) -> None:
        self.compare = compare

    def error(self, run: CalibrationRun, layer: str) -> float:
        errs = [self.compare(ref, run.runner.latents(p, i)) for i, (p, ref) in enumerate(zip(run.prompts, run.latents))]
        return sum(errs) / len(errs)


class FinalImageMetric(LayerMetric):
    """Mean ``compare(float image, image)`` of the decoded images (``output_type="pt"``, ``[B, C, H, W]`` in
    [0, 1]) over the recorded prompts; e.g. ``lambda a, b: 1 - ssim(a, b)`` (MixDQ's content metric)."""

    def __init__(self, compare: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
        self.compare = compare
        self.reference: list[torch.Tensor] = []

    def prepare(self, run: CalibrationRun, layers: Sequence[str]) -> None:
        if not self.reference:
            self.reference = [run.runner.run(p, i, "pt").float() for i, p in enumerate(run.recorded_prompts)]

    def error(self, run: CalibrationRun, layer: str | None = None) -> float:
        errs = [self.compare(ref, run.runner.run(p, i, "pt").float()) for i, (p, ref) in
                enumerate(zip(run.recorded_prompts, self.reference))]  # fmt: skip
        return sum(errs) / len(errs)


class ModuleOutputMetric(LayerMetric):
    """Mean ``compare(float output, output)`` of module ``module_of(layer)`` (``""`` = the denoiser) over the
    replayed denoiser calls; ``compare`` may return None to skip a call."""

    def __init__(
        self,
        module_of: Callable[[str], str] = lambda layer: "",
        compare: Callable[[torch.Tensor, torch.Tensor], float | None] = relative_error,
    ) -> None:
        self.module_of, self.compare = module_of, compare
        self.reference: dict[str, list[torch.Tensor]] = {}

    def prepare(self, run: CalibrationRun, layers: Sequence[str]) -> None:
        if not run.calls:
            raise ValueError("ModuleOutputMetric: no recorded denoiser calls (run_float(..., record=0))")
        self.reference = run.runner.replay(run.calls, sorted({self.module_of(n) for n in layers}))

    def error(self, run: CalibrationRun, layer: str) -> float:
        w = self.module_of(layer)
        outs = run.runner.replay(run.calls, [w])[w]
        errs = [e for e in (self.compare(r, o) for r, o in zip(self.reference[w], outs)) if e is not None]
        return sum(errs) / max(1, len(errs))


@contextlib.contextmanager
def swap_layers(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Temporarily replace ``model``'s submodules ``{name: module}``; the originals are put back on exit."""
    originals = {name: model.get_submodule(name) for name in modules}
    try:
        for name, m in modules.items():
            model.set_submodule(name, m)
        yield
    finally:
        for name, m in originals.items():
            model.set_submodule(name, m)


@dataclass(frozen=True)
class MetricGroup:
    """Layers scored by one ``metric``, each at every setting in ``candidates`` (e.g. bit widths)."""

    metric: LayerMetric
    candidates: tuple[Hashable, ...]


def layer_sensitivity(
    run: CalibrationRun,
    layer_groups: Mapping[str, str],
    groups: Mapping[str, MetricGroup],
    build: Callable[[str, Hashable], nn.Module],
    *,
    desc: str = "sensitivity",
    progress: bool = True,
) -> dict[str, dict[Hashable, float]]:
    """``{layer: {candidate: error}}``: each layer of ``layer_groups`` (``{layer: group name}``) replaced alone by
    ``build(layer, candidate)`` for every candidate of its :class:`MetricGroup`, everything else float, scored by
    the group's metric. The float layer is put back after each measurement (also on error). Under an accelerate /
    torchrun launch the layers are split across the processes (:func:`effalg.core.distributed.sharded_map`)."""
    from effalg.core.distributed import sharded_map

    model = run.runner.model
    unknown = sorted({g for g in layer_groups.values() if g not in groups})
    if unknown:
        raise ValueError(f"layer_sensitivity: no MetricGroup for group(s) {unknown}")

    def measure(name: str) -> dict[Hashable, float]:
        group = groups[layer_groups[name]]
        out = {}
        for c in group.candidates:
            with swap_layers(model, {name: build(name, c)}):
                out[c] = group.metric.error(run, name)
        return out

    with torch.no_grad(), quiet_progress(run.runner.pipe):
        for g in sorted(set(layer_groups.values())):
            groups[g].metric.prepare(run, [n for n, gn in layer_groups.items() if gn == g])
        names = list(layer_groups)
        return dict(zip(names, sharded_map(measure, names, desc=desc, progress=progress, unit="layer")))


# ---- result ---------------------------------------------------------------------------------------------------------
def install_quantized(model: nn.Module, config, quantizer_cls: type, modules: Mapping[str, nn.Module]) -> None:
    """Swap in the quantized ``modules`` (``{name: module}``), prepack them, and make ``model`` look like one loaded
    with ``quantization_config=config`` (``quantizer_cls``), so that ``save_pretrained`` / reload work."""
    from .hub import install_save_hook

    for name, module in modules.items():
        model.set_submodule(name, module)
    prepack_model_(model)
    q = quantizer_cls(config, pre_quantized=False)
    q.converted = list(modules)
    q._converted_names = frozenset(modules)
    q.modules_to_not_convert = list(config.modules_to_not_convert)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.hf_quantizer = q
    model.register_to_config(quantization_config=config)
    install_save_hook(model, [])
