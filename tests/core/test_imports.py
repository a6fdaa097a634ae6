"""effalg.core and effalg.kernels never import diffusers or transformers (docs/ARCHITECTURE.md): the framework
integrations, and the reference-model loaders and tokenizers, live in effalg.diffusers / effalg.transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORK_FREE = [ROOT / "packages" / "effalg-core", ROOT / "packages" / "effalg-kernels"]

# ``import diffusers``, ``from transformers.x import y``, ``import_module("diffusers")``, ``__import__("transformers")``
_FRAMEWORK_IMPORT = re.compile(
    r"\b(?:import|from)\s+(?:diffusers|transformers)\b"
    r"|\b(?:import_module|__import__)\(\s*['\"](?:diffusers|transformers)\b"
)

_IMPORT_EVERYTHING = """
import importlib, pkgutil, sys

import effalg.core, effalg.core.eval, effalg.kernels

names = []
for pkg in (effalg.core, effalg.kernels):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name.startswith("effalg.kernels.triton"):
            continue  # needs triton; imported below where it is installed
        importlib.import_module(info.name)
        names.append(info.name)
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    import effalg.kernels.triton
    names.append("effalg.kernels.triton")
assert "effalg.core.eval.lm_tasks" in names and "effalg.core.eval.reference" in names, names
leaked = sorted(m for m in ("diffusers", "transformers") if m in sys.modules)
assert not leaked, f"importing effalg.core / effalg.kernels pulled in {leaked}"
print(len(names))
"""


def test_core_and_kernels_import_without_frameworks():
    """In a fresh interpreter: effalg.core, effalg.core.eval with all its submodules, every other effalg.core and
    effalg.kernels module; neither diffusers nor transformers ends up in ``sys.modules``."""
    r = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert int(r.stdout.split()[-1]) > 10


@pytest.mark.parametrize("package", FRAMEWORK_FREE, ids=lambda p: p.name)
def test_no_framework_import_in_sources(package):
    files = sorted(package.rglob("*.py"))
    assert files, f"no sources under {package}"
    hits = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if _FRAMEWORK_IMPORT.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "diffusers/transformers imported in a framework-free package:\n" + "\n".join(hits)


def test_moved_loaders_say_where_they_went():
    import effalg.core.eval as ev

    with pytest.raises(AttributeError, match=r"effalg\.transformers\.reference_models import load_reference_lm"):
        ev.load_reference_lm  # noqa: B018
    with pytest.raises(AttributeError, match=r"effalg\.diffusers\.reference_models import load_reference_t2i"):
        ev.load_reference_t2i  # noqa: B018
