"""Versioned JSON plan artifacts (``{"format": "effalg.plan", "kind": ..., "version": ..., "model": ..., "entries": ...}``).

A plan is what a search produces and an integration consumes (e.g. MixDQ's per-layer bit widths, DiTFastAttn's
per-layer attention strategy). New kinds subclass :class:`Plan`, set ``kind``/``version`` and override
:meth:`Plan.validate_entry`, and register with :func:`register_plan_kind`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "PLAN_FORMAT",
    "Plan",
    "BitPlan",
    "PlanError",
    "register_plan_kind",
    "get_plan_class",
    "load_plan",
]

PLAN_FORMAT = "effalg.plan"
_TOP_KEYS = ("format", "kind", "version", "model", "entries", "metadata")
_PLAN_KINDS: dict[str, type[Plan]] = {}


class PlanError(ValueError):
    """A plan is malformed, of the wrong kind/version, or does not match a model."""


def register_plan_kind(cls: type[Plan]) -> type[Plan]:
    """Class decorator registering a :class:`Plan` subclass under its ``kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"register_plan_kind: {cls.__name__}.kind must be a non-empty string")
    if kind in _PLAN_KINDS and _PLAN_KINDS[kind] is not cls:
        raise ValueError(f"register_plan_kind: kind {kind!r} already registered by {_PLAN_KINDS[kind].__name__}")
    _PLAN_KINDS[kind] = cls
    return cls


_BUILTIN_KIND_MODULES = {"moa": "effalg.core.attention_plan", "ditfastattn": "effalg.core.ditfastattn_plan"}  # kinds defined outside this module, imported on demand


def get_plan_class(kind: str) -> type[Plan]:
    """The registered class for ``kind``."""
    if kind not in _PLAN_KINDS and kind in _BUILTIN_KIND_MODULES:
        import importlib

        importlib.import_module(_BUILTIN_KIND_MODULES[kind])
    try:
        return _PLAN_KINDS[kind]
    except KeyError:
        raise PlanError(f"unknown plan kind {kind!r}; registered kinds: {sorted(_PLAN_KINDS)}") from None


@dataclass
class Plan:
    """Base plan: ``entries`` maps a module name (as in ``model.named_modules()``) to a JSON-serializable entry.

    ``model`` is free-form metadata about the model the plan was made for (e.g. ``{"name_or_path": ..., "class": ...}``);
    ``metadata`` is free-form provenance (search settings, metrics). Both must be JSON-serializable dicts.
    """

    kind: ClassVar[str] = "plan"
    version: ClassVar[int] = 1

    entries: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------------------------
    def validate_entry(self, name: str, entry: Any) -> Any:
        """Validate (and optionally normalize) one entry; raise :class:`PlanError` naming ``name``."""
        return entry

    def validate(self) -> None:
        """Validate the whole plan in place."""
        cls = type(self).__name__
        if not isinstance(self.entries, Mapping):
            raise PlanError(f"{cls}: entries must be a dict, got {type(self.entries).__name__}")
        for key in ("model", "metadata"):
            if not isinstance(getattr(self, key), Mapping):
                raise PlanError(f"{cls}: {key} must be a dict, got {type(getattr(self, key)).__name__}")
        normalized = {}
        for name, entry in self.entries.items():
            if not isinstance(name, str):
                raise PlanError(f"{cls}: entry names must be strings, got {name!r}")
            normalized[name] = self.validate_entry(name, entry)
        self.entries = normalized

    def validate_against(self, model: Any) -> None:
        """Raise :class:`PlanError` listing the entry names that are not modules of ``model`` (an ``nn.Module``)."""
        names = {n for n, _ in model.named_modules()}
        missing = [n for n in self.entries if n not in names]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:20])
            more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
            raise PlanError(
                f"{type(self).__name__}: {len(missing)} layer(s) in the plan are not in the model "
                f"{type(model).__name__}: {shown}{more}"
            )

    # ---- serialization ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``format``, ``kind``, ``version``, ``model``, ``entries``, ``metadata``."""
        return {
            "format": PLAN_FORMAT,
            "kind": self.kind,
            "version": self.version,
            "model": dict(self.model),
            "entries": {k: self._entry_to_json(v) for k, v in self.entries.items()},
            "metadata": dict(self.metadata),
        }

    def _entry_to_json(self, entry: Any) -> Any:
        return entry

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Plan:
        """Build a plan from :meth:`to_dict` output. Called on :class:`Plan` it dispatches on ``kind``."""
        where = f" ({source})" if source else ""
        if not isinstance(data, Mapping):
            raise PlanError(f"plan{where}: expected a JSON object, got {type(data).__name__}")
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise PlanError(f"plan{where}: unknown top-level key(s) {unknown}; allowed: {list(_TOP_KEYS)}")
        for key in ("format", "kind", "version", "entries"):
            if key not in data:
                raise PlanError(f"plan{where}: missing required key {key!r}")
        if data["format"] != PLAN_FORMAT:
            raise PlanError(f"plan{where}: 'format' must be {PLAN_FORMAT!r}, got {data['format']!r}")
        kind = data["kind"]
        target = get_plan_class(kind) if cls is Plan else cls
        if kind != target.kind:
            raise PlanError(f"plan{where}: expected kind {target.kind!r}, got {kind!r}")
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PlanError(f"plan{where}: 'version' must be a positive int, got {version!r}")
        if version > target.version:
            raise PlanError(
                f"plan{where}: {kind!r} version {version} is newer than supported ({target.version}); upgrade effalg"
            )
        entries = target._upgrade_entries(data["entries"], version)
        try:
            return target(entries=entries, model=data.get("model") or {}, metadata=data.get("metadata") or {})
        except PlanError as e:
            if source:
                raise PlanError(f"{e} [{source}]") from None
            raise

    @classmethod
    def _upgrade_entries(cls, entries: Any, version: int) -> Any:
        """Hook: convert entries of an older ``version`` to the current one."""
        return entries

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as pretty-printed JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan; a corrupt or invalid file raises :class:`PlanError` naming the file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {path!r} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise PlanError(f"plan file {path!r} is not valid UTF-8 text: {e}") from None
        return cls.from_dict(data, source=path)


