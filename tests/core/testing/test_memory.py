"""effalg.core.testing.memory: RssAnon measurement of code in a subprocess."""

import pytest
import torch

from effalg.core.testing.memory import measure_in_subprocess, model_bytes, rss_anon


def test_rss_anon_and_model_bytes():
    assert rss_anon() > 0
    m = torch.nn.Linear(4, 8)
    m.register_buffer("b", torch.zeros(3, dtype=torch.int8))
    assert model_bytes(m) == (4 * 8 + 8) * 4 + 3


def test_measures_peak_after_and_model_bytes():
    code = """
    import torch
    import time
    tmp = torch.ones(64 << 20, dtype=torch.uint8)   # 64 MiB transient
    time.sleep(0.3)
    del tmp
    model = torch.nn.Linear(1024, 1024)             # 4 MiB kept
    """
    r = measure_in_subprocess(code, setup="import torch")
    assert r["model"] == pytest.approx(4.0, abs=0.01)
    assert r["peak"] > 60  # the transient was seen
    assert r["after"] < 20 and r["after_over_model"] < 16  # and is gone


def test_child_errors_are_reported():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        measure_in_subprocess("model = 1 / 0")


def test_after_code_fills_extra_outside_the_measured_section():
    r = measure_in_subprocess("model = torch.nn.Linear(8, 8)", "import torch", after="extra['out'] = model.out_features")
    assert r["extra"] == {"out": 8}
