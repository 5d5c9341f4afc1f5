"""The kernel prior: a fitted radial kernel-ratio filter inside the model, and LTDiff++ as its residual."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from LTDiffPPLib.baselines import apply_kernel_ratio, estimate_kernel_ratio
from LTDiffPPLib.errors import ModelFileError
from LTDiffPPLib.inference import standardize
from LTDiffPPLib.modelfile import LoadedModel, default_metadata, load_model, read_metadata, save_model
from LTDiffPPLib.models import KernelPrior, LTDiffPPNet
from LTDiffPPLib.phantom import qa_phantom
from LTDiffPPLib.simulation import ScanProtocol, simulate_slice
from conftest import TINY

PRIOR = dataclasses.replace(TINY, kernel_prior=True)


@pytest.fixture(scope="module")
def pair():
    """A simulated B30f/B70f pair of a QA phantom at 0.7 mm (same raw data, two kernels), in HU."""
    obj = qa_phantom((1, 128, 128), spacing_mm=0.7, noise_hu=0.0, seed=3)[0]
    src, tgt = simulate_slice(obj, 0.7, ["B30f", "B70f"], ScanProtocol(dose=2e5, views=360),
                              np.random.default_rng(3))
    return src, tgt


@pytest.fixture(scope="module")
def ratio(pair):
    return estimate_kernel_ratio(pair[0], pair[1], (0.7, 0.7))


def _prior_net(ratio=None, seed=0) -> LTDiffPPNet:
    torch.manual_seed(seed)
    net = LTDiffPPNet(PRIOR).eval()
    if ratio is not None:
        net.prior.set_gain(ratio.table(), 0.01)
    return net


def test_identity_prior_passes_images_through():
    x = torch.randn(2, 1, 40, 56)
    assert torch.allclose(KernelPrior()(x, (0.7, 0.7)), x, atol=1e-5)


def test_response_interpolates_the_table_and_holds_beyond_it():
    p = KernelPrior()
    p.set_gain([1.0, 3.0, 5.0], step=0.1)
    got = p.response(torch.tensor([0.0, 0.05, 0.15, 0.2, 7.0]))
    assert torch.allclose(got, torch.tensor([1.0, 2.0, 4.0, 5.0, 5.0]))
    with pytest.raises(ValueError, match="positive"):
        p.set_gain([1.0, -2.0], 0.1)


def test_prior_is_the_fourier_ratio_filter(pair, ratio):
    """The torch filter inside the model equals the numpy baseline filter (same gain, same padding)."""
    src, tgt = pair
    hu = {"center": -300.0, "scale": 1000.0}
    net = _prior_net(ratio)
    x = torch.from_numpy((src - hu["center"]) / hu["scale"])[None, None]
    with torch.no_grad():
        got = net.prior(x, (0.7, 0.7))[0, 0].numpy() * hu["scale"] + hu["center"]
    ref = apply_kernel_ratio(src, (0.7, 0.7), ratio)
    assert np.abs(got - ref).max() < 0.5  # HU; the model tabulates G every 0.01 mm^-1
    roi = (slice(50, 78), slice(50, 78))
    assert np.std(got[roi]) > 3 * np.std(src[roi])  # a real sharpening of the B30f's noise


def test_zero_residual_renders_exactly_the_filtered_source(pair, ratio):
    """With Δ = 0 the autoencoder's reconstruction error cancels: output = filtered source."""
    net = _prior_net(ratio)
    x = torch.from_numpy((pair[0] + 300.0) / 1000.0)[None, None]
    with torch.no_grad():
        cond = net.condition(x, (0.7, 0.7))
        out = net.render(torch.zeros_like(cond.latent), cond)
        filtered = net.prior(x, (0.7, 0.7))
    assert torch.allclose(out, filtered, atol=1e-5)
    assert not torch.allclose(net.decode(cond.latent), filtered, atol=1e-2)  # the untrained AE is far off
    with pytest.raises(ValueError, match="base"):
        net.render(torch.zeros_like(cond.latent), net.condition(x, (0.7, 0.7), base=False))


def test_residual_std_scales_the_diffusion_variable():
    net = _prior_net()
    net.set_residual_std(torch.full((PRIOR.latent_channels,), 0.5))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        cond = net.condition(x, (0.7, 0.7))
        z_tgt = cond.latent + 0.25
        d = net.diffusion_target(z_tgt, cond)
    assert torch.allclose(d, torch.full_like(d, 0.5), atol=1e-5)


def test_model_file_keeps_the_prior_and_refuses_a_file_without_it(tmp_path, ratio):
    net = _prior_net(ratio)
    net.set_residual_std(torch.linspace(0.1, 0.4, PRIOR.latent_channels))
    meta = default_metadata(PRIOR, name="prior-test", source_kernel="B30f", target_kernel="B70f")
    meta["kernel_prior"] = {"fitted_on": "a test pair"}
    path = tmp_path / "p.safetensors"
    save_model(net, path, meta)
    m = load_model(path)
    assert m.metadata["kernel_prior"]["fitted_on"] == "a test pair"
    assert torch.allclose(m.net.prior.gain, net.prior.gain, atol=1e-6)
    assert torch.allclose(m.net.residual_std, net.residual_std)
    vol = qa_phantom((1, 64, 64), spacing_mm=0.7, seed=1)
    a = standardize(vol, (0.7, 0.7, 1.0), m, steps=2, device="cpu")
    m.net.prior.set_gain(torch.ones(201), 0.01)
    b = standardize(vol, (0.7, 0.7, 1.0), m, steps=2, device="cpu")
    assert np.abs(a - b).mean() > 5.0  # HU: the stored gain is what the conversion uses

    meta_bad = read_metadata(path)
    del meta_bad["kernel_prior"]
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(bad),
              metadata={"format": "ltdiffpp-model", "format_version": "1", "ltdiffpp": json.dumps(meta_bad)})
    with pytest.raises(ModelFileError, match="kernel prior"):
        load_model(bad)


def test_conversion_filters_at_the_volume_pixel_size(ratio):
    """The prior works in mm⁻¹: the same pixels at another pixel size get another filter."""
    net = _prior_net(ratio)
    meta = default_metadata(PRIOR, name="t", source_kernel="B30f", target_kernel="B70f")
    meta["pixel_spacing_mm"] = [0.5, 1.2]
    m = LoadedModel(net=net, metadata=meta, sha256="", path=Path("t"))
    vol = qa_phantom((1, 64, 64), spacing_mm=0.7, seed=2)
    fine = standardize(vol, (0.5, 0.5, 1.0), m, steps=2, device="cpu")
    coarse = standardize(vol, (1.0, 1.0, 1.0), m, steps=2, device="cpu")
    assert np.abs(fine - coarse).mean() > 1.0
    unknown = standardize(vol, None, m, steps=2, device="cpu")  # the middle of the trained range: 0.85 mm
    mid = standardize(vol, (0.85, 0.85, 1.0), m, steps=2, device="cpu")
    assert np.array_equal(unknown, mid)