def load_plan(path: str | os.PathLike) -> Plan:
    """Load any registered plan kind from ``path``."""
    return Plan.load(path)


_BITPLAN_KEYS = ("weight_bits", "act_bits")
_ALLOWED_PLAN_BITS = (2, 3, 4, 8)


@register_plan_kind
@dataclass
class BitPlan(Plan):
    """Per-layer bit widths: ``{layer: {"weight_bits": int | None, "act_bits": int | None}}`` (None = keep float).

    Allowed bit widths are {2, 3, 4, 8}. Missing keys default to None.
    """

    kind: ClassVar[str] = "bit_plan"
    version: ClassVar[int] = 1

    def validate_entry(self, name: str, entry: Any) -> dict[str, int | None]:
        if not isinstance(entry, Mapping):
            raise PlanError(f"BitPlan: entry for layer {name!r} must be a dict, got {type(entry).__name__}")
        unknown = [k for k in entry if k not in _BITPLAN_KEYS]
        if unknown:
            raise PlanError(f"BitPlan: layer {name!r} has unknown key(s) {unknown}; allowed: {list(_BITPLAN_KEYS)}")
        out = {}
        for key in _BITPLAN_KEYS:
            val = entry.get(key)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val not in _ALLOWED_PLAN_BITS):
                raise PlanError(
                    f"BitPlan: layer {name!r} has invalid {key}={val!r}; allowed: {list(_ALLOWED_PLAN_BITS)} or null"
                )
            out[key] = val
        return out

    @classmethod
    def from_bits(
        cls,
        weight_bits: Mapping[str, int | None] | None = None,
        act_bits: Mapping[str, int | None] | None = None,
        *,
        model: dict | None = None,
        metadata: dict | None = None,
    ) -> BitPlan:
        """Build from separate ``{layer: bits}`` maps (e.g. two :class:`~effalg.core.allocation.Allocation` ``.bits``)."""
        weight_bits = dict(weight_bits or {})
        act_bits = dict(act_bits or {})
        names = list(weight_bits) + [n for n in act_bits if n not in weight_bits]
        entries = {n: {"weight_bits": weight_bits.get(n), "act_bits": act_bits.get(n)} for n in names}
        return cls(entries=entries, model=dict(model or {}), metadata=dict(metadata or {}))

    def weight_bits(self) -> dict[str, int | None]:
        """``{layer: weight_bits}``."""
        return {n: e["weight_bits"] for n, e in self.entries.items()}

    def act_bits(self) -> dict[str, int | None]:
        """``{layer: act_bits}``."""
        return {n: e["act_bits"] for n, e in self.entries.items()}

    def layers(self) -> Iterable[str]:
        return self.entries.keys()
