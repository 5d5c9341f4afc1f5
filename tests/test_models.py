"""The UNet++ autoencoder and the latent denoiser: shapes, configuration, and the no-bypass property."""

import dataclasses

import pytest
import torch

from LTDiffPPLib.models import LTDiffPPNet, ModelConfig
from conftest import TINY


@pytest.fixture(scope="module", params=[False, True], ids=["unet++", "unet++ with linear path"])
def net(request):
    torch.manual_seed(0)
    n = LTDiffPPNet(dataclasses.replace(TINY, ae_linear_path=request.param)).eval()
    torch.nn.init.normal_(n.denoiser.out[-1].weight, std=0.1)  # give the zero-initialised head a signal
    return n


def test_shapes(net):
    x = torch.randn(3, 1, 32, 48)
    z = net.encode(x)
    assert z.shape == (3, TINY.latent_channels, 32 // TINY.patch, 48 // TINY.patch)
    outs = net.decode_all(z)
    assert len(outs) == len(TINY.ae_widths) - 1  # deep supervision heads on X^{0,1..L}
    assert all(o.shape == x.shape for o in outs)
    assert torch.equal(net.decode(z), outs[-1])
    p = net.predict(z, torch.full((3,), 0.5), z)
    assert p.shape == z.shape


def test_default_architecture_shapes():
    cfg = ModelConfig()
    n = LTDiffPPNet(cfg).eval()
    with torch.inference_mode():
        z = n.encode(torch.zeros(1, 1, 64, 64))
    assert z.shape == (1, cfg.latent_channels, 16, 16)
    assert cfg.spatial_multiple == 16
    assert sum(p.numel() for p in n.parameters()) < 12e6  # keeps a float16 model file under ~25 MB


def test_replacing_the_latent_changes_every_decoder_output_scale(net):
    """No bypass: every deep-supervision output is a function of z, at full resolution."""
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        z = net.encode(x)
        z_other = net.encode(torch.randn(1, 1, 32, 32))
        base, other = net.decode_all(z), net.decode_all(z_other)
        for a, b in zip(base, other):
            assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
        # a change of z at one latent pixel changes every output inside that pixel's full-res footprint
        z_poke = z.clone()
        z_poke[0, :, 8, 8] += 3.0
        p = TINY.patch
        for a, b in zip(base, net.decode_all(z_poke)):
            assert ((a - b).abs()[0, 0, 8 * p : 9 * p, 8 * p : 9 * p] > 1e-6).all()


def test_output_depends_on_the_input_only_through_the_latent(net):
    """Autograd check of the bypass trap: d out/d x equals the chain through z alone."""
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    z = net.encode(x)
    z_leaf = z.detach().requires_grad_(True)
    out_leaf = net.decode(z_leaf).square().sum()
    (g_z,) = torch.autograd.grad(out_leaf, z_leaf)
    (via_z,) = torch.autograd.grad(z, x, g_z)
    out = net.decode(net.encode(x)).square().sum()
    (direct,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(direct, via_z)


def test_denoiser_uses_time_and_condition(net):
    z = torch.randn(2, TINY.latent_channels, 16, 16)
    cond = torch.randn_like(z)
    with torch.inference_mode():
        p = net.predict(z, torch.tensor([0.3, 0.3]), cond)
        assert (p - net.predict(z, torch.tensor([0.8, 0.8]), cond)).abs().max() > 1e-4
        assert (p - net.predict(z, torch.tensor([0.3, 0.3]), torch.randn_like(z))).abs().max() > 1e-4


def test_slices_are_independent_of_their_batch(net):
    """GroupNorm, not BatchNorm: a slice's result does not depend on what else is in the batch."""
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        alone = net.decode(net.encode(x[1:2]))
        batched = net.decode(net.encode(x))[1:2]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


def test_latent_statistics_standardize_the_latent(net):
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        raw = net.autoencoder.encode(x)
        m = LTDiffPPNet(net.config)
        m.load_state_dict(net.state_dict())
        m.eval().set_latent_stats(raw.mean((0, 2, 3)), raw.std((0, 2, 3)))
        z = m.encode(x)
        torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(TINY.latent_channels), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.decode(z), net.decode(net.encode(x)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        m.set_latent_stats([0.0] * TINY.latent_channels, [0.0] * TINY.latent_channels)


def test_config_round_trip_and_validation():
    cfg = ModelConfig(latent_channels=4, den_widths=(32, 64))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"latent_channels": 4, "bogus": 1})
    with pytest.raises(ValueError, match="prediction"):
        ModelConfig(prediction="eps")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(ae_widths=(12, 24), groups=8)
