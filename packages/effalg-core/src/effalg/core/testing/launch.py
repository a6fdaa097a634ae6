"""Run a script under ``torchrun`` (several CPU processes on this machine, gloo backend), for the tests of sharded
calibration (:mod:`effalg.core.distributed`)."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["torchrun"]


def torchrun(script: str | os.PathLike, *args: str, nproc: int = 2, timeout: float = 900) -> str:
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc script *args`` (each process with one
    thread); returns its output, raises ``RuntimeError`` with it on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        raise RuntimeError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr
