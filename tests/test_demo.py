"""The demo (README's first command) end to end on a small phantom."""

import json

from LTDiffPPLib.demo import run_demo
from LTDiffPPLib.io import read_volume


def test_demo_runs_every_stage(tmp_path, capsys):
    timings = run_demo(tmp_path, shape=(2, 512, 512), rois=24, steps=2)  # 0.70 mm pixels, as the default model
    out = capsys.readouterr().out
    assert "model: ltdiffpp-b30f-b70f" in out and "model: ltdiffpp-b70f-b30f" in out  # says which models
    assert "B30f -> B70f: CCC" in out and "B70f -> B30f: CCC" in out  # a conversion each way
    for name in ("phantom", "source_B30f", "reference_B70f", "converted", "converted_B70f_to_B30f"):
        assert read_volume(tmp_path / f"{name}.nrrd").hu.shape == (2, 512, 512)
    for folder, unconverted in (("evaluation", "unconverted B30f"), ("evaluation_B70f_to_B30f", "unconverted B70f")):
        results = json.loads((tmp_path / folder / "results.json").read_text())
        assert unconverted in json.dumps(results) and "LTDiffPP" in json.dumps(results)
    assert (tmp_path / "panel.png").stat().st_size > 10_000
    assert (tmp_path / "panel_B70f_to_B30f.png").stat().st_size > 10_000
    assert set(timings) == {"phantom+simulation", "standardize", "evaluation"}
