"""SmoothQuant-style per-input-channel scales in effalg's convention (``x * smooth_scale``, weight ``W / smooth_scale``)."""

from __future__ import annotations

import torch

__all__ = ["compute_smooth_scale"]


def compute_smooth_scale(
    act_absmax: torch.Tensor,
    weight: torch.Tensor,
    alpha: float = 0.5,
    *,
    min_value: float = 1e-5,
    max_value: float | None = None,
) -> torch.Tensor:
    """``smooth_scale[k] = max_n |W[n, k]|**alpha / act_absmax[k]**(1 - alpha)``, fp32 ``[K]``.

    The module then computes ``(x * smooth_scale) @ (W / smooth_scale).T``: channels with large activations are
    scaled down and their weight columns up (``alpha`` in [0, 1] moves difficulty from activations to weights).
    Inputs are clamped to ``>= min_value`` before the powers; the result is clamped to ``[min_value, max_value]``.

    Args:
        act_absmax: per-input-channel activation abs-max ``[K]`` (e.g. ``CalibrationStats[name].absmax``).
        weight: float weight ``[N, K]``.
    """
    if not isinstance(act_absmax, torch.Tensor) or act_absmax.dim() != 1:
        raise ValueError("compute_smooth_scale: act_absmax must be a 1-D tensor [K]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != act_absmax.shape[0]:
        raise ValueError(
            f"compute_smooth_scale: weight must be [N, {act_absmax.shape[0]}], got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"compute_smooth_scale: alpha must be in [0, 1], got {alpha!r}")
    a = act_absmax.detach().to(device=weight.device, dtype=torch.float32).clamp(min=min_value)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=min_value)
    s = w.pow(alpha) / a.pow(1.0 - alpha)
    return s.clamp(min=min_value, max=max_value)
