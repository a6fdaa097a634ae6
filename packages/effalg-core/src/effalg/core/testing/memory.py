"""Anonymous-memory measurement of a piece of code in a fresh subprocess (``RssAnon``: the file-backed safetensors
mmap does not count).

:func:`measure_in_subprocess` runs ``setup`` (imports), records the child's ``RssAnon`` as the baseline, runs
``code`` (which must leave the object to size in a variable named ``model``), and reports the baseline, the peak
(sampled by the parent from ``/proc/<pid>/status`` every ``interval`` seconds while the child runs ``code``), the
memory after ``code`` (after ``gc.collect()``) and the bytes of ``model``'s parameters and buffers. Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any

from effalg.core.memory import rss_anon

__all__ = ["rss_anon", "model_bytes", "measure_in_subprocess"]

MiB = 1 << 20

_CHILD = """
import gc, json, sys
from effalg.core.testing.memory import rss_anon, model_bytes
{setup}
gc.collect()
base = rss_anon()
print("EFFALG_MEM_START", flush=True)
sys.stdin.readline()
{code}
print("EFFALG_MEM_END", flush=True)
sys.stdin.readline()
gc.collect()
rec = {{"baseline": base, "after": rss_anon(), "model_bytes": model_bytes(model)}}
extra = {{}}
{after}
print("EFFALG_MEM " + json.dumps({{**rec, "extra": extra}}), flush=True)
"""


def model_bytes(model: Any) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def measure_in_subprocess(
    code: str,
    setup: str = "",
    after: str = "",
    env: dict[str, str] | None = None,
    interval: float = 0.005,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Run ``setup`` then ``code`` in a fresh Python; returns MiB figures: ``baseline`` (after ``setup``), ``peak``
    and ``after`` (above the baseline), ``model`` (``model``'s bytes), ``peak_over_model`` / ``after_over_model``
    (above baseline + model), ``seconds`` (the wall time of ``code``), and ``extra``: the JSON-able dict ``after``
    (code run once the memory is recorded, e.g. a timed forward) may fill."""
    src = _CHILD.format(setup=textwrap.dedent(setup), code=textwrap.dedent(code), after=textwrap.dedent(after))
    child_env = {**os.environ, **(env or {})}
    errfile = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill up and block the child
    proc = subprocess.Popen(
        [sys.executable, "-c", src],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errfile,
        text=True,
        env=child_env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout

    def wait_for(marker: str, sample: bool) -> int:
        peak = 0
        while not any(ln.startswith(marker) for ln in lines):
            if proc.poll() is not None and not any(ln.startswith(marker) for ln in lines):
                reader.join(1.0)
                if any(ln.startswith(marker) for ln in lines):
                    break
                errfile.seek(0)
                raise RuntimeError(f"measure_in_subprocess: the child failed:\n{errfile.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"measure_in_subprocess: no result after {timeout} s")
            if sample:
                try:
                    peak = max(peak, rss_anon(proc.pid))
                except (FileNotFoundError, ProcessLookupError, RuntimeError):
                    pass
            time.sleep(interval)
        return peak

    try:
        wait_for("EFFALG_MEM_START", sample=False)
        start = time.monotonic()
        proc.stdin.write("\n")
        proc.stdin.flush()
        peak = wait_for("EFFALG_MEM_END", sample=True)
        seconds = time.monotonic() - start
        proc.stdin.write("\n")
        proc.stdin.flush()
        wait_for("EFFALG_MEM ", sample=False)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errfile.close()
    rec = next(ln for ln in lines if ln.startswith("EFFALG_MEM "))
    r = json.loads(rec[len("EFFALG_MEM ") :])
    base, model = r["baseline"], r["model_bytes"]
    return {
        "baseline": base / MiB,
        "peak": (peak - base) / MiB,
        "after": (r["after"] - base) / MiB,
        "model": model / MiB,
        "peak_over_model": (peak - base - model) / MiB,
        "after_over_model": (r["after"] - base - model) / MiB,
        "seconds": seconds,
        "extra": r["extra"],
    }
