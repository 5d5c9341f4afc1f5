"""The paper's comparison models (``ModelConfig.variant``): built by the same classes, trained by config
with the same trainer, exported and run by ``standardize`` like LTDiff++ (tiny sizes, a few steps)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from LTDiffPPLib.inference import standardize
from LTDiffPPLib.modelfile import load_model, read_metadata
from LTDiffPPLib.models import LTDiffPPNet, ModelConfig
from LTDiffPPLib.phantom import qa_phantom
from Training.config import VARIANT_PHASES, TrainConfig
from Training.trainer import Trainer
from conftest import ROOT, TINY, train_ddp

TINY_CONFIG = ROOT / "Training" / "configs" / "tiny.json"
COMPARISON = ("unet++", "pixel-ddpm", "single-scale-ldm")


def _id(name: str) -> str:
    """Test id without "ddp", so that ``-k "not ddp"`` (skip the multi-process tests) keeps the pixel DDPM."""
    return name.replace("-ddpm", "-diffusion")


def _config(dataset, variant: str) -> TrainConfig:
    """tiny.json for ``variant``: no kernel prior, 0 steps for the phases the variant does not have."""
    d = json.loads(TINY_CONFIG.read_text())
    d["model"] = {**d["model"], "variant": variant, "kernel_prior": False}
    for p in {1, 2, 3} - set(VARIANT_PHASES[variant]):
        d[f"phase{p}"] = {"steps": 0}
    return TrainConfig.from_dict({**d, "dataset": str(dataset), "export_name": f"tiny-{variant}"})


@pytest.fixture(scope="module", params=COMPARISON, ids=_id)
def trained(request, dataset, tmp_path_factory):
    """(trainer, run folder, exported and reloaded model) of one comparison variant."""
    run = tmp_path_factory.mktemp("run")
    t = Trainer(_config(dataset, request.param), run, device="cpu", log=lambda s: None)
    assert t.run()
    t.export(run / "model.safetensors")
    return t, run, load_model(run / "model.safetensors")


def _convert(model, seed: int) -> tuple[np.ndarray, list[float]]:
    done: list[float] = []
    vol = qa_phantom((3, 48, 44), spacing_mm=3.2, seed=9)  # 44: padded to a multiple of 8 and cropped
    res = standardize(vol, (3.2, 3.2, 2.0), model, steps=2, seed=seed, batch_size=2, device="cpu",
                      progress=lambda d, n: done.append(d / n))
    assert res.shape == vol.shape and res.dtype == np.float32 and np.isfinite(res).all()
    return res, done


def test_variant_trains_its_phases_and_exports_a_card_that_says_what_it_is(trained):
    t, run, model = trained
    variant = t.cfg.model_config.variant
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {h["phase"] for h in hist} == set(VARIANT_PHASES[variant]) == set(t.cfg.phases)
    assert any("val_loss" in h for h in hist)
    card = model.metadata
    assert card["config"]["variant"] == card["training"]["variant"] == variant
    assert card["training"]["phases"] == {str(p): t.cfg.phase(p).steps for p in VARIANT_PHASES[variant]}
    assert model.config == t.cfg.model_config
    if variant == "unet++":  # phase 1 on pairs, with the noise-power loss; no denoiser at all
        assert all("nps" in h for h in hist if "loss" in h) and model.net.denoiser is None


def test_latent_statistics_only_for_a_latent_diffusion_model(trained):
    t, _, model = trained
    identity = torch.equal(model.net.latent_mean, torch.zeros_like(model.net.latent_mean)) and \
        torch.equal(model.net.latent_std, torch.ones_like(model.net.latent_std))
    assert identity != t.cfg.model_config.latent_diffusion


def test_standardize_converts_deterministically(trained):
    t, _, model = trained
    a, done = _convert(model, seed=0)
    b, _ = _convert(model, seed=0)
    other, _ = _convert(model, seed=1)
    assert np.array_equal(a, b)
    assert done[-1] == pytest.approx(1.0) and done == sorted(done)
    if t.cfg.model_config.has_diffusion:
        assert np.abs(a - other).max() > 0  # the seed picks the sampled texture
    else:
        assert np.array_equal(a, other) and len(done) == 2  # no sampling: one progress report per batch


def test_resume_after_interruption_gives_identical_weights(trained, dataset, tmp_path):
    """Interrupted in the variant's last phase, after a checkpoint, and resumed: the same EMA weights."""
    ref, _, _ = trained
    variant = ref.cfg.model_config.variant
    last = ref.cfg.phases[-1]
    stop = (last, ref.cfg.phase(last).steps - 1)
    cut = Trainer(_config(dataset, variant), tmp_path, device="cpu", stop_after=stop, log=lambda s: None)
    assert not cut.run()
    resumed = Trainer(_config(dataset, variant), tmp_path, device="cpu", resume="auto", log=lambda s: None)
    assert (resumed.phase, resumed.step) == (last, 3)  # tiny.json: checkpoint_every 3
    assert resumed.run()
    for k, v in ref.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k


# ------------------------------------------------------------------------------------------ architecture


def _node_names(net: LTDiffPPNet) -> set[str]:
    return {name for name, _ in net.named_modules() if ".nodes." in name and name.count(".") == 3}


