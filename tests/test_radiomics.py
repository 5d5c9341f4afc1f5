"""Radiomic extraction: GOH on known gradients, the ROI sampler, feature classes, workers, PyRadiomics parity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from LTDiffPPLib.errors import InputError
from LTDiffPPLib.io import CTVolume
from LTDiffPPLib.radiomics import (GOH_FEATURES, HU_STRATA, IH_FIRSTORDER, PAPER_CLASSES, Roi, body_mask, body_roi,
                                   extract_features, feature_table, goh_features, gradient_2d, label_rois,
                                   load_params, orientation_histogram, square_rois, stratum_of)

SPACING = (0.7, 0.7, 1.0)


def chest_like(n: int = 160, seed: int = 0, nz: int = 1) -> np.ndarray:
    """A (nz, n, n) HU phantom: air, a soft-tissue torso with a fat rim, two lungs, a bone disc, textured
    noise, and a separate 'table' below the body (must not count as body)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] / n
    img = np.full((n, n), -1000.0)
    torso = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.45) / 0.3) ** 2 <= 1
    img[torso] = -100.0                                                          # fat rim
    img[((xx - 0.5) / 0.38) ** 2 + ((yy - 0.45) / 0.26) ** 2 <= 1] = 40.0        # soft tissue
    for cx in (0.33, 0.67):
        img[((xx - cx) / 0.12) ** 2 + ((yy - 0.42) / 0.16) ** 2 <= 1] = -850.0   # lungs
    img[(xx - 0.5) ** 2 + (yy - 0.62) ** 2 <= 0.07**2] = 500.0                   # vertebra
    img[(yy > 0.85) & (yy < 0.88) & (xx > 0.1) & (xx < 0.9)] = 200.0             # table
    from scipy.ndimage import gaussian_filter

    vol = np.stack([img + gaussian_filter(rng.normal(0, 60, (n, n)), 0.8) for _ in range(nz)])
    return vol.astype(np.float32)


@pytest.fixture(scope="module")
def phantom() -> CTVolume:
    return CTVolume(chest_like(), SPACING, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), source="phantom")


@pytest.fixture(scope="module")
def quick_params():
    """The shipped parameters with cheap image types (Original + one LoG + level-1 wavelet)."""
    return load_params().with_image_types({"Original": {}, "LoG": {"sigma": [1.0]},
                                           "Wavelet": {"wavelet": "coif1", "level": 1}})


# -------------------------------------------------------------------------------------------- GOH
def _ramp(angle_deg: float, n: int = 48, spacing: float = 0.7) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] * spacing
    a = np.radians(angle_deg)
    return 10.0 * (np.cos(a) * xx + np.sin(a) * yy)      # HU rising along the angle (x → columns, y → rows)


@pytest.mark.parametrize("angle", [30.0, 120.0, 250.0])
def test_goh_of_a_linear_ramp_peaks_at_its_orientation(angle):
    gy, gx = gradient_2d(_ramp(angle), (0.7, 0.7))
    centres, p = orientation_histogram(gy, gx, bins=36)
    assert centres[np.argmax(p)] == pytest.approx(angle)
    assert p.max() == pytest.approx(1.0)                 # a pure ramp: one orientation
    f = goh_features(gy, gx, bins=36)
    assert f["PeakOrientation"] == pytest.approx(angle)
    assert f["CircularMean"] == pytest.approx(angle, abs=1e-6)
    assert f["ResultantLength"] == pytest.approx(1.0) and f["Entropy"] == pytest.approx(0.0, abs=1e-12)
    assert set(f) == set(GOH_FEATURES)


def test_goh_with_noise_and_isotropic_texture():
    rng = np.random.default_rng(0)
    noisy = _ramp(30.0) + rng.normal(0, 2.0, (48, 48))
    gy, gx = gradient_2d(noisy, (0.7, 0.7))
    f = goh_features(gy, gx)
    assert f["PeakOrientation"] == pytest.approx(30.0)
    assert abs(((f["CircularMean"] - 30.0) + 180) % 360 - 180) < 5.0
    gy, gx = gradient_2d(rng.normal(0, 50, (96, 96)), (0.7, 0.7))
    iso = goh_features(gy, gx)
    assert iso["ResultantLength"] < 0.1 and iso["Entropy"] > 5.0    # log2(36) = 5.17 for a flat histogram
    # weighting: 'count' ignores magnitude, so a strong edge counts as much as weak texture
    gy2 = np.zeros((10, 10))
    gx2 = np.ones((10, 10))
    gy2[0, 0], gx2[0, 0] = 100.0, 0.0                    # one strong pixel pointing at 90°
    assert orientation_histogram(gy2, gx2, weighting="magnitude")[1][9] > 0.5
    assert orientation_histogram(gy2, gx2, weighting="count")[1][9] == pytest.approx(0.01)


