"""transformers version gate (the quantizer hooks used here are specific to transformers 5.23)."""

from __future__ import annotations

from packaging.version import Version

import transformers

MIN_VERSION, MAX_VERSION = "5.23", "5.24"


def check_transformers_version(version: str | None = None) -> None:
    """Raise ImportError unless ``MIN_VERSION <= transformers < MAX_VERSION``."""
    v = Version(version or transformers.__version__)
    if not (Version(MIN_VERSION) <= v < Version(MAX_VERSION)):
        raise ImportError(
            f"effalg.transformers requires transformers>={MIN_VERSION},<{MAX_VERSION}, found {v}; "
            f"install a matching version (pip install 'transformers>={MIN_VERSION},<{MAX_VERSION}')"
        )
