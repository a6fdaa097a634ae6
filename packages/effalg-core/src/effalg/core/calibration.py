"""Hook-based activation statistics for calibration (bounded memory, no autograd, tqdm progress).

For each selected module the collector records, from the module's *input* (the tensor that will be quantized):

* ``absmax``: running per-input-channel ``max |x|`` over all tokens and calls, ``[C]`` fp32;
* ``per_call``: per-call per-channel abs-max, ``[n_entries, C]`` fp32 on CPU (what ViDiT-Q's channel balancing needs).
  At most ``max_calls`` entries are kept: when exceeded, adjacent entries are merged by max (so each entry then covers
  ``2, 4, ...`` consecutive calls; ``calls_per_entry`` says how many);
* ``tensor_min`` / ``tensor_max``: per-entry tensor-level min/max (for asymmetric per-tensor quantizers, e.g. MixDQ);
* optionally a histogram of ``|x|`` with ``histogram_bins`` bins over ``[0, histogram_range]`` (the range doubles,
  merging bins, when a larger value arrives).

Channels are the last dim for ``nn.Linear`` (and anything else), dim 1 for ``nn.Conv1d/2d/3d``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ActivationStatsCollector",
    "CalibrationStats",
    "LayerStats",
    "RangeCollector",
    "calibrate",
    "static_act_qparams",
]

logger = logging.getLogger(__name__)

_STATS_FORMAT = "effalg.calibration_stats"
_STATS_VERSION = 1

ModuleSelector = Any  # None | Iterable[str] | Callable[[str, nn.Module], bool] | type | tuple[type, ...] | Mapping


@dataclass
class LayerStats:
    """Statistics for one layer (all tensors fp32 on CPU, except ``calls_per_entry`` int64)."""

    absmax: torch.Tensor  # [C]
    per_call: torch.Tensor | None = None  # [n_entries, C]
    calls_per_entry: torch.Tensor | None = None  # [n_entries]
    tensor_min: torch.Tensor | None = None  # [n_entries]
    tensor_max: torch.Tensor | None = None  # [n_entries]
    histogram: torch.Tensor | None = None  # [bins]
    histogram_range: float = 0.0
    num_calls: int = 0


@dataclass
class CalibrationStats:
    """Per-layer :class:`LayerStats`, with safetensors save/load."""

    layers: dict[str, LayerStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerStats:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"CalibrationStats: no statistics for layer {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def absmax(self) -> dict[str, torch.Tensor]:
        """``{layer: [C] running abs-max}``."""
        return {n: s.absmax for n, s in self.layers.items()}

    @property
    def per_call(self) -> dict[str, torch.Tensor]:
        """``{layer: [n_entries, C] per-call abs-max}`` (layers collected with ``per_call=True``)."""
        return {n: s.per_call for n, s in self.layers.items() if s.per_call is not None}

    def save(self, path: str | os.PathLike) -> None:
        """Save to a ``.safetensors`` file (tensor keys ``"<layer>::<field>"``)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        meta_layers: dict[str, dict[str, Any]] = {}
        for name, s in self.layers.items():
            meta_layers[name] = {"num_calls": s.num_calls, "histogram_range": s.histogram_range}
            for key in ("absmax", "per_call", "calls_per_entry", "tensor_min", "tensor_max", "histogram"):
                t = getattr(s, key)
                if t is not None:
                    tensors[f"{name}::{key}"] = t.detach().cpu().contiguous()
        metadata = {"format": _STATS_FORMAT, "version": str(_STATS_VERSION), "layers": json.dumps(meta_layers)}
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Load a file written by :meth:`save`."""
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"CalibrationStats.load: cannot read {path!r}: {e}") from e
        if metadata.get("format") != _STATS_FORMAT:
            raise ValueError(f"CalibrationStats.load: {path!r} is not an effalg calibration-stats file")
        if int(metadata.get("version", 0)) > _STATS_VERSION:
            raise ValueError(
                f"CalibrationStats.load: {path!r} has version {metadata.get('version')}, newer than supported"
            )
        meta_layers = json.loads(metadata.get("layers", "{}"))
        out = cls()
        for name, info in meta_layers.items():
            key = f"{name}::absmax"
            if key not in tensors:
                raise ValueError(f"CalibrationStats.load: {path!r} is missing tensor {key!r}")
            out.layers[name] = LayerStats(
                absmax=tensors[key],
                per_call=tensors.get(f"{name}::per_call"),
                calls_per_entry=tensors.get(f"{name}::calls_per_entry"),
                tensor_min=tensors.get(f"{name}::tensor_min"),
                tensor_max=tensors.get(f"{name}::tensor_max"),
                histogram=tensors.get(f"{name}::histogram"),
                histogram_range=float(info.get("histogram_range", 0.0)),
                num_calls=int(info.get("num_calls", 0)),
            )
        return out


class _LayerRecorder:
    """Mutable per-layer state while collecting."""

    def __init__(self, channel_dim: int, per_call: bool, max_calls: int, bins: int, hist_range: float | None):
        self.channel_dim = channel_dim
        self.per_call = per_call
        self.max_calls = max_calls
        self.bins = bins
        self.hist_range = hist_range
        self.absmax: torch.Tensor | None = None  # on the activation's device
        self.entries: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.tmin: list[float] = []
        self.tmax: list[float] = []
        self.stride = 1
        self.hist: torch.Tensor | None = None  # fp64 on CPU
        self.num_calls = 0

    def record(self, x: torch.Tensor) -> None:
        cdim = self.channel_dim if x.dim() > 1 else -1
        xc = x.detach().movedim(cdim, -1)
        C = xc.shape[-1]
        if xc.numel() == 0:
            return
        amax = xc.abs().reshape(-1, C).amax(dim=0).float()
        if self.absmax is not None and self.absmax.shape[0] != C:
            raise ValueError(f"ActivationStatsCollector: channel count changed from {self.absmax.shape[0]} to {C}")
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.num_calls += 1
        if self.per_call:
            lo = float(x.detach().amin().float())
            hi = float(x.detach().amax().float())
            cpu = amax.cpu()
            if self.entries and self.counts[-1] < self.stride:
                self.entries[-1] = torch.maximum(self.entries[-1], cpu)
                self.counts[-1] += 1
                self.tmin[-1] = min(self.tmin[-1], lo)
                self.tmax[-1] = max(self.tmax[-1], hi)
            else:
                self.entries.append(cpu)
                self.counts.append(1)
                self.tmin.append(lo)
                self.tmax.append(hi)
            if len(self.entries) > self.max_calls:
                self._merge()
        if self.bins:
            self._histogram(xc)

    def _merge(self) -> None:
        e, c, lo, hi = self.entries, self.counts, self.tmin, self.tmax
        self.entries = [torch.maximum(e[i], e[i + 1]) if i + 1 < len(e) else e[i] for i in range(0, len(e), 2)]
        self.counts = [sum(c[i : i + 2]) for i in range(0, len(c), 2)]
        self.tmin = [min(lo[i : i + 2]) for i in range(0, len(lo), 2)]
        self.tmax = [max(hi[i : i + 2]) for i in range(0, len(hi), 2)]
        self.stride *= 2

    def _histogram(self, xc: torch.Tensor) -> None:
        a = xc.abs().float()
        top = float(a.max())
        if self.hist is None:
            self.hist_range = self.hist_range or (top if top > 0 else 1.0)
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        while top > self.hist_range:  # double the range, merging bin pairs (bins is even)
            merged = self.hist.view(-1, 2).sum(dim=1)
            self.hist = torch.cat([merged, torch.zeros_like(merged)])
            self.hist_range *= 2.0
        h = torch.histc(a.flatten(), bins=self.bins, min=0.0, max=self.hist_range)
        self.hist += h.to(device="cpu", dtype=torch.float64)

    def finalize(self) -> LayerStats:
        if self.absmax is None:
            raise RuntimeError("no calls recorded")
        s = LayerStats(absmax=self.absmax.detach().float().cpu(), num_calls=self.num_calls)
        if self.per_call:
            s.per_call = torch.stack(self.entries)
            s.calls_per_entry = torch.tensor(self.counts, dtype=torch.int64)
            s.tensor_min = torch.tensor(self.tmin, dtype=torch.float32)
            s.tensor_max = torch.tensor(self.tmax, dtype=torch.float32)
        if self.hist is not None:
            s.histogram = self.hist.float()
            s.histogram_range = float(self.hist_range)
        return s


def _select_modules(model: nn.Module | None, modules: ModuleSelector) -> dict[str, nn.Module]:
    if isinstance(modules, Mapping):
        out = dict(modules)
        bad = [n for n, m in out.items() if not isinstance(m, nn.Module)]
        if bad:
            raise TypeError(f"modules: values must be nn.Module, not for {bad}")
        return out
    if model is None:
        raise ValueError("modules: give a model, or modules as a mapping name -> nn.Module")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = dict(model.named_modules())
    if modules is None:
        return {n: m for n, m in named.items() if isinstance(m, nn.Linear)}
    if isinstance(modules, type) or (isinstance(modules, tuple) and all(isinstance(t, type) for t in modules)):
        return {n: m for n, m in named.items() if isinstance(m, modules)}
    if callable(modules):
        return {n: m for n, m in named.items() if modules(n, m)}
    if isinstance(modules, str):
        raise TypeError("modules: pass a list of module names, not a string")
    names = list(modules)
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"modules: name(s) not in the model {type(model).__name__}: {missing}")
    return {n: named[n] for n in names}


class ActivationStatsCollector:
    """Context manager recording input statistics of selected modules via forward pre-hooks.

    Args:
        model: the model whose modules are selected (may be None if ``modules`` is a mapping).
        modules: None (all ``nn.Linear``), a list of module names, a predicate ``(name, module) -> bool``,
            a module type (or tuple of types), or a mapping ``name -> module``.
        per_call: keep per-call statistics (``[n_entries, C]`` per layer); False keeps only the running max.
        max_calls: cap on the per-call entries per layer (memory: ``layers * max_calls * C * 4`` bytes).
        histogram_bins: if > 0 (even), also keep a histogram of ``|x|`` per layer.
        histogram_range: initial histogram range (default: the first call's max).

    Use ``with ActivationStatsCollector(model) as col: ...forward calls...`` then ``col.stats()``.
    Hooks are removed on exit even on error.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        modules: ModuleSelector = None,
        *,
        per_call: bool = True,
        max_calls: int = 64,
        histogram_bins: int = 0,
        histogram_range: float | None = None,
    ):
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
            raise ValueError(f"ActivationStatsCollector: max_calls must be an int >= 1, got {max_calls!r}")
        if (
            isinstance(histogram_bins, bool)
            or not isinstance(histogram_bins, int)
            or histogram_bins < 0
            or histogram_bins % 2
        ):
            raise ValueError(
                f"ActivationStatsCollector: histogram_bins must be an even int >= 0, got {histogram_bins!r}"
            )
        if histogram_range is not None and not histogram_range > 0:
            raise ValueError(f"ActivationStatsCollector: histogram_range must be > 0, got {histogram_range!r}")
        self.modules = _select_modules(model, modules)
        if not self.modules:
            raise ValueError("ActivationStatsCollector: no modules selected")
        self._recorders = {
            name: _LayerRecorder(
                1 if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1,
                per_call,
                max_calls,
                histogram_bins,
                histogram_range,
            )
            for name, m in self.modules.items()
        }
        self._handles: list[Any] = []

    def _make_hook(self, name: str):
        rec = self._recorders[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                with torch.no_grad():
                    rec.record(x)

        return hook

    def __enter__(self) -> ActivationStatsCollector:
        if self._handles:
            raise RuntimeError("ActivationStatsCollector is already active")
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stats(self) -> CalibrationStats:
        """Collected statistics; layers that were never called are omitted (a warning lists them)."""
        out = CalibrationStats()
        never = []
        for name, rec in self._recorders.items():
            if rec.num_calls == 0:
                never.append(name)
                continue
            out.layers[name] = rec.finalize()
        if never:
            logger.warning("calibration: %d selected module(s) never ran: %s", len(never), never[:10])
        return out


def calibrate(
    run_fn: Callable[[Any], Any],
    inputs: Iterable[Any],
    *,
    model: nn.Module | None = None,
    modules: ModuleSelector = None,
    desc: str = "calibrating",
    per_call: bool = True,
    max_calls: int = 64,
    histogram_bins: int = 0,
    histogram_range: float | None = None,
    disable_progress: bool | None = None,
) -> CalibrationStats:
    """Run ``run_fn(inp)`` for every ``inp`` in ``inputs`` under ``torch.no_grad()`` and an
    :class:`ActivationStatsCollector`, with a ``tqdm`` bar; return the :class:`CalibrationStats`.

    ``run_fn`` is the user's forward loop for one input (e.g. ``lambda p: pipe(p, num_inference_steps=4)``).
    ``model``/``modules`` select the layers as in :class:`ActivationStatsCollector`; ``modules`` may also be the model.
    """
    from tqdm.auto import tqdm

    if not callable(run_fn):
        raise TypeError(f"calibrate: run_fn must be callable, got {type(run_fn).__name__}")
    if model is None and isinstance(modules, nn.Module):
        model, modules = modules, None
    try:
        total = len(inputs)  # type: ignore[arg-type]
    except TypeError:
        total = None
    collector = ActivationStatsCollector(
        model,
        modules,
        per_call=per_call,
        max_calls=max_calls,
        histogram_bins=histogram_bins,
        histogram_range=histogram_range,
    )
    n = 0
    with torch.no_grad(), collector:
        for inp in tqdm(inputs, desc=desc, total=total, disable=disable_progress):
            run_fn(inp)
            n += 1
    if n == 0:
        raise ValueError("calibrate: inputs is empty")
    stats = collector.stats()
    if not stats.layers:
        raise ValueError("calibrate: none of the selected modules ran during calibration")
    return stats


# ---- static per-tensor activation ranges (MixDQ) ---------------------------------------------------------------------
def static_act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero)`` of static asymmetric int8 over ``[lo, hi]`` (widened to include 0):
    ``q = clamp(round(x / scale) + zero, -128, 127)``, so ``lo -> -128`` and ``hi -> 127``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"static_act_qparams: the range [{lo}, {hi}] is not finite")
    scale = (hi - lo) / 255.0
    if scale <= 0:
        return 1.0, 0
    zero = int(max(-128, min(127, -128 - round(lo / scale))))
    return scale, zero


