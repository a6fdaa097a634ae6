"""glibc ``malloc`` settings for effalg's CPU work: bounded memory while loading, and the opt-in fast heap.

glibc serves allocations above its *mmap threshold* with their own mapping (returned to the OS on ``free``) and
smaller ones from the heap (kept by the process once freed, unless the heap's top can be trimmed). The threshold is
dynamic: each freed mapping raises it to that size, up to 32 MiB, so after a few large frees the per-layer buffers of
a model load (a float weight, its upcast copy, the quantizer's temporaries: tens of MB each) land on the heap and stay
there, fragmented: measured up to 3.7 GB held after a full-size PixArt load (see ``benchmarks/real_size.py``).

* :func:`bounded_allocations` (a context) / :func:`begin_bounded_allocations` + :func:`end_bounded_allocations` (the
  quantizers' load hooks): inside, the threshold is fixed at 128 KiB, so every large transient buffer is a mapping
  freed back to the OS; on exit the threshold returns to what :func:`configure_allocator` last set (or to 32 MiB,
  glibc's dynamic ceiling) and ``gc.collect()`` + ``malloc_trim(0)`` return the free heap. effalg's quantizers call
  them around every load; nothing to opt into.
* :func:`configure_allocator` (opt-in, process-wide): a large threshold, so big op outputs are reused heap memory
  instead of fresh pages (faster inference, at the cost of a larger retained heap).

No-ops (returning False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

__all__ = [
    "configure_allocator",
    "bounded_allocations",
    "begin_bounded_allocations",
    "end_bounded_allocations",
    "release_memory",
    "account_transient",
]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The fixed mmap threshold while loading (glibc's initial default).
LOAD_MMAP_THRESHOLD = 128 << 10
#: glibc's ceiling for the dynamic threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): restored after a load
#: unless :func:`configure_allocator` set another value.
DYNAMIC_MMAP_THRESHOLD_MAX = 32 << 20

#: Inside a bounded section, the free heap is returned every this many bytes of transient buffers.
TRIM_EVERY_BYTES = 64 << 20

_lock = threading.Lock()
_depth = 0
_since_trim = 0
_configured: int | None = None
_libc_handle: ctypes.CDLL | None | bool = False


def _libc() -> ctypes.CDLL | None:
    global _libc_handle
    if _libc_handle is False:
        _libc_handle = None
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim"):
                _libc_handle = lib
        except OSError:
            pass
    return _libc_handle


def _set_threshold(mmap_threshold: int) -> bool:
    lib = _libc()
    if lib is None:
        return False
    return bool(lib.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        lib.mallopt(_M_TRIM_THRESHOLD, 2 * int(mmap_threshold))
    )


def configure_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Opt-in: keep large CPU allocations on glibc's heap instead of fresh ``mmap`` pages.

    Every op output of tens of MB otherwise costs a page fault per 4 KiB on first touch (measured here: an fp32
    [2048, 4608] GEMM output 16 ms instead of 5 ms). This changes process-wide ``malloc`` settings (``mallopt``), like
    the jemalloc/tcmalloc advice of other CPU inference stacks, so effalg never calls it by itself (loads restore it
    after their bounded section). Returns whether it applied (glibc only).
    """
    global _configured
    if isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, int) or mmap_threshold <= 0:
        raise ValueError(f"configure_allocator: mmap_threshold must be a positive int (bytes), got {mmap_threshold!r}")
    with _lock:
        _configured = mmap_threshold
        if _depth:  # inside a load: applied when it ends
            return _libc() is not None
        return _set_threshold(mmap_threshold)


def release_memory() -> bool:
    """``gc.collect()`` and return the free heap to the OS (``malloc_trim(0)``); False where not glibc."""
    gc.collect()
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


def account_transient(nbytes: int) -> None:
    """Inside a bounded section: note ``nbytes`` of transient buffers (e.g. one float weight quantized while loading);
    every :data:`TRIM_EVERY_BYTES` the free heap is returned (``malloc_trim(0)``). Small temporaries still land on
    the heap below the mmap threshold, and which of them stay stranded between live chunks varies from run to run
    (measured: +15 or +245 MiB on the same PixArt load); trimming as the load goes makes it +9 to +21 MiB."""
    global _since_trim
    if not _depth:
        return
    with _lock:
        _since_trim += int(nbytes)
        if _since_trim < TRIM_EVERY_BYTES:
            return
        _since_trim = 0
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def begin_bounded_allocations() -> bool:
    """Enter a bounded section (nestable): large allocations become mappings returned to the OS when freed."""
    global _depth
    with _lock:
        _depth += 1
        return _depth > 1 or _set_threshold(LOAD_MMAP_THRESHOLD)


def end_bounded_allocations() -> bool:
    """Leave a bounded section; at the outermost one, restore the threshold and release the free heap."""
    global _depth
    with _lock:
        if _depth == 0:
            return False
        _depth -= 1
        if _depth:
            return True
        _set_threshold(_configured if _configured is not None else DYNAMIC_MMAP_THRESHOLD_MAX)
    return release_memory()


@contextmanager
def bounded_allocations() -> Iterator[None]:
    """Context: the block's large transient buffers do not stay in the process after it (see the module doc)."""
    begin_bounded_allocations()
    try:
        yield
    finally:
        end_bounded_allocations()
