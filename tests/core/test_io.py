import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from effalg.core.io import MissingTensorsError, load_state_dict_checked


def test_missing_tensors_named(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_file({"a.qweight": torch.zeros(2, dtype=torch.int8), "a.weight_scale": torch.ones(2)}, str(path))
    sd = load_state_dict_checked(path, ["a.qweight", "a.weight_scale"])
    assert set(sd) == {"a.qweight", "a.weight_scale"}
    with pytest.raises(MissingTensorsError, match=r"missing 1 quantized tensor\(s\): b\.qweight") as ei:
        load_state_dict_checked(path, ["a.qweight", "b.qweight"])
    assert ei.value.missing == ["b.qweight"]
    with pytest.raises(FileNotFoundError):
        load_state_dict_checked(tmp_path / "none.safetensors", [])


def test_sharded_directory(tmp_path):
    save_file({"x": torch.ones(1)}, str(tmp_path / "model-1.safetensors"))
    save_file({"y": torch.zeros(1)}, str(tmp_path / "model-2.safetensors"))
    index = {"weight_map": {"x": "model-1.safetensors", "y": "model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    sd = load_state_dict_checked(tmp_path, ["x", "y"])
    assert torch.equal(sd["y"], torch.zeros(1))
    assert set(load_state_dict_checked(tmp_path, ["y"], only_expected=True)) == {"y"}


def test_import_is_light():
    code = (
        "import sys, effalg.core as c; c.QuantSpec; c.sqnr; c.BitPlan; c.quantize_; "
        "bad = [m for m in ('scipy', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