def test_goh_mask_and_degenerate_roi():
    gy, gx = gradient_2d(np.zeros((8, 8)), (1.0, 1.0))
    assert all(math.isnan(v) for v in goh_features(gy, gx).values())
    gy, gx = gradient_2d(_ramp(30.0, 16), (0.7, 0.7))
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    assert goh_features(gy, gx, mask)["PeakOrientation"] == pytest.approx(30.0)
    with pytest.raises(InputError):
        orientation_histogram(gy, gx, bins=1)


# ------------------------------------------------------------------------------------------- ROIs
def test_body_mask_fills_lungs_and_drops_the_table(phantom):
    body = body_mask(phantom.hu)
    n = phantom.hu.shape[1]
    assert body[0, int(0.42 * n), int(0.33 * n)]        # lung inside the chest: body
    assert not body[0, int(0.865 * n), n // 2]          # table: not body
    assert not body[0, 2, 2]                            # air outside


def test_square_rois_deterministic_stratified_inside_body(phantom):
    rois = square_rois(phantom, n=24, size=16, seed=3)
    again = square_rois(phantom, n=24, size=16, seed=3)
    other = square_rois(phantom, n=24, size=16, seed=4)
    key = [(r.start, r.shape, r.stratum) for r in rois]
    assert key == [(r.start, r.shape, r.stratum) for r in again]
    assert key != [(r.start, r.shape, r.stratum) for r in other]
    assert np.bincount([r.stratum for r in rois], minlength=4).tolist() == [6, 6, 6, 6]
    body = body_mask(phantom.hu)
    for r in rois:
        mean = float(phantom.hu[r.slices].mean())
        lo, hi = HU_STRATA[r.stratum]
        assert lo <= mean < hi or (r.stratum == 3 and mean == hi)
        assert r.reference_mean == pytest.approx(mean, rel=1e-5, abs=1e-3)
        assert stratum_of(mean) == r.stratum
        assert body[r.slices].all()                      # entirely inside the body
        assert r.shape == (1, 16, 16)
    assert len({r.name for r in rois}) == len(rois)


def test_square_rois_custom_counts_and_shortfall(phantom):
    rois = square_rois(phantom, size=16, seed=0, counts=[5, 0, 3, 1])
    assert np.bincount([r.stratum for r in rois], minlength=4).tolist() == [5, 0, 3, 1]
    with pytest.warns(UserWarning, match="stratum 3"):
        few = square_rois(phantom, size=40, seed=0, counts=[0, 0, 0, 5])   # no 40-px window averages >= 100 HU
    assert len(few) < 5
    with pytest.raises(InputError):
        square_rois(phantom, size=16, counts=[1, 2])


def test_label_and_body_rois(phantom):
    labels = np.zeros(phantom.hu.shape, np.int16)
    labels[0, 40:60, 40:70] = 2
    labels[0, 100:110, 70:90] = 5
    rois = label_rois(labels, phantom)
    assert [r.name for r in rois] == ["label2", "label5"]
    assert rois[0].n_voxels == 600 and rois[0].start == (0, 40, 40) and rois[0].shape == (1, 20, 30)
    assert rois[0].reference_mean == pytest.approx(float(phantom.hu[0, 40:60, 40:70].mean()), rel=1e-5)
    body = body_roi(phantom)
    assert body.n_voxels == int(body_mask(phantom.hu).sum())
    with pytest.raises(InputError):
        label_rois(np.zeros_like(labels))


# ----------------------------------------------------------------------------------- extraction
def test_every_extracted_feature_has_classes_default_parameters(phantom):
    params = load_params()
    rois = square_rois(phantom, size=24, seed=0, counts=[1, 0, 1, 0])
    table = extract_features(phantom, rois, params, workers=1)
    assert table.shape[0] == 2 and table.index.tolist() == [r.name for r in rois]
    classes = feature_table(list(table.columns))
    assert classes.index.tolist() == list(table.columns)
    assert classes["native_class"].notna().all()
    # 14 image types x 93 features + 15 GOH + 9 shape2D, as the parameter file says
    assert classes["image_type"].nunique() == 14 and len(table.columns) == 14 * 93 + 15 + 9
    assert set(classes["paper_class"].dropna()) == set(PAPER_CLASSES)
    first = classes[classes["native_class"] == "firstorder"]
    assert set(first.loc[first["paper_class"] == "IH", "feature"]) == IH_FIRSTORDER
    assert classes.loc[classes["native_class"].isin(["glszm", "gldm", "shape"]), "paper_class"].isna().all()
    assert not classes.loc[classes["native_class"] == "shape", "in_ccc"].any()
    assert np.isfinite(table.drop(columns=[c for c in table.columns if "_goh_" in c])).all().all()


def test_worker_count_and_chunking_do_not_change_results(phantom, quick_params):
    rois = square_rois(phantom, n=8, size=16, seed=1)
    one = extract_features(phantom, rois, quick_params, workers=1, chunk_size=8)
    two = extract_features(phantom, rois, quick_params, workers=2, chunk_size=3)
    pd.testing.assert_frame_equal(one, two, check_exact=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pykwalify loads PyRadiomics' schema via load_module
def test_matches_pyradiomics_extractor_on_the_full_image(phantom):
    """Filtering once per slice and cropping gives what RadiomicsFeatureExtractor.execute gives for the
    whole image with the ROI's mask (Original, Gradient, Wavelet; LoG differs by design in 2D)."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    params = load_params().with_image_types({"Original": {}, "Gradient": {}, "Wavelet": {"level": 1}})
    roi = square_rois(phantom, size=20, seed=2, counts=[0, 0, 1, 0])[0]
    ours = extract_features(phantom, [roi], params, workers=1).iloc[0]
    image = sitk.GetImageFromArray(phantom.hu)
    image.SetSpacing(phantom.spacing)
    mask_array = np.zeros(phantom.hu.shape, np.uint8)
    mask_array[roi.slices] = 1
    mask = sitk.GetImageFromArray(mask_array)
    mask.CopyInformation(image)
    extractor = RadiomicsFeatureExtractor({"setting": params.settings, "imageType": params.image_types,
                                           "featureClass": params.feature_classes})
    theirs = {k: float(v) for k, v in extractor.execute(image, mask).items() if not k.startswith("diagnostics")}
    assert set(theirs) <= set(ours.index)
    assert len(theirs) == len(ours) - len(GOH_FEATURES)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_3d_mode_with_a_multi_slice_label(quick_params):
    vol = CTVolume(chest_like(96, nz=6), SPACING, (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros(vol.hu.shape, np.int8)
    labels[1:4, 40:56, 40:56] = 1
    labels[2, 20:30, 30:40] = 2
    rois = label_rois(labels, vol)
    table3d = extract_features(vol, rois, quick_params, workers=1, mode="3d")
    table2d = extract_features(vol, rois, quick_params, workers=1, mode="2d")
    assert any(c.startswith("log-sigma-1-0-mm-3D_") for c in table3d.columns)
    assert any(c.startswith("log-sigma-1-0-mm-2D_") for c in table2d.columns)
    assert any("wavelet-LLH_" in c for c in table3d.columns)          # 3D wavelet: 3 letters
    assert any("_shape_" in c for c in table3d.columns)
    assert table3d.loc["label1"].notna().sum() > 100
    assert set(feature_table(list(table3d.columns))["native_class"]) >= {"glcm", "shape", "goh"}


def test_extraction_input_checks(phantom, quick_params):
    bad = Roi(name="x", start=(0, 150, 150), shape=(1, 32, 32))
    with pytest.raises(InputError, match="outside"):
        extract_features(phantom, [bad], quick_params, workers=1)
    with pytest.raises(InputError, match="dimensions"):
        extract_features(phantom, [Roi(name="line", start=(0, 50, 50), shape=(1, 1, 10))], quick_params, workers=1)
    with pytest.raises(InputError):
        extract_features(phantom, [], quick_params)


def test_parameter_file_errors_name_the_file(tmp_path):
    params = load_params()
    assert params.mode == "2d" and params.settings["binWidth"] == 25.0
    assert params.with_mode("3d").settings["force2D"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("pyradiomics:\n  setting:\n    binWidth: -3\n")
    with pytest.raises(InputError, match="bad.yaml"):
        load_params(bad)
    bad.write_text("pyradiomics: {}\nnonsense: 1\n")
    with pytest.raises(InputError, match="unknown sections"):
        load_params(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
