"""Randomized block-diagonal Hadamard rotation of a layer's input channels (QuaRot / ViDiT-Q channel balance).

``HadamardRotation`` maps ``x -> x @ R`` with ``R = diag(signs) @ blockdiag(H_b / sqrt(b), ..., H_b / sqrt(b))``,
an orthogonal matrix (``H_b`` the Sylvester Walsh-Hadamard matrix, ``b`` a power of two dividing ``K``). Used as the
``input_transform`` of a quantized linear layer, the weight is quantized as ``W @ R`` (its rows rotated the same
way) so that ``(x @ R) @ (W @ R).T == x @ W.T``. The random ``signs`` are a buffer saved in the state dict, so a
reloaded model is bit-identical (they are never regenerated on load).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import effalg.kernels as _K

__all__ = ["HadamardRotation", "random_signs"]


def random_signs(K: int, seed: int = 0) -> torch.Tensor:
    """Deterministic random +-1 vector (fp32 ``[K]``, CPU) from ``seed`` (a private ``torch.Generator``)."""
    if isinstance(K, bool) or not isinstance(K, int) or K <= 0:
        raise ValueError(f"random_signs: K must be a positive int, got {K!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random_signs: seed must be an int, got {type(seed).__name__}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (K,), generator=g, dtype=torch.int64).mul_(2).sub_(1).to(torch.float32)


class HadamardRotation(nn.Module):
    """``x -> x @ R`` on the last dim, ``R = diag(signs) @ blockdiag(H_b / sqrt(b))`` (orthogonal).

    Args:
        in_features: K, the channels rotated.
        block_size: Hadamard block ``b`` (a power of two dividing K); None picks
            ``effalg.kernels.hadamard_block_size(K)`` (largest power of two dividing K, at most 256).
        seed: seed of :func:`random_signs` (ignored when ``signs`` is given).
        signs: explicit +-1 ``[K]`` vector instead of a seeded one.
        device: device of the ``signs`` buffer; on ``"meta"`` it is left uninitialized (load a state dict with
            ``assign=True``, or ``to_empty`` then load).

    State dict: ``signs`` (fp32 ``[K]``; kept fp32 under ``.to(dtype)``). ``block_size`` is a constructor argument,
    not saved: integrations must record it (it is ``hadamard_block_size(K)`` unless chosen otherwise).
    """

    signs: torch.Tensor

    def __init__(
        self,
        in_features: int,
        block_size: int | None = None,
        *,
        seed: int = 0,
        signs: torch.Tensor | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"HadamardRotation: in_features must be a positive int, got {in_features!r}")
        K = in_features
        if block_size is None:
            block_size = _K.hadamard_block_size(K)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"HadamardRotation: block_size must be a positive int or None, got {block_size!r}")
        if block_size & (block_size - 1):
            raise ValueError(f"HadamardRotation: block_size must be a power of two, got {block_size}")
        if K % block_size:
            raise ValueError(f"HadamardRotation: block_size={block_size} must divide in_features={K}")
        self.in_features = K
        self.block_size = block_size
        if signs is not None:
            s = _check_signs(signs, K)
            self.seed = None
            buf = s.to(device=device if device is not None else s.device, dtype=torch.float32).clone()
        else:
            self.seed = seed
            dev = torch.device(device) if device is not None else torch.device("cpu")
            buf = torch.empty(K, dtype=torch.float32, device=dev) if dev.type == "meta" else random_signs(K, seed)
            buf = buf.to(dev)
        self.register_buffer("signs", buf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` for ``x[..., K]`` (computed in fp32 by ``effalg.kernels.smooth_hadamard``), in x's dtype."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"HadamardRotation: x must have last dim {self.in_features}, got {shape}")
        return _K.smooth_hadamard(x, None, self.signs, self.block_size)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``[K, K]`` matrix ``R`` (for tests and analysis): ``forward(x) == x @ R``."""
        from effalg.kernels.reference import hadamard_matrix_ref

        b = self.block_size
        H = hadamard_matrix_ref(b, dtype=torch.float64, device=self.signs.device) / b**0.5
        R = torch.block_diag(*([H] * (self.in_features // b)))
        return (self.signs.to(torch.float64)[:, None] * R).to(dtype)

    def _apply(self, fn, recurse=True):
        # Keep the signs fp32 under .to(dtype) / .half() (they follow device moves), like the qparam buffers.
        t = self._buffers.get("signs")
        out = super()._apply(fn, recurse)
        new = self._buffers.get("signs")
        if t is not None and new is not None and new.dtype != torch.float32:
            self._buffers["signs"] = (
                torch.empty_like(t, device=new.device) if t.is_meta else t.to(device=new.device, dtype=torch.float32)
            )
        return out

    def extra_repr(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return f"in_features={self.in_features}, block_size={self.block_size}{seed}"


def _check_signs(signs: Any, K: int) -> torch.Tensor:
    if not isinstance(signs, torch.Tensor):
        raise TypeError(f"HadamardRotation: signs must be a torch.Tensor, got {type(signs).__name__}")
    if signs.dim() != 1 or signs.shape[0] != K:
        raise ValueError(f"HadamardRotation: signs must have shape [{K}], got {tuple(signs.shape)}")
    if not signs.is_meta and not bool((signs.abs() == 1).all()):
        raise ValueError("HadamardRotation: signs must contain only +1 and -1")
    return signs.detach()
