"""One entry point for every Triton launch: it runs the kernel and can record what was launched.

Every launcher in this package calls :func:`launch` instead of ``kernel[grid](...)``. A launch is described by a
:class:`Launch`: the kernel, the Triton type of each runtime argument, the constexpr values and ``num_warps`` /
``num_stages``, which is exactly what ahead-of-time compilation needs (:mod:`effalg.kernels.triton.aot`).

* :func:`recording` collects the launches made inside it (the kernel tests check theirs against the AOT manifest).
* :func:`dry_run` records without running anything and makes launchers choose their GPU configuration
  (:func:`on_gpu` is true), so the production configurations can be enumerated from ``meta`` tensors, with no GPU.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl

__all__ = ["Launch", "launch", "recording", "dry_run", "on_gpu", "kernel_id"]

_TORCH_TO_TRITON = {
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
_TL_DTYPES = {str(d): d for d in (tl.int8, tl.uint8, tl.int32, tl.int64, tl.float16, tl.bfloat16, tl.float32)}

_recorders: list[list[Launch]] = []
_dry_run_depth = 0


@dataclass(frozen=True)
class Launch:
    """What a kernel was launched with, minus the data: enough to compile it for any target.

    ``signature`` pairs each runtime argument with its Triton type (``"*i8"``, ``"i32"``, ...) and a divisibility
    hint (16 when the pointer is 16-byte aligned, as Triton's JIT specializes it, else 1; integers are compiled
    unspecialized, so one entry covers every size and stride).
    ``constexprs`` holds JSON-friendly values: ints, bools, strings, and ``"tl.<dtype>"`` for Triton dtypes.
    """

    kernel: str  # "effalg.kernels.triton.int8_mm:_int8_mm_kernel"
    signature: tuple[tuple[str, str, int], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    def to_json(self) -> dict:
        return {
            "kernel": self.kernel,
            "signature": [list(s) for s in self.signature],
            "constexprs": [list(c) for c in self.constexprs],
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }

    @classmethod
    def from_json(cls, d: dict) -> Launch:
        return cls(
            kernel=d["kernel"],
            signature=tuple(tuple(s) for s in d["signature"]),
            constexprs=tuple(tuple(c) for c in d["constexprs"]),
            num_warps=int(d["num_warps"]),
            num_stages=int(d["num_stages"]),
        )

    @property
    def key(self) -> str:
        """A stable string identifying the launch (for manifests and test ids)."""
        return json.dumps(self.to_json(), sort_keys=True)

    @property
    def short_name(self) -> str:
        return self.kernel.rsplit(":", 1)[-1]

    def constexpr(self, name: str, default: Any = None) -> Any:
        return dict(self.constexprs).get(name, default)

    def describe(self) -> str:
        """``BLOCK_M=64 BLOCK_N=128 ... w4 s3``: the constexprs and launch options in one line."""
        parts = [f"{k}={v.removeprefix('tl.') if isinstance(v, str) else v}" for k, v in self.constexprs]
        dtypes = sorted({t.removeprefix("*") for _, t, _ in self.signature if t.startswith("*")})
        return " ".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}", "ptrs:" + "/".join(dtypes)])


def kernel_id(kernel) -> str:
    """``module:name`` of a ``@triton.jit`` function (interpreted or compiled)."""
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__name__}"


def _constexpr_names(kernel) -> set[str]:
    fn = getattr(kernel, "fn", kernel)
    names = set()
    for p in inspect.signature(fn).parameters.values():
        ann = p.annotation
        if ann is tl.constexpr or (isinstance(ann, str) and ann.split(".")[-1] == "constexpr"):
            names.add(p.name)
    return names


def _arg_type(name: str, value: Any) -> tuple[str, int]:
    if isinstance(value, torch.Tensor):
        try:
            ty = "*" + _TORCH_TO_TRITON[value.dtype]
        except KeyError:
            raise TypeError(f"triton launch: argument {name!r} has unsupported dtype {value.dtype}") from None
        ptr = 0 if value.device.type == "meta" else value.data_ptr()
        return ty, 16 if ptr % 16 == 0 else 1
    if isinstance(value, bool):
        return "i1", 1
    if isinstance(value, int):
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), 1  # sizes/strides: compiled unspecialized
    if isinstance(value, float):
        return "fp32", 1
    raise TypeError(f"triton launch: argument {name!r} has unsupported type {type(value).__name__}")


def _constexpr_value(value: Any) -> Any:
    if isinstance(value, tl.dtype):
        return f"tl.{value}"
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value
    raise TypeError(f"triton launch: unsupported constexpr value {value!r}")


def constexpr_to_triton(value: Any) -> Any:
    """Inverse of the JSON form: ``"tl.bf16"`` -> ``tl.bfloat16``; other values unchanged."""
    if isinstance(value, str) and value.startswith("tl."):
        return _TL_DTYPES[value[3:]]
    return value


def describe(kernel, args: tuple, kwargs: dict, num_warps: int, num_stages: int) -> Launch:
    """The :class:`Launch` of ``kernel[grid](*args, **kwargs)``."""
    fn = getattr(kernel, "fn", kernel)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    cnames = _constexpr_names(kernel)
    signature, constexprs = [], []
    for name, value in bound.arguments.items():
        if name in cnames:
            constexprs.append((name, _constexpr_value(value)))
        else:
            ty, div = _arg_type(name, value)
            signature.append((name, ty, div))
    return Launch(kernel_id(kernel), tuple(signature), tuple(constexprs), int(num_warps), int(num_stages))


def launch(kernel, grid, *args, num_warps: int = 4, num_stages: int = 3, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs, num_warps=..., num_stages=...)``, recorded when a recorder is active.

    Under :func:`dry_run` nothing is executed.
    """
    if _recorders:
        rec = describe(kernel, args, kwargs, num_warps, num_stages)
        for sink in _recorders:
            sink.append(rec)
    if _dry_run_depth:
        return
    kernel[grid](*args, **kwargs, num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collect every :class:`Launch` made inside the block (in order, with repeats)."""
    sink: list[Launch] = []
    _recorders.append(sink)
    try:
        yield sink
    finally:
        _recorders.remove(sink)


@contextlib.contextmanager
def dry_run() -> Iterator[list[Launch]]:
    """Record launches without running them, choosing GPU configurations (use ``meta`` tensors)."""
    global _dry_run_depth
    _dry_run_depth += 1
    try:
        with recording() as sink:
            yield sink
    finally:
        _dry_run_depth -= 1


def on_gpu(x: torch.Tensor) -> bool:
    """True when a launch on ``x`` targets a real GPU: a CUDA tensor, or any tensor under :func:`dry_run`."""
    return x.is_cuda or _dry_run_depth > 0
