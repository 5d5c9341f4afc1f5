"""Training end to end on a tiny configuration: three phases, exact resume, DDP (gloo, 2 ranks), export.

The dataset fixture (three simulated phantom 'patients') is in conftest.py."""

import json

import numpy as np
import pytest
import torch

from LTDiffPPLib.inference import standardize
from LTDiffPPLib.modelfile import load_model
from LTDiffPPLib.phantom import qa_phantom
from Training.config import TrainConfig
from Training.trainer import Trainer
from conftest import ROOT, train_ddp

TINY_CONFIG = ROOT / "Training" / "configs" / "tiny.json"


def _cfg(dataset) -> TrainConfig:
    d = json.loads(TINY_CONFIG.read_text())
    d["dataset"] = str(dataset)
    return TrainConfig.from_dict(d)


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.ema.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    t = Trainer(_cfg(dataset), run, device="cpu", log=lambda s: None)
    assert t.run()
    return t, run


def test_three_phases_run_and_export_a_working_model(full_run, tmp_path):
    t, run = full_run
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {h["phase"] for h in hist} == {1, 2, 3}
    assert any("nps" in h for h in hist) and any("val_loss" in h for h in hist)
    steps = [h for h in hist if "loss" in h]
    assert steps and all(h["step_seconds"] > 0 for h in steps)
    batch = {p: t.cfg.phase(p).batch_size for p in (1, 2, 3)}
    assert all(h["patches_per_s"] == pytest.approx(batch[h["phase"]] / h["step_seconds"]) for h in steps)
    assert not torch.allclose(t.ema.latent_std, torch.ones_like(t.ema.latent_std))  # measured after phase 1
    out = tmp_path / "m.safetensors"
    t.export(out)
    m = load_model(out)
    assert m.metadata["training"]["status"] == "trained" and m.metadata["source_kernel"] == "B30f"
    assert m.metadata["training"]["phases"] == {"1": 6, "2": 6, "3": 4}
    assert set(m.metadata["training"]["throughput"]) == {"1", "2", "3"}
    assert all(v["patches_per_s"] > 0 for v in m.metadata["training"]["throughput"].values())
    vol = qa_phantom((2, 64, 64), spacing_mm=3.2, seed=9)
    res = standardize(vol, None, m, steps=2, device="cpu")
    assert res.shape == vol.shape and np.isfinite(res).all()


def test_kernel_prior_is_fitted_on_the_training_pairs(full_run, tmp_path):
    """tiny.json has the kernel prior: B30f -> B70f is a sharpening, stored in the card with its origin."""
    t, _ = full_run
    gain = t.ema.prior.gain
    nyquist = 0.5 / 3.2  # the test dataset's pixels are 3.2 mm
    # at 3.2 mm pixels only the bottom of the kernels' difference is visible: B70f/B30f ≈ 1.1 at Nyquist
    assert gain[0] == pytest.approx(1.0) and gain[int(nyquist / t.ema.prior.step)] > 1.05
    assert not torch.allclose(t.ema.residual_std, torch.ones_like(t.ema.residual_std))
    out = tmp_path / "m.safetensors"
    t.export(out)
    meta = load_model(out).metadata
    assert "train split" in meta["kernel_prior"]["fitted_on"] and meta["kernel_prior"]["pixel_mm"] == [3.2, 3.2]


def test_autoencoder_from_an_earlier_run_skips_phase_1(full_run, dataset, tmp_path):
    ref, run = full_run
    ckpt = sorted((run / "checkpoints").glob("ckpt-p3-*.pt"))[-1]
    d = json.loads(TINY_CONFIG.read_text())
    cfg = TrainConfig.from_dict({**d, "dataset": str(dataset), "autoencoder_from": str(ckpt)})
    t = Trainer(cfg, tmp_path / "run2", device="cpu", log=lambda s: None)
    assert (t.phase, t.step) == (2, 0)
    for k, v in ref.ema.autoencoder.state_dict().items():
        assert torch.equal(v, t.net.autoencoder.state_dict()[k]), k
    # the encoder is the same and the statistics are re-measured on the same batches
    assert torch.allclose(t.net.latent_std, ref.ema.latent_std, atol=1e-6)
    assert t.run()
    hist = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert {h["phase"] for h in hist} == {2, 3}
    t.export(tmp_path / "m.safetensors")
    card = load_model(tmp_path / "m.safetensors").metadata
    assert card["training"]["phases"] == {"2": 6, "3": 4} and card["autoencoder_from"]["path"] == str(ckpt)


def test_tensorboard_scalars_and_panels(full_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = full_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"phase1/loss", "phase2/loss", "phase3/nps", "phase3/val_loss"} <= set(tags["scalars"])
    panels = acc.Images("val/source_converted_target")
    assert len(panels) >= 3 and panels[-1].width == 3 * panels[-1].height // 2  # 2 rows of 3 patches
    steps = [e.step for e in acc.Scalars("phase2/loss")]
    assert min(steps) > 6  # the x axis runs on across phases (phase 1 had 6 steps)


def test_resume_after_interruption_gives_identical_weights(full_run, dataset, tmp_path):
    ref, _ = full_run
    run = tmp_path / "run"
    cut = Trainer(_cfg(dataset), run, device="cpu", stop_after=(2, 4), log=lambda s: None)
    assert not cut.run()  # "killed" in phase 2, after the step-3 checkpoint: step 4 is redone
    resumed = Trainer(_cfg(dataset), run, device="cpu", resume="auto", log=lambda s: None)
    assert (resumed.phase, resumed.step) == (2, 3)
    assert resumed.run()
    for k, v in _weights(ref).items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k


def test_damaged_latest_checkpoint_falls_back_to_the_previous(full_run, dataset, tmp_path):
    _, run = full_run
    ckpts = sorted((run / "checkpoints").glob("ckpt-*.pt"))
    assert len(ckpts) == 3  # keep_checkpoints
    copy_dir = tmp_path / "run" / "checkpoints"
    copy_dir.mkdir(parents=True)
    for c in ckpts:
        (copy_dir / c.name).write_bytes(c.read_bytes())
    latest = copy_dir / ckpts[-1].name
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a crash mid-copy
    with pytest.warns(UserWarning, match="unreadable"):
        t = Trainer(_cfg(dataset), tmp_path / "run", device="cpu", resume="auto", log=lambda s: None)
    assert f"ckpt-p{t.phase}-s{t.step:07d}.pt" == ckpts[-2].name


def test_config_rejects_typos(dataset):
    d = json.loads(TINY_CONFIG.read_text())
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({**d, "lambda_img": 1.0})
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig.from_dict({**d, "patch": 30})


@pytest.mark.slow
def test_ddp_two_ranks_gloo(dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo): completes, rank 0 exports a loadable model."""
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["dataset"] = str(dataset)
    m = train_ddp(cfg, tmp_path / "ddp")
    assert m.metadata["training"]["hardware"].endswith("x2")
