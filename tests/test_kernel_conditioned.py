"""The kernel-conditioned model: one LTDiff++ network for every pair of library kernels.

A tiny configuration is trained on a tiny multi-kernel dataset (simulated QA phantoms reconstructed with the
four Siemens kernels calibrated on the real pair) and converts every one of their 12 ordered pairs through
the same entry point users call (``standardize_volume``), the model chosen by the domain guard."""

import json

import numpy as np
import pytest
import torch

from LTDiffPPLib import guard, modelcard
from LTDiffPPLib.datasets import (load_dataset, pairs_from_simulation, scans_from_simulation, write_dataset,
                                  write_multikernel_dataset)
from LTDiffPPLib.errors import InputError
from LTDiffPPLib.inference import standardize, standardize_volume
from LTDiffPPLib.io import CTVolume
from LTDiffPPLib.kernels import get_kernel, ordered_pairs, pair_gain
from LTDiffPPLib.modelfile import load_model
from LTDiffPPLib.models import PAIR_CODE_SIZE, LTDiffPPNet, ModelConfig, pair_code
from LTDiffPPLib.phantom import qa_phantom
from Training.config import TrainConfig
from Training.data import PatchSampler
from Training.trainer import Trainer
from conftest import ROOT

SIEMENS = ("B10f", "B30f", "B50f", "B70f")
IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


def _phantom(seed: int, n: int = 2, size: int = 64) -> CTVolume:
    return CTVolume(hu=qa_phantom((n, size, size), spacing_mm=0.7, noise_hu=0.0, seed=seed), spacing=(0.7, 0.7, 2.0),
                    origin=(0.0, 0.0, 0.0), direction=IDENTITY)


def _input(seed: int, n: int = 2) -> CTVolume:
    """A small water phantom with air above it (the guard wants HU that go below 0)."""
    vol = _phantom(seed, n)
    hu = vol.hu.copy()
    hu[:, :10] = -1000.0
    return vol.with_hu(hu)


@pytest.fixture(scope="module")
def multi_dataset(tmp_path_factory):
    scans = []
    for i in range(3):
        scans += scans_from_simulation(_phantom(i), f"p{i}", SIEMENS, doses=(1e5,), seed=i, workers=1)
    return write_multikernel_dataset(scans, tmp_path_factory.mktemp("mk") / "ds", val=0.34, test=0.34)


def _tiny_cfg(dataset) -> TrainConfig:
    d = json.loads((ROOT / "Training" / "configs" / "tiny.json").read_text())
    d["model"]["kernel_conditioned"] = True
    d.update(dataset=str(dataset), export_name="tiny-conditioned")
    return TrainConfig.from_dict(d)


