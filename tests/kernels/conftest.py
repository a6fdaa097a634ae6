"""Every Triton launch a kernel test makes must be in the AOT manifest (``triton_launches.json``).

``tests/kernels/test_triton_aot.py`` compiles each manifest entry for sm_80 and sm_90, so this check is what makes
"the configurations the tests run compile on real GPUs" hold: a test that launches something new fails here until
the manifest is regenerated with ``bash scripts/dev.sh aot-manifest`` (which reruns tests/kernels and rewrites it).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

MANIFEST = Path(__file__).with_name("triton_launches.json")
UPDATE = os.environ.get("EFFALG_AOT_MANIFEST_UPDATE") == "1"

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_collected: list = []
_known: set[str] | None = None


def _manifest_keys() -> set[str]:
    global _known
    if _known is None:
        from effalg.kernels.triton.aot import load_manifest

        _known = {launch.key for launch in load_manifest(MANIFEST)} if MANIFEST.is_file() else set()
    return _known


@pytest.fixture(autouse=True)
def _launches_are_in_the_aot_manifest(request):
    # Only under the interpreter: on a real GPU every launch is compiled for real (and picks GPU configurations).
    if not _HAS_TRITON or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        yield
        return
    from effalg.kernels import triton as tk

    if not tk.HAS_TRITON:
        yield
        return
    from effalg.kernels.triton.launch import recording

    with recording() as launches:
        yield
    if UPDATE:
        _collected.extend(launches)
        return
    known = _manifest_keys()
    missing = {launch.key: launch for launch in launches if launch.key not in known}
    if missing:
        lines = "\n".join(f"  {launch.short_name}: {launch.describe()}" for launch in missing.values())
        pytest.fail(
            f"{request.node.nodeid} launched Triton configurations that are not in {MANIFEST.name}, so nothing "
            f"checks that they compile for sm_80/sm_90:\n{lines}\n"
            "Regenerate the manifest with `bash scripts/dev.sh aot-manifest`.",
            pytrace=False,
        )


def pytest_sessionfinish(session, exitstatus):
    if UPDATE and _collected:
        from effalg.kernels.triton.aot import write_manifest

        write_manifest(MANIFEST, _collected)
