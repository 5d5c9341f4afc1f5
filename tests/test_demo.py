"""The demo (README's first command) end to end on a small phantom."""

import json

from LTDiffPPLib.demo import run_demo
from LTDiffPPLib.io import read_volume


def test_demo_runs_every_stage(tmp_path, capsys):
    timings = run_demo(tmp_path, shape=(2, 512, 512), rois=24, steps=2)  # 0.70 mm pixels, as the default model
    out = capsys.readouterr().out
    assert "model: ltdiffpp-b30f-b70f" in out  # says plainly which model it used
    for name in ("phantom", "source_B30f", "reference_B70f", "converted"):
        assert read_volume(tmp_path / f"{name}.nrrd").hu.shape == (2, 512, 512)
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    assert "unconverted B30f" in json.dumps(results) and "LTDiffPP" in json.dumps(results)
    assert (tmp_path / "panel.png").stat().st_size > 10_000
    assert set(timings) == {"phantom+simulation", "standardize", "evaluation"}
