"""A short soak (issue 16): 100 conversions in one process through the library API, good and bad inputs
alternating (bench/soak.py; its long run is recorded in docs/RELIABILITY.md). Memory and open file
descriptors stay flat, no temporary or lock file is left, every good output is valid and every bad input is
refused with a one-line LTDiffPPError that leaves the folder as it was."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_of_100_mixed_conversions_is_flat(tmp_path, tiny_model_path):
    soak = _soak_module()
    s = soak.run_soak(tmp_path, volumes=100, shape=(1, 32, 32), steps=1, mix=True, model_path=tiny_model_path)
    assert s["good"] == 50 and s["bad"] == 50
    assert soak.verdict(s, max_growth_mib=20.0) == [], s
    assert s["open_fds"]["last"] == s["open_fds"]["after_warmup"]
    assert sorted(s["bad_case_messages"]) == sorted(name for name, _ in soak._bad_cases(tmp_path, (1, 32, 32),
                                                                                        tiny_model_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # every input and output removed, nothing hidden left
