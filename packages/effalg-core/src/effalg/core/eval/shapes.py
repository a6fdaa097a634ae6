"""Procedural captioned shapes (``"a red circle on a blue background"``) and a deterministic checker for them.

Images are ``(3, 32, 32)`` float tensors in ``[0, 1]``: one filled, axis-aligned circle, square or triangle of
one palette colour on a flat background of another palette colour, with random size and position. The checker
reads an image back: background colour from the border pixels, foreground colour and mask from the pixels far from
the background (half-way edge), shape from the fill ratio of the mask inside its bounding box (square ~1, circle ~0.79,
triangle ~0.5). Its features also drive a Fréchet distance against real samples. Pure torch (+ scipy for sqrtm).
The captions' word-level tokenizer (a transformers object) is built by
:func:`effalg.transformers.reference_models.build_shapes_tokenizer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIZE = 32
SHAPES = ["circle", "square", "triangle"]
COLORS = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.70, 0.25),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.92, 0.85, 0.15),
    "purple": (0.60, 0.25, 0.75),
    "white": (0.95, 0.95, 0.95),
}
COLOR_NAMES = list(COLORS)
PALETTE = torch.tensor([COLORS[c] for c in COLOR_NAMES])  # (C, 3)
WORDS = ["a", "on", "background"] + SHAPES + COLOR_NAMES


def caption(shape: str, fg: str, bg: str) -> str:
    return f"a {fg} {shape} on a {bg} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """``(shape, fg, bg)`` of a caption made by :func:`caption`."""
    w = text.lower().split()
    return w[2], w[1], w[5]


def all_combinations() -> list[tuple[str, str, str]]:
    return [(s, f, b) for s in SHAPES for f in COLOR_NAMES for b in COLOR_NAMES if f != b]


def render(shape: str, fg: str, bg: str, gen: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """One image; radius 6-11 px, centre jittered so the shape stays inside the frame."""
    r = 6 + 5 * torch.rand((), generator=gen).item()
    margin = r + 1.5
    cx = margin + (size - 2 * margin) * torch.rand((), generator=gen).item()
    cy = margin + (size - 2 * margin) * torch.rand((), generator=gen).item()
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.9
        mask = ((xs - cx).abs() <= h) & ((ys - cy).abs() <= h)
    elif shape == "triangle":
        # Upright isosceles triangle with the apex at the top.
        top, bot = cy - r, cy + r
        frac = ((ys - top) / (bot - top)).clamp(0, 1)
        mask = (ys >= top) & (ys <= bot) & ((xs - cx).abs() <= frac * r)
    else:
        raise ValueError(shape)
    img = torch.tensor(COLORS[bg]).view(3, 1, 1).expand(3, size, size).clone()
    img[:, mask] = torch.tensor(COLORS[fg]).view(3, 1)
    return img


def sample_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str], list[tuple[str, str, str]]]:
    combos = all_combinations()
    idx = torch.randint(0, len(combos), (n,), generator=gen).tolist()
    labels = [combos[i] for i in idx]
    imgs = torch.stack([render(s, f, b, gen) for s, f, b in labels])
    return imgs, [caption(*lab) for lab in labels], labels


def _nearest_color(rgb: torch.Tensor) -> int:
    return int(((PALETTE - rgb.view(1, 3)) ** 2).sum(-1).argmin())


@dataclass
class CheckResult:
    shape: str
    fg: str
    bg: str
    features: torch.Tensor  # (11,)


def check_image(img: torch.Tensor) -> CheckResult:
    """Read shape, foreground and background colour (and features) from one ``(3, H, W)`` image in [0, 1]."""
    img = img.float().clamp(0, 1)
    _, h, w = img.shape
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)  # (3, N)
    bg_rgb = border.median(dim=1).values
    dist = ((img - bg_rgb.view(3, 1, 1)) ** 2).sum(0).sqrt()
    mask = dist > 0.25
    area = int(mask.sum())
    if area < 4:
        return CheckResult(
            "none", "none", COLOR_NAMES[_nearest_color(bg_rgb)], torch.cat([bg_rgb, bg_rgb, torch.zeros(5)])
        )
    fg_rgb = img[:, mask].median(dim=1).values
    # Second pass: a pixel belongs to the shape when it is nearer the shape's colour than the background's (the
    # half-way edge), which keeps fill ratios stable on blurred images such as VAE reconstructions.
    mask = ((img - fg_rgb.view(3, 1, 1)) ** 2).sum(0) < ((img - bg_rgb.view(3, 1, 1)) ** 2).sum(0)
    area = int(mask.sum())
    if area < 4:
        return CheckResult(
            "none", "none", COLOR_NAMES[_nearest_color(bg_rgb)], torch.cat([bg_rgb, bg_rgb, torch.zeros(5)])
        )
    ys, xs = torch.nonzero(mask, as_tuple=True)
    bw = float(xs.max() - xs.min() + 1)
    bh = float(ys.max() - ys.min() + 1)
    fill = area / (bw * bh)
    if fill > 0.9:
        shape = "square"
    elif fill > 0.64:
        shape = "circle"
    else:
        shape = "triangle"
    feats = torch.cat(
        [
            fg_rgb,
            bg_rgb,
            torch.tensor(
                [
                    fill,
                    area / (h * w) * 4,
                    math.log(bw / bh),
                    xs.float().mean().item() / w,
                    ys.float().mean().item() / h,
                ]
            ),
        ]
    )
    return CheckResult(shape, COLOR_NAMES[_nearest_color(fg_rgb)], COLOR_NAMES[_nearest_color(bg_rgb)], feats)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` (N, D) and ``b`` (M, D)."""
    import numpy as np
    from scipy import linalg

    a = a.double().numpy()
    b = b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = 1e-6 * np.eye(s1.shape[0])
    covmean, _ = linalg.sqrtm((s1 + eps) @ (s2 + eps), disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def real_features(n: int = 512, seed: int = 4321) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    imgs, _, _ = sample_batch(n, gen)
    return torch.stack([check_image(im).features for im in imgs])