def test_single_scale_autoencoder_has_no_nested_nodes():
    levels = len(TINY.ae_widths)
    nested = _node_names(LTDiffPPNet(TINY))
    plain = _node_names(LTDiffPPNet(dataclasses.replace(TINY, variant="single-scale-ldm")))
    backbone = {f"{i}_0" for i in range(levels)}
    column = {f"{i}_{levels - 1 - i}" for i in range(levels - 1)}  # the plain decoder column X^{i,L-i}
    for part in ("encoder", "decoder"):
        assert {n.rsplit(".", 1)[1] for n in plain if f".{part}." in n} == backbone | column
        assert {n.rsplit(".", 1)[1] for n in nested if f".{part}." in n} > backbone | column  # has X^{0,1}, …
    net = LTDiffPPNet(dataclasses.replace(TINY, variant="single-scale-ldm")).eval()
    with torch.inference_mode():
        assert len(net.decode_all(net.encode(torch.randn(1, 1, 32, 32)))) == 1  # one head, no deep supervision


def test_pixel_space_model_diffuses_the_unshuffled_image_without_an_autoencoder():
    cfg = dataclasses.replace(TINY, variant="pixel-ddpm", latent_channels=TINY.patch**2)
    net = LTDiffPPNet(cfg).eval()
    x = torch.randn(2, 1, 32, 48)
    z = net.encode(x)
    assert z.shape == (2, TINY.patch**2, 32 // TINY.patch, 48 // TINY.patch)
    assert torch.equal(net.render(z, net.condition(x, (0.7, 0.7))), x)  # lossless pixel shuffle
    assert not [n for n, _ in net.named_parameters() if n.startswith("autoencoder.")]
    assert cfg.spatial_multiple == TINY.patch * 2 ** (len(TINY.den_widths) - 1)


def test_ltdiffpp_without_a_variant_key_is_unchanged(tiny_model_path, tmp_path):
    """Model files written before variants existed (no "variant" in their config) load as LTDiff++."""
    meta = read_metadata(tiny_model_path)
    del meta["config"]["variant"]
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_model_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old_file = tmp_path / "old.safetensors"
    save_file(tensors, str(old_file), metadata={"format": "ltdiffpp-model", "format_version": "1",
                                                "ltdiffpp": json.dumps(meta)})
    m = load_model(old_file)
    assert m.config.variant == "ltdiff++" and m.config.has_autoencoder and m.config.has_diffusion
    old = {k: v for k, v in TINY.to_dict().items() if k != "variant"}
    torch.manual_seed(0)
    a = LTDiffPPNet(ModelConfig.from_dict(old)).state_dict()
    torch.manual_seed(0)
    b = LTDiffPPNet(dataclasses.replace(TINY, variant="ltdiff++")).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(p.numel() for p in LTDiffPPNet(ModelConfig()).parameters()) == 2_260_288  # default.json


def test_variant_combinations_are_validated(dataset):
    with pytest.raises(ValueError, match="variant must be one of"):
        ModelConfig(variant="unet")
    for variant in ("unet++", "pixel-ddpm"):
        with pytest.raises(ValueError, match="kernel_prior needs a latent diffusion"):
            ModelConfig(variant=variant, kernel_prior=True, latent_channels=16)
    LTDiffPPNet(dataclasses.replace(TINY, variant="single-scale-ldm", kernel_prior=True))  # allowed: an ablation
    with pytest.raises(ValueError, match="patch² = 4"):
        ModelConfig(variant="pixel-ddpm", patch=2, latent_channels=16)
    with pytest.raises(ValueError, match="no diffusion"):
        net = LTDiffPPNet(dataclasses.replace(TINY, variant="unet++"))
        net.sample_latent(torch.zeros(1, TINY.latent_channels, 8, 8), torch.zeros(1, TINY.latent_channels, 8, 8), steps=1)
    d = {**json.loads(TINY_CONFIG.read_text()), "dataset": str(dataset)}
    unetpp = {**d, "model": {**d["model"], "variant": "unet++", "kernel_prior": False}}
    with pytest.raises(ValueError, match="set phase2.steps and phase3.steps to 0"):
        TrainConfig.from_dict(unetpp)  # a phase the variant does not have must say 0 steps, not be skipped
    with pytest.raises(ValueError, match="autoencoder_from needs a latent diffusion"):
        TrainConfig.from_dict({**unetpp, "phase2": {"steps": 0}, "phase3": {"steps": 0}, "autoencoder_from": "x.pt"})
    pixel = {**d, "model": {**d["model"], "variant": "pixel-ddpm", "kernel_prior": False}, "phase1": {"steps": 0}}
    assert TrainConfig.from_dict({**pixel, "phase3": {"steps": 0}}).phases == (2,)  # phase 3 is optional
    assert TrainConfig.from_dict(pixel).phases == (2, 3)


@pytest.mark.parametrize("name", ["compare-unetpp", "compare-pixel-ddpm", "compare-single-scale-ldm"], ids=_id)
def test_comparison_configs_are_valid_and_sized_like_the_default(name):
    d = json.loads((ROOT / "Training" / "configs" / f"{name}.json").read_text())
    cfg = TrainConfig.from_dict(d)
    n = sum(p.numel() for p in LTDiffPPNet(cfg.model_config).parameters())
    assert abs(n - 2_260_288) < 0.05 * 2_260_288 and f"{n:,}" in cfg.description  # the card says its size
    assert cfg.phases == VARIANT_PHASES[cfg.model_config.variant]


@pytest.mark.slow
@pytest.mark.parametrize("variant", COMPARISON, ids=_id)
def test_ddp_two_ranks_gloo(variant, dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo) trains every variant; rank 0 exports a loadable model."""
    m = train_ddp(_config(dataset, variant).to_dict(), tmp_path / "ddp")
    assert m.metadata["training"]["hardware"].endswith("x2") and m.config.variant == variant
