"""DiTFastAttn attention-compression plans (plan kind ``"ditfastattn"``).

A plan gives every compressed self-attention layer of a DiT one method per denoising step:

* ``"full"``: full attention;
* ``"wars"``: window attention with residual sharing (WA-RS): a band of ``±window`` tokens on the flattened token
  order plus the residual ``full - window`` cached at the layer's most recent full step;
* ``"ast"``: attention sharing across timesteps: the layer's output of the previous step;
* ``"full+asc"`` (alias ``"asc"``): attention sharing across CFG branches: full attention on the conditional half of
  the ``[uncond, cond]`` batch, copied to both halves;
* ``"wars+asc"``: both.

Entries: ``{"transformer_blocks.0.attn1": ["full", "wars", "ast", ...one per step], ...}`` keyed by the attention
module's name. Metadata (required; what the plan is valid for): ``window`` (tokens per side), ``num_steps``,
``num_tokens`` (image tokens), ``text_tokens`` (global tokens of joint attention, 0 for self-attention), ``cfg``
(whether the calls carry a ``[uncond, cond]`` batch), ``hidden_size`` (attention width, for FLOP counts); optional:
``timesteps`` (the denoiser's timestep at each step), ``scheduler``, ``guidance_scale``, ``threshold``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .plans import Plan, PlanError, register_plan_kind

__all__ = ["DiTFastAttnPlan", "DITFASTATTN_METHODS", "band_pairs", "output_steps", "residual_steps"]

#: The per-step methods, most compressed first (the paper's search order, then ``"full"``).
DITFASTATTN_METHODS: tuple[str, ...] = ("ast", "wars+asc", "wars", "full+asc", "full")
_ALIASES = {"asc": "full+asc"}
_REQUIRED = ("window", "num_steps", "num_tokens", "text_tokens", "cfg", "hidden_size")


def band_pairs(num_tokens: int, window: int, text_tokens: int = 0) -> int:
    """Visible (query, key) pairs of window attention: image tokens see image tokens within ``±window`` positions;
    ``text_tokens`` global tokens see and are seen by every token."""
    n, w, t = num_tokens, min(window, max(num_tokens - 1, 0)), text_tokens
    band = n * (2 * w + 1) - w * (w + 1)  # |i - j| <= w on n positions
    return band + 2 * t * n + t * t


def residual_steps(methods: Sequence[str]) -> list[bool]:
    """Per step: whether a layer running ``methods`` caches its residual (a full step followed by WA-RS before the
    next full step)."""
    out = []
    for s, m in enumerate(methods):
        need = False
        if m.startswith("full"):
            for later in methods[s + 1 :]:
                if later.startswith("full"):
                    break
                if later.startswith("wars"):
                    need = True
                    break
        out.append(need)
    return out


def output_steps(methods: Sequence[str]) -> list[bool]:
    """Per step: whether a layer running ``methods`` caches its output (the next step shares it)."""
    return [s + 1 < len(methods) and methods[s + 1] == "ast" for s in range(len(methods))]


def _positive_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise PlanError(f"DiTFastAttnPlan: metadata {name!r} must be an int >= {minimum}, got {v!r}")
    return v


@register_plan_kind
@dataclass
class DiTFastAttnPlan(Plan):
    """Per-layer, per-step DiTFastAttn methods (see the module docstring)."""

    kind: ClassVar[str] = "ditfastattn"
    version: ClassVar[int] = 1

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        md = self.metadata
        missing = [k for k in _REQUIRED if k not in md]
        if missing:
            raise PlanError(f"DiTFastAttnPlan: metadata is missing {missing} (required: {list(_REQUIRED)})")
        md["window"] = _positive_int("window", md["window"])
        md["num_steps"] = _positive_int("num_steps", md["num_steps"])
        md["num_tokens"] = _positive_int("num_tokens", md["num_tokens"])
        md["text_tokens"] = _positive_int("text_tokens", md["text_tokens"], 0)
        md["hidden_size"] = _positive_int("hidden_size", md["hidden_size"])
        if md["window"] >= md["num_tokens"]:
            raise PlanError(
                f"DiTFastAttnPlan: window ±{md['window']} is not smaller than the sequence of {md['num_tokens']} "
                "image tokens (window attention would be full attention)"
            )
        if not isinstance(md["cfg"], bool):
            raise PlanError(f"DiTFastAttnPlan: metadata 'cfg' must be true or false, got {md['cfg']!r}")
        ts = md.get("timesteps")
        if ts is not None and (
            not isinstance(ts, Sequence)
            or len(ts) != md["num_steps"]
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts)
        ):
            raise PlanError(f"DiTFastAttnPlan: metadata 'timesteps' must be {md['num_steps']} numbers, got {ts!r}")
        if not self.entries:
            raise PlanError("DiTFastAttnPlan: the plan has no layers")
        for name, methods in self.entries.items():
            if len(methods) != md["num_steps"]:
                raise PlanError(
                    f"DiTFastAttnPlan: layer {name!r} has {len(methods)} steps but num_steps is {md['num_steps']}"
                )
            if not md["cfg"] and any("asc" in m for m in methods):
                raise PlanError(
                    f"DiTFastAttnPlan: layer {name!r} shares across CFG branches but the plan has cfg=false"
                )

    def validate_entry(self, name: str, entry: Any) -> list[str]:
        if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)) or not entry:
            raise PlanError(f"DiTFastAttnPlan: layer {name!r}: expected a non-empty list of methods, got {entry!r}")
        methods = [_ALIASES.get(m, m) if isinstance(m, str) else m for m in entry]
        for step, m in enumerate(methods):
            if m not in DITFASTATTN_METHODS:
                raise PlanError(
                    f"DiTFastAttnPlan: layer {name!r}, step {step}: unknown method {m!r}; "
                    f"allowed: {list(DITFASTATTN_METHODS)} (or 'asc' for 'full+asc')"
                )
        if methods[0] not in ("full", "full+asc"):
            raise PlanError(f"DiTFastAttnPlan: layer {name!r}: step 0 must be 'full' or 'full+asc', got {methods[0]!r}")
        return methods

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, layers: Sequence[str], methods: Sequence[str] | str, **metadata: Any) -> DiTFastAttnPlan:
        """A plan giving every layer the same ``methods`` (a list per step, or one method after a full step 0)."""
        n = metadata.get("num_steps")
        if isinstance(methods, str):
            if not isinstance(n, int):
                raise PlanError("DiTFastAttnPlan.uniform: one method needs num_steps")
            methods = ["full"] + [methods] * (n - 1)
        metadata.setdefault("num_steps", len(methods))
        return cls(entries={name: list(methods) for name in layers}, metadata=dict(metadata))

    # ---- queries ----------------------------------------------------------------------------------------------
    @property
    def window(self) -> int:
        return self.metadata["window"]

    @property
    def num_steps(self) -> int:
        return self.metadata["num_steps"]

    def residual_steps(self, name: str) -> list[bool]:
        """Per step: whether layer ``name`` caches its residual (see :func:`residual_steps`)."""
        return residual_steps(self.entries[name])

    def output_steps(self, name: str) -> list[bool]:
        """Per step: whether layer ``name`` caches its output (see :func:`output_steps`)."""
        return output_steps(self.entries[name])

    def method_counts(self) -> dict[str, int]:
        """How many (layer, step) pairs use each method."""
        counts = dict.fromkeys(DITFASTATTN_METHODS, 0)
        for methods in self.entries.values():
            for m in methods:
                counts[m] += 1
        return counts

    def attention_flops_fraction(self, projections: bool = True) -> float:
        """FLOPs of the compressed self-attention layers over all steps, as a fraction of full attention.

        With ``projections`` (the paper's count) a layer-step costs its QKV / output projections
        (``8 * S * hidden**2``) plus the attention itself (``4 * pairs * hidden``); without, only the attention.
        WA-RS computes the band's pairs; the full steps that cache a residual also compute the window attention;
        AST computes nothing; ASC halves the rest. Only the layers in the plan count.
        """
        md = self.metadata
        n, t, d = md["num_tokens"], md["text_tokens"], md["hidden_size"]
        s = n + t
        proj = 8.0 * s * d * d if projections else 0.0
        full = proj + 4.0 * s * s * d
        win = 4.0 * band_pairs(n, self.window, t) * d
        total = used = 0.0
        for name, methods in self.entries.items():
            residual = self.residual_steps(name)
            for m, res in zip(methods, residual):
                total += full
                if m == "ast":
                    continue
                cost = proj + (win if m.startswith("wars") else 4.0 * s * s * d + (win if res else 0.0))
                used += cost / 2 if m.endswith("+asc") else cost
        return used / total if total else 1.0

    def check_model(self, layers: Mapping[str, Any]) -> None:
        """Raise :class:`PlanError` if the plan's layers are not exactly ``layers`` (the model's compressible ones)."""
        missing = [n for n in layers if n not in self.entries]
        extra = [n for n in self.entries if n not in layers]
        if missing or extra:
            raise PlanError(
                f"DiTFastAttnPlan: the plan has {len(self.entries)} layer(s) but the model has {len(layers)} "
                f"self-attention layer(s); not in the plan: {missing[:8]}, not in the model: {extra[:8]}"
            )
