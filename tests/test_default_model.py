"""The shipped models: registered, documented by their model cards, and real kernel conversions both ways
(B30f → B70f / B50f, smooth to sharp; B70f → B30f, sharp to smooth; the kernel-conditioned model: every
ordered pair of B10f, B30f, B50f and B70f).

Each conversion is checked on a digital phantom the models never saw (seed 1000; training used seeds 0–13),
scanned by the simulator and reconstructed with each kernel: the converted image must carry the target
kernel's noise level and spectrum (not the smooth one's) without shifting the HU of tissue.
"""

import numpy as np
import pytest

from LTDiffPPLib.concordance import radial_power_spectrum
from LTDiffPPLib.demo import DEMO_PHANTOM_SEED
from LTDiffPPLib.guard import registered_pairs
from LTDiffPPLib.inference import standardize_volume
from LTDiffPPLib.io import CTVolume
from LTDiffPPLib.kernels import ordered_pairs
from LTDiffPPLib.modelfile import load_model, registry
from LTDiffPPLib.phantom import PHANTOM_LABELS, chest_phantom
from LTDiffPPLib.simulation import ScanProtocol, simulate

SHIPPED = [e.name for e in registry()[0]]
PHANTOM_KERNELS = ("B10f", "B30f", "B50f", "B70f")
#: every (model, source, target) the registry converts among the phantom's kernels
CASES = [c for c in registered_pairs() if c[1] in PHANTOM_KERNELS and c[2] in PHANTOM_KERNELS]


def test_the_default_model_is_b30f_to_b70f():
    entries, default = registry()
    assert default == "ltdiffpp-b30f-b70f", "the registry names another default model"
    assert {(e.source_kernel, e.target_kernel) for e in entries} >= {("B30f", "B70f"), ("B30f", "B50f"), ("B70f", "B30f")}


@pytest.fixture(scope="module", params=SHIPPED)
def model(request):
    return load_model(request.param)


_LOADED: dict = {}


def _load(name: str):
    if name not in _LOADED:
        _LOADED[name] = load_model(name)
    return _LOADED[name]


@pytest.fixture(scope="module")
def scans():
    """The unseen phantom's B10f, B30f, B50f and B70f reconstructions of one noisy scan, and its labels."""
    hu, labels = chest_phantom((1, 512, 512), (0.7, 0.7, 2.0), seed=DEMO_PHANTOM_SEED, return_labels=True)
    vol = CTVolume(hu=hu, spacing=(0.7, 0.7, 2.0), origin=(0.0, 0.0, 0.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    res = simulate(vol, list(PHANTOM_KERNELS), protocol=ScanProtocol(dose=1.5e5), seed=7, workers=1)
    return res.volumes, labels[0]


def test_model_card(model):
    meta = model.metadata
    t = meta["training"]
    assert t["status"] == "trained" and t["wall_time_s"] > 0 and t["hardware"]
    # phase 1 (the autoencoder) may come from an earlier run of the same config, named in the card
    assert set(t["phases"]) | ({"1"} if "autoencoder_from" in meta else set()) == {"1", "2", "3"}
    assert t["dataset"]["train_pairs"] > 0
    lo, hi = meta["pixel_spacing_mm"]
    assert lo <= 0.7 <= hi
    if meta["config"].get("kernel_conditioned"):  # one model for every pair of its kernels
        assert meta["source_kernel"] == meta["target_kernel"] == "any"
        assert set(PHANTOM_KERNELS) <= set(meta["kernels"]) and "library" in meta["kernel_prior"]["from"]
        for s, t_k in ordered_pairs(PHANTOM_KERNELS):  # measured CCC of every real pair
            assert f"test1_real_{s}_to_{t_k}" in t["evaluation"]
        return
    assert (meta["source_kernel"], meta["target_kernel"]) in (("B30f", "B50f"), ("B30f", "B70f"), ("B70f", "B30f"))
    assert meta["config"]["kernel_prior"] and "train split" in meta["kernel_prior"]["fitted_on"]
    assert f"test1_real_{meta['source_kernel']}_to_{meta['target_kernel']}" in t["evaluation"]  # measured CCC


@pytest.mark.parametrize("name,source,target", CASES, ids=[f"{n}:{s}-{t}" for n, s, t in CASES])
def test_converts_to_the_target_kernel_on_an_unseen_phantom(name, source, target, scans):
    volumes, labels = scans
    out, _ = standardize_volume(volumes[source], target, source_kernel=source, model=_load(name), device="cpu", seed=0)
    src, ref, out = volumes[source].hu[0], volumes[target].hu[0], out.hu[0]
    soft = np.isin(labels, [PHANTOM_LABELS[k] for k in ("soft_tissue", "heart", "fat")])
    soft &= np.abs(ref - np.median(ref[soft])) < 400
    assert soft.sum() > 2000

    def hf_sd(a):  # noise: the image minus a 5x5 local mean
        from scipy.ndimage import uniform_filter
        return float((a - uniform_filter(a, 5))[soft].std())

    s_src, s_ref, s_out = hf_sd(src), hf_sd(ref), hf_sd(out)
    # the task: the kernels' noise differs (B70f several times B30f's, B50f ~1.6x), in either direction
    assert abs(np.log(s_src / s_ref)) > abs(np.log(0.8))
    print(f"noise SD (HU): source {s_src:.1f}, converted {s_out:.1f}, target {s_ref:.1f}")
    # the converted noise level is much closer to the target's (in log ratio) than the source's was
    assert abs(np.log(s_out / s_ref)) < 0.4 * abs(np.log(s_src / s_ref)), (s_src, s_out, s_ref)
    assert abs(float(np.mean(out[soft]) - np.mean(ref[soft]))) < 25.0  # HU of tissue kept
    # the spectrum above 0.3 mm^-1 (where the kernels differ most) is closer to the target's than the source's was
    f, p_ref = radial_power_spectrum(ref, (0.7, 0.7), 0.025)
    _, p_src = radial_power_spectrum(src, (0.7, 0.7), 0.025)
    _, p_out = radial_power_spectrum(out, (0.7, 0.7), 0.025)
    band = (f > 0.3) & (f < 0.7)
    err = lambda p: float(np.mean(np.abs(np.log(p[band] / p_ref[band]))))  # noqa: E731
    assert err(p_out) < 0.5 * err(p_src), (err(p_src), err(p_out))
