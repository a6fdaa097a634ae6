"""The README's demo command runs end to end (small settings): calibrate, save, reload, score, PNG."""

import importlib.util
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"
REFERENCES = [Path(__file__).resolve().parents[2] / "reference_models" / n for n in ("tiny-pixart-shapes", "tiny-sd-shapes")]


@pytest.mark.skipif(not all(r.is_dir() for r in REFERENCES), reason="reference pipelines not trained")
def test_demo_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("effalg_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--out", str(tmp_path), "--prompts", "4", "--steps", "2", "--mp-ratios", "2"]) == 0
    out = capsys.readouterr().out
    assert "| ViDiT-Q W8A8 |" in out and "| ViDiT-Q W4A8 |" in out and "RELOAD DIFFERS" not in out
    assert (tmp_path / "fp_vs_vidit_q.png").stat().st_size > 0
    for bits in ("w8a8", "w4a8"):
        card = (tmp_path / f"tiny-pixart-shapes-{bits}" / "README.md").read_text()
        assert "vidit-q" in card
    assert "| MixDQ W8A8 |" in out and "| MixDQ mixed W4A8 |" in out
    assert (tmp_path / "fp_vs_mixdq.png").stat().st_size > 0
    for variant in ("w8a8", "mixed-w4a8"):
        card = (tmp_path / f"tiny-sd-shapes-{variant}" / "README.md").read_text()
        assert "mixdq" in card
