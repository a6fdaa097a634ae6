"""effalg.kernels.allocator: the bounded section around loads, nesting, and what it restores."""

import pytest

from effalg.kernels import allocator as A


@pytest.fixture
def calls(monkeypatch):
    log = []
    monkeypatch.setattr(A, "_set_threshold", lambda t: log.append(("threshold", t)) or True)
    monkeypatch.setattr(A, "release_memory", lambda: log.append(("release",)) or True)
    monkeypatch.setattr(A, "_depth", 0)
    monkeypatch.setattr(A, "_configured", None)
    return log


def test_bounded_section_fixes_then_restores_the_threshold_and_releases(calls):
    with A.bounded_allocations():
        with A.bounded_allocations():  # nested: one section
            pass
        assert calls == [("threshold", A.LOAD_MMAP_THRESHOLD)]
    assert calls == [("threshold", A.LOAD_MMAP_THRESHOLD), ("threshold", A.DYNAMIC_MMAP_THRESHOLD_MAX), ("release",)]
    assert A.end_bounded_allocations() is False  # unbalanced end: nothing happens
    assert len(calls) == 3


def test_configure_allocator_is_what_a_load_restores(calls):
    assert A.configure_allocator(1 << 28)
    A.begin_bounded_allocations()
    assert A.configure_allocator(1 << 29)  # inside a load: applied when it ends
    A.end_bounded_allocations()
    assert calls == [("threshold", 1 << 28), ("threshold", A.LOAD_MMAP_THRESHOLD), ("threshold", 1 << 29), ("release",)]
    with pytest.raises(ValueError, match="mmap_threshold must be a positive int"):
        A.configure_allocator(0)


def test_release_memory_runs_on_this_machine():
    assert A.release_memory() is (A._libc() is not None)


def test_transient_bytes_trim_the_heap_inside_a_bounded_section(calls, monkeypatch):
    trims = []
    monkeypatch.setattr(A, "_libc", lambda: type("L", (), {"malloc_trim": staticmethod(lambda pad: trims.append(pad))}))
    monkeypatch.setattr(A, "_since_trim", 0)
    A.account_transient(A.TRIM_EVERY_BYTES)  # outside a section: nothing
    assert trims == []
    with A.bounded_allocations():
        A.account_transient(A.TRIM_EVERY_BYTES // 2)
        assert trims == []
        A.account_transient(A.TRIM_EVERY_BYTES // 2)
        assert trims == [0]
