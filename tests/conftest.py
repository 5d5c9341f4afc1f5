"""Shared fixtures: a tiny real model file, a tiny simulated training dataset, and the shared real data
(skipped with a reason when absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from LTDiffPPLib.datasets import pairs_from_simulation, write_dataset
from LTDiffPPLib.io import CTVolume
from LTDiffPPLib.phantom import qa_phantom

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

try:  # absent in `make test`'s Python 3.12 run, which is Slicer's GUI-side environment: no torch there
    import torch  # noqa: F401
except ImportError:
    TORCH = False
else:
    TORCH = True
#: why tests that run a model skip without torch
NO_TORCH = "PyTorch is not installed here (the torch-free Python 3.12 run of the GUI-side tests)"
#: for tests whose worker process loads a model (it imports torch) without a model fixture
requires_torch = pytest.mark.skipif(not TORCH, reason=NO_TORCH)

if TORCH:
    from LTDiffPPLib.modelfile import init_model, load_model
    from LTDiffPPLib.models import ModelConfig

    #: a small architecture of the real model classes: fast on a CPU, same code paths as the default
    TINY = ModelConfig(patch=2, ae_widths=(8, 16, 16), latent_channels=4, den_widths=(8, 16), den_blocks=1,
                       time_dim=16, groups=4)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A randomly initialised model file written and read through the real model-file code."""
    if not TORCH:
        pytest.skip(NO_TORCH)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    init_model(path, TINY, seed=0, source_kernel="B30f", target_kernel="B70f", name="tiny-test")
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Three simulated 'patients' (QA phantoms with different noise seeds), B30f -> B70f, for training tests."""
    pairs = []
    for i in range(3):
        vol = CTVolume(hu=qa_phantom((2, 64, 64), spacing_mm=3.2, noise_hu=0.0, seed=i), spacing=(3.2, 3.2, 2.0),
                       origin=(0.0, 0.0, 0.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
        pairs += pairs_from_simulation(vol, f"p{i}", "B30f", "B70f", doses=(1e5,), seed=i, workers=1)
    return write_dataset(pairs, tmp_path_factory.mktemp("data") / "ds", val=0.34, test=0.34)


def train_ddp(config: dict[str, Any], run_dir: Path):
    """Train ``config`` with torchrun on 2 CPU processes (gloo, 1 thread each); the exported model."""
    cfg_path = run_dir.parent / f"{run_dir.name}-config.json"
    cfg_path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "Training", "train", "--config", str(cfg_path), "--run-dir", str(run_dir),
                        "--device", "cpu"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return load_model(run_dir / "model.safetensors")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (only developer machines and CI have it)")
    return SHARED_DATA