class RangeCollector:
    """Context manager recording EMA min-max ranges of module inputs (static per-tensor activations, MixDQ).

    Calls are grouped in batches of ``calls_per_batch`` consecutive calls of a module (e.g. one prompt's denoising
    steps, so that a batch covers every timestep); per batch and channel range, ``r <- momentum * r + (1 - momentum)
    * (min, max)`` over the batch (the first batch sets ``r``; a last partial batch counts too).

    Args:
        modules: ``{name: module}``; the input's channel dim is 1 for ``nn.Conv*`` and the last dim otherwise.
        splits: ``{name: [c0, c1, ...]}`` channel range sizes per module (one range if absent). Read at every call,
            so a hook that runs earlier in the same forward may fill it.
        skip_tokens: ``{name: n}``: the first ``n`` tokens (dim -2 of a linear's input) are left out (BOS tokens).
        momentum: EMA momentum in [0, 1) (MixDQ: 0.95).
        calls_per_batch: calls of one module per EMA update (1: every call).

    ``ranges()`` gives ``{name: fp32 [n_ranges, 2]}`` (min, max) for the modules that ran.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        splits: Mapping[str, Iterable[int]] | None = None,
        skip_tokens: Mapping[str, int] | None = None,
        momentum: float = 0.95,
        calls_per_batch: int = 1,
    ) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"RangeCollector: momentum must be a float in [0, 1), got {momentum!r}")
        if isinstance(calls_per_batch, bool) or not isinstance(calls_per_batch, int) or calls_per_batch < 1:
            raise ValueError(f"RangeCollector: calls_per_batch must be an int >= 1, got {calls_per_batch!r}")
        self.modules = _select_modules(None, modules)
        self.splits = splits if splits is not None else {}
        self.skip_tokens = dict(skip_tokens or {})
        self.momentum = float(momentum)
        self.calls_per_batch = calls_per_batch
        self._ranges: dict[str, torch.Tensor] = {}
        self._batch: dict[str, tuple[torch.Tensor, int]] = {}  # running (min, max) of the open batch, its calls
        self._handles: list[Any] = []

    def _record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        n = self.skip_tokens.get(name, 0)
        if n and x.dim() >= 2:
            x = x[..., n:, :]
        cdim = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and x.dim() > 1 else x.dim() - 1
        sizes = list(self.splits.get(name) or [x.shape[cdim]])
        if sum(sizes) != x.shape[cdim]:
            raise ValueError(f"RangeCollector: {name}: channel ranges {sizes} do not cover {x.shape[cdim]} channels")
        if x.numel() == 0:
            return
        parts = x.detach().split(sizes, dim=cdim)
        new = torch.stack([torch.stack([p.amin(), p.amax()]) for p in parts]).float().cpu()
        open_ = self._batch.get(name)
        if open_ is not None and open_[0].shape == new.shape:
            new = torch.stack([torch.minimum(open_[0][:, 0], new[:, 0]), torch.maximum(open_[0][:, 1], new[:, 1])], 1)
            n = open_[1] + 1
        else:
            n = 1
        self._batch[name] = (new, n)
        if n >= self.calls_per_batch:
            self._close(name)

    def _close(self, name: str) -> None:
        new, _ = self._batch.pop(name)
        old = self._ranges.get(name)
        if old is None or old.shape != new.shape:
            self._ranges[name] = new
        else:
            self._ranges[name] = self.momentum * old + (1.0 - self.momentum) * new

    def __enter__(self) -> RangeCollector:
        if self._handles:
            raise RuntimeError("RangeCollector is already active")
        for name, m in self.modules.items():

            def hook(module, args, kwargs, _name=name):
                x = args[0] if args else next(iter(kwargs.values()), None)
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    with torch.no_grad():
                        self._record(_name, module, x)

            self._handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def ranges(self) -> dict[str, torch.Tensor]:
        """``{name: [n_ranges, 2]}`` EMA (min, max) per channel range (closing any partial batch)."""
        for name in list(self._batch):
            self._close(name)
        return {n: r.clone() for n, r in self._ranges.items()}
