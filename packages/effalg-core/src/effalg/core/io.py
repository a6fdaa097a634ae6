"""Checked state-dict loading for quantized checkpoints (safetensors files, directories and sharded indexes)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

__all__ = ["load_state_dict_checked", "MissingTensorsError"]


class MissingTensorsError(KeyError):
    """A checkpoint lacks tensors the quantized model needs (``.missing`` lists them)."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _resolve_files(path: str) -> list[str]:
    if os.path.isdir(path):
        index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
        if index:
            with open(os.path.join(path, index[0]), encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            return sorted({os.path.join(path, v) for v in weight_map.values()})
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"load_state_dict_checked: no .safetensors files in directory {path!r}")
        return files
    if path.endswith(".index.json"):
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        base = os.path.dirname(path)
        return sorted({os.path.join(base, v) for v in weight_map.values()})
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_state_dict_checked: checkpoint {path!r} does not exist")
    return [path]


def load_state_dict_checked(
    path: str | os.PathLike,
    expected_keys: Iterable[str],
    *,
    device: str | torch.device = "cpu",
    prefix: str = "",
    only_expected: bool = False,
) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint and raise :class:`MissingTensorsError` naming any missing expected tensor.

    Args:
        path: a ``.safetensors`` file, a directory of them, or a ``*.safetensors.index.json`` (sharded).
        expected_keys: tensor names that must be present (e.g. ``quantized_model.state_dict().keys()``).
        device: where to load the tensors.
        prefix: prepended to each expected key when looking it up (keys in the result keep the checkpoint names).
        only_expected: return only the expected tensors (saves memory for partial loads).

    The key check happens before any tensor is read.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if isinstance(expected_keys, str):
        raise TypeError("load_state_dict_checked: expected_keys must be an iterable of names, not a string")
    expected = [prefix + k for k in expected_keys]
    files = _resolve_files(path)
    key_to_file: dict[str, str] = {}
    for fp in files:
        try:
            with safe_open(fp, framework="pt", device="cpu") as f:
                for k in f.keys():
                    key_to_file[k] = fp
        except Exception as e:
            raise ValueError(f"load_state_dict_checked: cannot read checkpoint file {fp!r}: {e}") from e
    missing = [k for k in expected if k not in key_to_file]
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        raise MissingTensorsError(
            f"checkpoint {path!r} is missing {len(missing)} quantized tensor(s): {shown}", missing
        )
    wanted = set(expected) if only_expected else set(key_to_file)
    out: dict[str, torch.Tensor] = {}
    for fp in files:
        keys = [k for k, f in key_to_file.items() if f == fp and k in wanted]
        if not keys:
            continue
        with safe_open(fp, framework="pt", device=str(device)) as f:
            for k in keys:
                out[k] = f.get_tensor(k)
    return out
