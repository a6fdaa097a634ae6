"""Shared helpers for effalg benchmarks: timing, byte counting, tables.

Speed is reported as ratios between variants measured in the same run, never as absolute targets.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable, Iterable

import torch


def median_ms(fn: Callable[[], object], *, warmup: int = 2, reps: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds, looking inside tensor subclasses (torchao, quanto) via ``__tensor_flatten__``."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(module: torch.nn.Module, prefix_filter: Callable[[str], bool] | None = None) -> int:
    """Bytes of parameters and buffers of ``module`` (optionally only those whose name passes ``prefix_filter``)."""
    total = 0
    seen: set[int] = set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        name = name.removeprefix("_orig_mod.")  # torch.compile'd modules
        if prefix_filter is not None and not prefix_filter(name):
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


def relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def format_table(headers: list[str], rows: Iterable[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    rows = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def machine_summary() -> str:
    import platform

    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"mkldnn={torch.backends.mkldnn.is_available()}"
    )


def report(title: str, table_text: str, result: object, json_path: str | None) -> None:
    """Print ``title`` and the table; write ``result`` as JSON to ``json_path`` if given."""
    print(f"\n{title}")
    print(table_text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
