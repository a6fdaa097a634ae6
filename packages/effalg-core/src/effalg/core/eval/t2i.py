"""Score a text-to-image pipeline on captioned shapes: content accuracy from the checker + Fréchet distance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from effalg.core.eval import shapes


def eval_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` (shape, fg, bg) triples: a seeded permutation of all 90 combinations, cycled."""
    combos = shapes.all_combinations()
    order = torch.randperm(len(combos), generator=torch.Generator().manual_seed(seed)).tolist()
    return [combos[order[i % len(order)]] for i in range(n)]


@torch.no_grad()
def evaluate_t2i(
    pipe: Any,
    n_prompts: int = 32,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 16,
    seed: int = 0,
    n_real: int = 512,
    return_images: bool = False,
) -> dict[str, Any]:
    """Generate one image per prompt and check it.

    ``pipe`` is a diffusers ``PixArtAlphaPipeline`` (or anything with the same call signature) producing 32x32
    images, e.g. the reference ``tiny-pixart-shapes`` with quantized modules swapped in. Returns shape / colour /
    background / all-three accuracies (chance 1/3, 1/6, 1/6, 1/90) and the Fréchet distance of the checker's
    features against ``n_real`` rendered images (lower is better). Deterministic for a given ``seed``.
    """
    prompts = eval_prompts(n_prompts, seed)
    device = getattr(pipe, "device", torch.device("cpu"))
    images = []
    for i in range(0, n_prompts, batch_size):
        chunk = prompts[i : i + batch_size]
        gen = torch.Generator(device="cpu").manual_seed(seed * 100003 + i)
        out = pipe(
            [shapes.caption(*c) for c in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gen,
            output_type="pt",
            use_resolution_binning=False,
            clean_caption=False,
            height=shapes.SIZE,
            width=shapes.SIZE,
        ).images
        images.append(out.float().cpu())
    del device
    imgs = torch.cat(images)
    out: dict[str, Any] = {
        "task": "t2i",
        "num_inference_steps": num_inference_steps,
        **check_images(imgs, prompts, shapes.real_features(n_real)),
        "chance": {"shape_acc": 1 / 3, "color_acc": 1 / 6, "bg_acc": 1 / 6, "all_acc": 1 / 90},
    }
    if return_images:
        out["images"] = imgs
    return out


def check_images(images: torch.Tensor, prompts: Sequence[tuple[str, str, str]], real: torch.Tensor) -> dict[str, float]:
    """Shape / colour / background / all-three accuracy of ``images`` against their ``(shape, fg, bg)`` prompts, and
    the Fréchet distance of their checker features to the ``real`` feature rows."""
    res = [shapes.check_image(im) for im in images]
    n = len(prompts)
    return {
        "shape_acc": sum(r.shape == p[0] for r, p in zip(res, prompts)) / n,
        "color_acc": sum(r.fg == p[1] for r, p in zip(res, prompts)) / n,
        "bg_acc": sum(r.bg == p[2] for r, p in zip(res, prompts)) / n,
        "all_acc": sum((r.shape, r.fg, r.bg) == p for r, p in zip(res, prompts)) / n,
        "frechet": shapes.frechet_distance(torch.stack([r.features for r in res]), real),
    }


def data_score(
    prompts: Sequence[tuple[str, str, str]], n_real: int = 512, real_seed: int = 999, accuracy_weight: float = 0.2,
    reference_weight: float = 1.0,
) -> Callable[[torch.Tensor, torch.Tensor], float]:  # fmt: skip
    """A schedule-search score (lower is better) measured against the data, as USF / OMS-DPM score candidates by FID:
    ``FD(images, real) + accuracy_weight * (1 - all-three accuracy) + reference_weight * pixel MSE(images, reference)``.

    ``prompts`` are the ``(shape, fg, bg)`` triples of the search prompts, in the order the pipeline runs them; the
    real features are rendered with ``real_seed`` (not the evaluation's set). Pass it as ``metric=`` to
    ``search_solver_schedule`` / ``search_model_schedule``.
    """
    prompts = list(prompts)
    real = shapes.real_features(n_real, seed=real_seed)

    def data_score(images: torch.Tensor, reference: torch.Tensor) -> float:  # the name searches record
        if len(images) != len(prompts):
            raise ValueError(f"data_score: {len(images)} images for {len(prompts)} prompts")
        r = check_images(images, prompts, real)
        mse = float(((images.float() - reference.float()) ** 2).mean())
        return r["frechet"] + accuracy_weight * (1.0 - r["all_acc"]) + reference_weight * mse

    return data_score
