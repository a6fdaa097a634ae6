"""MoA elastic sliding-window attention plans (plan kind ``"moa"``).

A plan gives every KV head of every decoder layer an elastic rule ``window = clamp(ceil(alpha + beta * N), 1, N)``
(``N`` = the input length the cache is sized for) and a number of global "sink" tokens. Windows are per **KV**
head: under grouped-query attention all query heads of a group share their KV head's rule, so that a KV head is
stored once, with only its sink + window tokens.

Mask semantics (the single source of truth for kernels, cache and tests): in a row with ``pad`` left-padding
tokens, query ``i >= pad`` sees key ``j`` iff ``pad <= j <= i`` and (``i - j < window`` or ``j - pad < sink``).

**Density** (``density(N)``) is the fraction of the KV cache kept: the mean over layers and KV heads of
``min(N, sink + window) / N``, what decode time and KV memory scale with. A head with ``sink + window >= N`` sees
every key at length ``N`` and is cached with ``N`` slots; its cache rule is ``sink' = min(sink, N - 1)``,
``window' = min(window, N - sink')`` (:meth:`ElasticWindowPlan.cache_rules`), which gives the same mask for every
query ``i < N`` and differs only when decoding past ``N``. The kept fraction of the causal ``N x N`` score matrix
(the prefill's work) is :meth:`ElasticWindowPlan.score_density`.

Entries: ``{"0": [{"alpha": float, "beta": float, "sink": int}, ...one per KV head], "1": [...], ...}``, keyed by
decoder-layer index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .plans import Plan, PlanError, register_plan_kind

__all__ = ["ElasticWindowPlan"]

_RULE_KEYS = ("alpha", "beta", "sink")


def _check_length(n: Any, what: str = "N") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ElasticWindowPlan: {what} must be a positive int, got {n!r}")
    return n


@register_plan_kind
@dataclass
class ElasticWindowPlan(Plan):
    """Per-layer, per-KV-head elastic window rules ``{"alpha", "beta", "sink"}`` (see the module docstring)."""

    kind: ClassVar[str] = "moa"
    version: ClassVar[int] = 1

    # ---- validation -------------------------------------------------------------------------------------------
    def validate_entry(self, name: str, entry: Any) -> list[dict[str, Any]]:
        if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)) or len(entry) == 0:
            raise PlanError(
                f"ElasticWindowPlan: layer {name}: expected a non-empty list of per-KV-head rules, got {entry!r}"
            )
        out = []
        for h, rule in enumerate(entry):
            where = f"ElasticWindowPlan: layer {name}, KV head {h}"
            if not isinstance(rule, Mapping):
                raise PlanError(f"{where}: rule must be a dict with keys {list(_RULE_KEYS)}, got {rule!r}")
            unknown = [k for k in rule if k not in _RULE_KEYS]
            missing = [k for k in ("alpha", "beta") if k not in rule]
            if unknown or missing:
                raise PlanError(
                    f"{where}: unknown key(s) {unknown} / missing key(s) {missing}; allowed: {list(_RULE_KEYS)}"
                )
            norm: dict[str, Any] = {}
            for key in ("alpha", "beta"):
                val = rule[key]
                if isinstance(val, bool) or not isinstance(val, (int, float)):
                    raise PlanError(f"{where}: {key} must be a number, got {val!r}")
                val = float(val)
                if not math.isfinite(val) or val < 0:
                    raise PlanError(f"{where}: {key} must be finite and >= 0, got {val!r}")
                norm[key] = val
            sink = rule.get("sink", 0)
            if isinstance(sink, float) and sink.is_integer():
                sink = int(sink)
            if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
                raise PlanError(f"{where}: sink must be an int >= 0, got {sink!r}")
            norm["sink"] = sink
            out.append(norm)
        return out

    def validate(self) -> None:
        super().validate()
        if not self.entries:
            raise PlanError("ElasticWindowPlan: the plan has no layers")
        expected = [str(i) for i in range(len(self.entries))]
        if sorted(self.entries, key=lambda s: (len(s), s)) != expected:
            raise PlanError(
                f"ElasticWindowPlan: layer keys must be '0'..'{len(self.entries) - 1}', got {list(self.entries)}"
            )
        self.entries = {k: self.entries[k] for k in expected}
        heads = len(self.entries["0"])
        for name, rules in self.entries.items():
            if len(rules) != heads:
                raise PlanError(
                    f"ElasticWindowPlan: layer {name} has {len(rules)} KV heads, layer 0 has {heads}; "
                    "all layers must have the same number of KV heads"
                )

    # ---- shape ------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.entries)

    @property
    def num_kv_heads(self) -> int:
        return len(self.entries["0"])

    def rule(self, layer: int, head: int) -> dict[str, Any]:
        """The rule ``{"alpha", "beta", "sink"}`` of KV head ``head`` in layer ``layer``."""
        return dict(self.entries[str(layer)][head])

    def validate_against(self, num_layers: Any, num_kv_heads: int | None = None) -> None:  # type: ignore[override]
        """Raise :class:`PlanError` naming the mismatch with a model of ``num_layers`` x ``num_kv_heads``.

        ``num_layers`` may also be a transformers config (or a model with ``.config``); see
        :meth:`validate_against_config`.
        """
        if num_kv_heads is None and not isinstance(num_layers, int):
            self.validate_against_config(num_layers)
            return
        if num_kv_heads is None:
            raise TypeError("ElasticWindowPlan.validate_against: num_kv_heads is required with an int num_layers")
        if self.num_layers != num_layers:
            raise PlanError(f"ElasticWindowPlan: plan has {self.num_layers} layers, model has {num_layers}")
        for name, rules in self.entries.items():
            if len(rules) != num_kv_heads:
                raise PlanError(
                    f"ElasticWindowPlan: layer {name}: plan has {len(rules)} KV heads, model has {num_kv_heads}"
                )

    @staticmethod
    def shape_of_config(config: Any) -> tuple[int, int]:
        """``(num_hidden_layers, num_key_value_heads)`` of a transformers-style config (or a model's ``.config``)."""
        config = getattr(config, "config", config)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        layers = getattr(config, "num_hidden_layers", None)
        heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        if not isinstance(layers, int) or not isinstance(heads, int):
            raise PlanError(
                f"ElasticWindowPlan: cannot read num_hidden_layers / num_key_value_heads from {type(config).__name__}"
            )
        return layers, heads

    def validate_against_config(self, config: Any) -> None:
        """:meth:`validate_against` with the shape read from a transformers config."""
        self.validate_against(*self.shape_of_config(config))

    # ---- constructors -----------------------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_kv_heads: int,
        alpha: float,
        beta: float,
        sink: int = 0,
        *,
        model: dict | None = None,
        metadata: dict | None = None,
    ) -> ElasticWindowPlan:
        """The same rule for every KV head of every layer."""
        _check_length(num_layers, "num_layers")
        _check_length(num_kv_heads, "num_kv_heads")
        rule = {"alpha": alpha, "beta": beta, "sink": sink}
        entries = {str(i): [dict(rule) for _ in range(num_kv_heads)] for i in range(num_layers)}
        return cls(entries=entries, model=dict(model or {}), metadata=dict(metadata or {}))

    @classmethod
    def from_rules(
        cls, rules: Sequence[Sequence[Mapping[str, Any]]], *, model: dict | None = None, metadata: dict | None = None
    ) -> ElasticWindowPlan:
        """From a ``[layer][kv_head]`` nested list of rules."""
        return cls(
            entries={str(i): [dict(r) for r in layer] for i, layer in enumerate(rules)},
            model=dict(model or {}),
            metadata=dict(metadata or {}),
        )

    # ---- tensors ----------------------------------------------------------------------------------------------
    def alphas(self) -> torch.Tensor:
        """float64[num_layers, num_kv_heads]."""
        return torch.tensor([[r["alpha"] for r in rules] for rules in self.entries.values()], dtype=torch.float64)

    def betas(self) -> torch.Tensor:
        """float64[num_layers, num_kv_heads]."""
        return torch.tensor([[r["beta"] for r in rules] for rules in self.entries.values()], dtype=torch.float64)

    def sinks(self) -> torch.Tensor:
        """int64[num_layers, num_kv_heads]: sink token counts."""
        return torch.tensor([[r["sink"] for r in rules] for rules in self.entries.values()], dtype=torch.int64)

    def windows(self, n: int) -> torch.Tensor:
        """int64[num_layers, num_kv_heads]: ``clamp(ceil(alpha + beta * n), 1, n)``."""
        n = _check_length(n)
        w = torch.ceil(self.alphas() + self.betas() * n)
        return w.clamp(1, n).to(torch.int64)

    def kept_scores(self, n: int) -> torch.Tensor:
        """int64[num_layers, num_kv_heads]: exact number of (query, key) pairs of the causal n x n matrix kept."""
        w = self.windows(n)
        s = self.sinks().clamp(max=n)
        band = w * (w + 1) // 2 + (n - w) * w  # sum_i min(w, i + 1)
        m = n - w  # sink extra: sum_{k=0}^{m} min(s, k)
        s_eff = torch.minimum(s, m)
        extra = s_eff * (s_eff + 1) // 2 + (m - s_eff) * s_eff
        return band + extra

    def head_score_density(self, n: int) -> torch.Tensor:
        """float64[num_layers, num_kv_heads]: kept fraction of the causal n x n score matrix per KV head."""
        n = _check_length(n)
        return self.kept_scores(n).to(torch.float64) / (n * (n + 1) / 2)

    def score_density(self, n: int) -> float:
        """Kept fraction of the causal n x n score matrix (the prefill's attention work), averaged over KV heads."""
        return float(self.head_score_density(n).mean())

    def cache_rules(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(window', sink')`` int64[num_layers, num_kv_heads]: the rules a KV cache sized for length ``n`` uses,
        ``sink' = min(sink, n - 1)``, ``window' = min(window, n - sink')``, so ``sink' + window' = min(n, sink +
        window)``; the same mask as ``(window, sink)`` for every query ``i < n``."""
        w = self.windows(n)
        s = self.sinks().clamp(max=n - 1)
        return torch.minimum(w, n - s), s

    def cache_slots(self, n: int) -> torch.Tensor:
        """int64[num_layers, num_kv_heads]: KV-cache slots per KV head when sized for length n,
        ``min(n, sink + window)``."""
        w, s = self.cache_rules(n)
        return w + s

    def head_density(self, n: int) -> torch.Tensor:
        """float64[num_layers, num_kv_heads]: kept fraction of the KV cache per head, ``min(n, sink + window) / n``."""
        n = _check_length(n)
        return self.cache_slots(n).to(torch.float64) / n

    def density(self, n: int) -> float:
        """THE density of a plan: the kept fraction of the KV cache at length ``n`` (mean over layers and KV heads
        of ``min(n, sink + window) / n``); decode attention time and KV memory scale with it."""
        return float(self.cache_slots(n).sum()) / (n * self.num_layers * self.num_kv_heads)

    def cache_fraction(self, n: int) -> float:
        """Alias of :meth:`density` (the MoA KV-cache size relative to a dense cache of ``n`` tokens)."""
        return self.density(n)

    def kv_cache_bytes(self, n: int, *, batch_size: int = 1, head_dim: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of a MoA KV cache (K and V) sized for length ``n``: ``density(n)`` x the dense cache's bytes."""
        elem = torch.empty((), dtype=dtype).element_size()
        return int(self.cache_slots(n).sum()) * 2 * batch_size * head_dim * elem

    def summary(self, lengths: Sequence[int] = (2048, 8192)) -> str:
        """One line: shape, density (KV fraction) and score density at a few lengths."""
        parts = [f"{self.num_layers} layers x {self.num_kv_heads} KV heads"]
        for n in lengths:
            parts.append(f"N={n}: density (KV kept) {self.density(n):.3f}, score density {self.score_density(n):.3f}")
        return "; ".join(parts)