@pytest.fixture(scope="module")
def conditioned_model(multi_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    t = Trainer(_tiny_cfg(multi_dataset), run, device="cpu", log=lambda s: None)
    assert t.run()
    path = run / "tiny-conditioned.safetensors"
    t.export(path)
    return path


def test_multikernel_dataset_holds_the_same_scan_in_every_kernel(multi_dataset, tmp_path):
    ds = load_dataset(multi_dataset)
    assert ds.multikernel and ds.kernels == list(SIEMENS)
    entry = ds.pairs[0]
    s, t = ds.arrays(entry, ("B70f", "B10f"))
    assert s.shape == t.shape == (2, 64, 64)
    assert s[:, 16:48, 16:48].std() > 5 * t[:, 16:48, 16:48].std()  # the sharp one is far noisier (water inside)
    # the same seed gives the very images a paired dataset of two of the kernels holds
    pair = pairs_from_simulation(_phantom(int(entry["patient"][1:])), entry["patient"], "B30f", "B50f",
                                 doses=(1e5,), seed=int(entry["patient"][1:]), workers=1)[0]
    a, b = ds.arrays(entry, ("B30f", "B50f"))
    assert np.array_equal(a, np.rint(pair.source.hu)) and np.array_equal(b, np.rint(pair.target.hu))
    with pytest.raises(InputError, match="name two"):
        ds.arrays(entry)
    with pytest.raises(InputError, match="name two"):
        ds.arrays(entry, ("B30f", "B45f"))


def test_multikernel_dataset_refuses_scans_with_other_kernels(tmp_path):
    a = scans_from_simulation(_phantom(0, n=1), "a", ("B30f", "B70f"), seed=0, workers=1)
    b = scans_from_simulation(_phantom(1, n=1), "b", ("B30f", "B50f"), seed=1, workers=1)
    with pytest.raises(InputError, match="every scan must hold"):
        write_multikernel_dataset(a + b, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_sampler_draws_every_pair_deterministically(multi_dataset):
    ds = load_dataset(multi_dataset)
    pairs = ordered_pairs(SIEMENS)
    assert len(pairs) == 12
    sampler = PatchSampler(ds, "train", 32, {"center": -300.0, "scale": 1000.0, "min": -1024.0, "max": 3071.0}, 0, pairs)
    drawn = {sampler.pair_of(2, step) for step in range(200)}
    assert drawn == set(pairs)
    s1, t1 = sampler.batch(4, 2, 7)
    s2, t2 = sampler.batch(4, 2, 7)
    assert torch.equal(s1, s2) and torch.equal(t1, t2)
    ks, kt = sampler.pair_of(2, 7)
    # the target patches are the drawn target kernel's: a sharper kernel's patches are noisier
    sharp = SIEMENS.index(kt) > SIEMENS.index(ks)
    assert (np.diff(t1.numpy()).std() > np.diff(s1.numpy()).std()) == sharp
    with pytest.raises(ValueError, match="name the kernel pairs"):
        PatchSampler(ds, "train", 32, sampler.hu, 0)


def test_pair_code_and_gain_come_from_the_library():
    c = pair_code("B30f", "B70f")
    assert c.shape == (PAIR_CODE_SIZE,) and c.dtype == np.float32
    assert not np.allclose(c, pair_code("B70f", "B30f")) and not np.allclose(c, pair_code("B30f", "B50f"))
    net = LTDiffPPNet(ModelConfig(kernel_prior=True, kernel_conditioned=True))
    net.set_pair("B70f", "B30f")
    f = np.arange(net.prior.gain.numel()) * net.prior.step
    expected = pair_gain(get_kernel("B70f"), get_kernel("B30f"), f)
    assert np.allclose(net.prior.gain.numpy(), expected, rtol=1e-5) and net.pair == ("B70f", "B30f")
    with pytest.raises(InputError):
        net.set_pair("B30f", "Bl57d")  # no frequency response in the library
    with pytest.raises(ValueError, match="kernel_prior"):
        ModelConfig(kernel_conditioned=True)
    with pytest.raises(ValueError, match="fixed pair"):
        LTDiffPPNet(ModelConfig(kernel_prior=True)).set_pair("B30f", "B70f")


def test_prior_regularization_is_the_model_files_and_only_moves_the_prior(conditioned_model, tmp_path):
    """A conditioned model file records how its library gain is regularized (floor, cap); a file that does not say
    (written before it was recorded) gets the library's defaults, which it was trained with. Uncapping changes the
    prior only where G exceeds the cap (B10f→B70f above ~0.56 mm⁻¹), never the pair code the denoiser was trained
    on; a regularization that makes no sense is refused on loading."""
    from LTDiffPPLib.errors import ModelFileError
    from LTDiffPPLib.kernels import PAIR_GAIN_FLOOR, PAIR_GAIN_MAX
    from LTDiffPPLib.modelfile import save_model

    m = load_model(conditioned_model, verify_registry=False)
    assert m.metadata["kernel_prior"]["floor"] == PAIR_GAIN_FLOOR and m.metadata["kernel_prior"]["max_gain"] == PAIR_GAIN_MAX
    m.net.set_pair("B10f", "B70f")
    capped, code = m.net.prior.gain.clone(), m.net.pair_code.clone()
    assert float(capped.max()) == pytest.approx(PAIR_GAIN_MAX)

    m.net.prior_regularization["max_gain"] = None
    uncapped_path = tmp_path / "uncapped.safetensors"
    save_model(m.net, uncapped_path, m.metadata)
    u = load_model(uncapped_path, verify_registry=False)
    assert u.metadata["kernel_prior"]["max_gain"] is None and u.net.prior_regularization["max_gain"] is None
    u.net.set_pair("B10f", "B70f")
    f = np.arange(u.net.prior.gain.numel()) * u.net.prior.step
    expected = pair_gain(get_kernel("B10f"), get_kernel("B70f"), f, max_gain=None)
    assert np.allclose(u.net.prior.gain.numpy(), expected, rtol=1e-5) and float(u.net.prior.gain.max()) > 90
    below = torch.from_numpy(f < 0.55)
    assert torch.allclose(u.net.prior.gain[below], capped[below]) and torch.equal(u.net.pair_code, code)
    u.net.set_pair("B30f", "B50f")  # a pair whose gain never reaches the cap: the same prior either way
    m.net.set_pair("B30f", "B50f")
    assert torch.allclose(u.net.prior.gain, m.net.prior.gain)

    m.net.prior_regularization["floor"] = 0.0
    with pytest.raises(ModelFileError, match="regularization"):
        save_model(m.net, tmp_path / "bad.safetensors", m.metadata)
    assert not (tmp_path / "bad.safetensors").exists()


def test_conditioned_model_needs_a_multikernel_dataset(dataset):
    with pytest.raises(ValueError, match="multi-kernel dataset"):
        Trainer(_tiny_cfg(dataset), dataset.parent / "run-x", device="cpu", log=lambda s: None)


def test_conditioned_model_converts_every_pair(conditioned_model, monkeypatch):
    m = load_model(conditioned_model)
    assert m.metadata["source_kernel"] == m.metadata["target_kernel"] == guard.ANY_KERNEL
    assert m.metadata["kernels"] == list(SIEMENS) and "gain" not in m.metadata["kernel_prior"]
    vol = _input(7)
    with pytest.raises(InputError, match="set the pair"):  # the low-level call cannot guess the pair
        standardize(vol.hu, vol.spacing, m, steps=2)
    outputs = {}
    for s, t in ordered_pairs(SIEMENS):
        out, plan = standardize_volume(vol, t, source_kernel=s, model=m, steps=2, seed=0)
        assert plan.source.kernel.name == s and plan.target.name == t and m.net.pair == (s, t)
        assert out.hu.shape == vol.hu.shape and np.isfinite(out.hu).all()
        outputs[(s, t)] = out.hu
    # the pair matters: to a sharper kernel the image gets noisier, to a smoother one calmer
    body = (slice(None), slice(20, 44), slice(20, 44))
    assert outputs[("B10f", "B70f")][body].std() > outputs[("B10f", "B30f")][body].std()
    assert not np.allclose(outputs[("B30f", "B50f")], outputs[("B30f", "B70f")])
    # a kernel outside the model's kernels is refused by the guard, naming them
    with pytest.raises(guard.DomainError, match="converts between"):
        standardize_volume(vol, "B40f", source_kernel="B30f", model=m, steps=2)
    with pytest.raises(guard.DomainError, match="give the target kernel"):
        guard.plan_conversion(vol, None, "B30f", conditioned_model)


def test_registry_serves_pairs_without_their_own_model(conditioned_model, tmp_path, monkeypatch):
    """A registered conditioned model serves every pair of its kernels; a per-pair model listed before it
    keeps its pair; an equivalent kernel (B31f ~ B30f) is served too."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "c.safetensors").write_bytes(conditioned_model.read_bytes())
    entries, default = modelcard.registry()
    shipped = [e for e in entries if e.name == default]
    (models / shipped[0].file).symlink_to(shipped[0].path)
    reg = {"format_version": 1, "default": default, "models": [
        {"name": default, "file": shipped[0].file, "sha256": shipped[0].sha256, "source_kernel": shipped[0].source_kernel,
         "target_kernel": shipped[0].target_kernel},
        {"name": "tiny-conditioned", "file": "c.safetensors", "sha256": modelcard.sha256_file(conditioned_model),
         "source_kernel": "any", "target_kernel": "any", "kernels": list(SIEMENS)}]}
    (tmp_path / "registry.json").write_text(json.dumps(reg))
    monkeypatch.setattr(modelcard, "REGISTRY_PATH", tmp_path / "registry.json")
    monkeypatch.setattr(modelcard, "RESOURCES", tmp_path)
    k = get_kernel
    assert guard.model_for_pair(k("B30f"), k("B70f")) == default
    assert guard.model_for_pair(k("B70f"), k("B10f")) == "tiny-conditioned"
    assert guard.model_for_pair(k("B31f"), k("B50f")) == "tiny-conditioned"
    assert guard.model_for_pair(k("B40f"), k("B30f")) is None
    assert len(guard.registered_pairs()) == 1 + 12
    assert "any two of B10f, B30f, B50f, B70f (tiny-conditioned)" in guard.shipped_pairs_text()
    vol = _input(8, n=1)
    out, plan = standardize_volume(vol, "B10f", source_kernel="B50f", steps=2)
    assert plan.model == "tiny-conditioned" and np.isfinite(out.hu).all()
