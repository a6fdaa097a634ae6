"""Sharded sweeps on accelerate: the expensive per-item loops of calibration and search (per-layer sensitivity, MoA
profiling, DiTFastAttn candidates) split across the processes of a launch.

:func:`sharded_map` is ``[fn(x) for x in items]``. Launched with ``accelerate launch`` or ``torchrun`` (several CPU
processes with the gloo backend, several GPUs with nccl, several machines), each process takes a contiguous share of
the items (``PartialState.split_between_processes``), runs it under its own tqdm bar, and the results are gathered
on every process (``gather_object``) in item order, so every process continues with the same full result, the one a
single process computes. Without a launch it is the plain loop. Items must be independent of each other.

    accelerate launch --num_processes 2 --cpu my_calibration.py        # or: torchrun --nproc_per_node 2 ...
    accelerate launch --num_processes 8 my_calibration.py              # 8 GPUs; --num_machines / --machine_rank ...

Each process then needs its own copy of the model (on its own GPU, or in RAM on CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["sharded_map", "process_count", "is_main_process", "from_main_process"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _launched() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # several CPU processes: gloo


def process_count() -> int:
    """Number of processes of the current launch (1 without one)."""
    return _state().num_processes if _launched() else 1


def is_main_process() -> bool:
    """Whether this is the launch's main process (True without a launch): the one that saves and logs."""
    return _state().is_main_process if _launched() else True


def from_main_process(obj: Any) -> Any:
    """The main process's ``obj`` on every process of a launch (``obj`` itself without one): for decisions that must
    agree across processes, such as measured latencies or a time limit."""
    if not _launched():
        return obj
    from accelerate.utils import broadcast_object_list

    _state()
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def sharded_map(
    fn: Callable[[T], R], items: Sequence[T], *, desc: str = "", progress: bool = True, unit: str = "it"
) -> list[R]:
    """``[fn(x) for x in items]``, split across the processes of an accelerate / torch.distributed launch and
    gathered in item order on every process (see the module doc); a tqdm bar per process over its share."""
    items = list(items)
    if not _launched():
        return [fn(x) for x in tqdm(items, desc=desc, disable=not progress, unit=unit)]
    from accelerate.utils import gather_object

    state = _state()
    with state.split_between_processes(list(range(len(items)))) as mine:
        logger.info("%s: process %d/%d takes %d of %d items (%s)", desc or "sharded_map", state.process_index + 1,
                    state.num_processes, len(mine), len(items), f"{mine[0]}-{mine[-1]}" if mine else "none")  # fmt: skip
        label = f"{desc} [process {state.process_index + 1}/{state.num_processes}]"
        local: list[tuple[int, Any]] = [(i, fn(items[i])) for i in tqdm(mine, desc=label, disable=not progress,
                                                                          unit=unit)]  # fmt: skip
    gathered = gather_object(local)
    out: list[Any] = [None] * len(items)
    seen = 0
    for i, r in gathered:
        out[i] = r
        seen += 1
    if seen != len(items):
        raise RuntimeError(f"sharded_map: gathered {seen} results for {len(items)} items ({desc})")
    return out
