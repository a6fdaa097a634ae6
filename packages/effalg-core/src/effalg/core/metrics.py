"""Error and image-quality metrics: SQNR, relative L2, cosine similarity, KL divergence of logits, PSNR, SSIM.

All metrics accept torch tensors or numpy arrays, compute in float64 and return Python floats (or a float64 tensor
for ``ssim(..., reduction="none")``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["sqnr", "relative_l2", "cosine_similarity", "mse", "kl_divergence", "psnr", "ssim"]


def _as_f64(x: Any, name: str, fn: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    raise TypeError(f"{fn}: {name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _pair(ref: Any, x: Any, fn: str, ref_name: str = "ref", x_name: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
    a = _as_f64(ref, ref_name, fn)
    b = _as_f64(x, x_name, fn)
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: {ref_name} and {x_name} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.numel() == 0:
        raise ValueError(f"{fn}: {ref_name} is empty")
    return a, b


def sqnr(ref: Any, x: Any) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - x)^2))``; ``inf`` if equal."""
    a, b = _pair(ref, x, "sqnr")
    noise = (a - b).pow(2).sum().item()
    signal = a.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def relative_l2(ref: Any, x: Any) -> float:
    """``||ref - x||_2 / ||ref||_2`` (``inf`` when ``ref`` is zero and ``x`` is not)."""
    a, b = _pair(ref, x, "relative_l2")
    num = torch.linalg.vector_norm(a - b).item()
    den = torch.linalg.vector_norm(a).item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def cosine_similarity(ref: Any, x: Any) -> float:
    """Cosine similarity of the flattened tensors (1.0 when both are zero, 0.0 when exactly one is)."""
    a, b = _pair(ref, x, "cosine_similarity")
    a, b = a.flatten(), b.flatten()
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(torch.dot(a, b).item() / (na * nb))


def mse(ref: Any, x: Any) -> float:
    """Mean squared error."""
    a, b = _pair(ref, x, "mse")
    return (a - b).pow(2).mean().item()


def kl_divergence(ref_logits: Any, logits: Any) -> float:
    """Mean over rows of ``KL(softmax(ref_logits) || softmax(logits))`` in nats (last dim = classes).

    The fidelity of a compressed model's next-token distribution to the float model's, on the same inputs.
    """
    a, b = _pair(ref_logits, logits, "kl_divergence", "ref_logits", "logits")
    if a.dim() == 0:
        raise ValueError("kl_divergence: logits need a class dimension (last dim), got a scalar")
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean().clamp_min(0.0))


def _check_range(data_range: float, fn: str) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"{fn}: data_range must be a positive number, got {data_range!r}")
    return float(data_range)


def psnr(img_ref: Any, img: Any, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / mse)``, over all elements; ``inf`` if equal."""
    dr = _check_range(data_range, "psnr")
    a, b = _pair(img_ref, img, "psnr", "img_ref", "img")
    m = (a - b).pow(2).mean().item()
    return math.inf if m == 0 else 10.0 * math.log10(dr * dr / m)


def _to_bchw(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2:  # [H, W]
        return x[None, None]
    if x.dim() == 3:  # [H, W, C]
        return x.permute(2, 0, 1)[None]
    if x.dim() == 4:  # [B, C, H, W]
        return x
    raise ValueError(f"ssim: {name} must be [H, W], [H, W, C] or [B, C, H, W], got shape {tuple(x.shape)}")


def _gaussian_window(win_size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    img_ref: Any,
    img: Any,
    data_range: float = 1.0,
    *,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> float | torch.Tensor:
    """Structural similarity (Wang et al. 2004) with an ``win_size`` x ``win_size`` Gaussian window (sigma 1.5).

    Images are ``[H, W]``, ``[H, W, C]`` or ``[B, C, H, W]`` (numpy or torch). Local statistics use 'valid' filtering
    (no padding) and population (co)variances; the SSIM map is averaged over pixels and channels.
    ``reduction="mean"`` returns a float averaged over the batch, ``"none"`` a float64 tensor ``[B]``.
    """
    dr = _check_range(data_range, "ssim")
    if reduction not in ("mean", "none"):
        raise ValueError(f"ssim: reduction must be 'mean' or 'none', got {reduction!r}")
    if not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"ssim: win_size must be a positive odd int, got {win_size!r}")
    a, b = _pair(img_ref, img, "ssim", "img_ref", "img")
    a, b = _to_bchw(a, "img_ref"), _to_bchw(b, "img")
    B, C, H, W = a.shape
    if H < win_size or W < win_size:
        raise ValueError(f"ssim: images must be at least win_size={win_size} in H and W, got {H}x{W}")
    win = _gaussian_window(win_size, sigma)[None, None].expand(C, 1, win_size, win_size)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, win, groups=C)

    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a * mu_a
    s_bb = filt(b * b) - mu_b * mu_b
    s_ab = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (s_aa + s_bb + c2)
    per_image = (num / den).mean(dim=(1, 2, 3))
    return per_image.mean().item() if reduction == "mean" else per_image
