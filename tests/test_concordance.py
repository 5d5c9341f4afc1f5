"""Lin's CCC, class summaries and image metrics (HU bias, noise, NPS, PSNR, SSIM) against hand values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from LTDiffPPLib.concordance import (ccc_across_images, ccc_per_feature, detrend, hu_bias, lin_ccc, noise_sd, psnr,
                                     radial_nps, radial_power_spectrum, relative_error, ssim, summarize_ccc)
from LTDiffPPLib.errors import InputError

# feature-like values: magnitudes up to 1e6 with a resolution of 1e-3 (no subnormal corner cases)
finite = st.integers(-10**9, 10**9).map(lambda v: v / 1000.0)


def paired(min_size: int = 2, max_size: int = 40):
    return st.integers(min_size, max_size).flatmap(
        lambda n: st.tuples(arrays(np.float64, n, elements=finite), arrays(np.float64, n, elements=finite)))


# ------------------------------------------------------------------------------------------ CCC
def test_ccc_hand_computed_case():
    # x = 1,2,3,4; y = 2,3,5,6: means 2.5, 4; var_x 1.25, var_y 2.5, cov 1.75 (1/n moments)
    # rho_c = 2*1.75 / (1.25 + 2.5 + 1.5**2) = 3.5 / 6 = 0.58333...
    assert lin_ccc([1, 2, 3, 4], [2, 3, 5, 6]) == pytest.approx(3.5 / 6.0, rel=1e-12)


def test_ccc_identical_is_one_and_negation_is_minus_one():
    x = np.array([3.0, -1.0, 7.5, 2.0, 0.0])
    assert lin_ccc(x, x) == pytest.approx(1.0)
    assert lin_ccc(x - x.mean(), -(x - x.mean())) == pytest.approx(-1.0)


def test_ccc_penalizes_shift_and_scale_unlike_pearson():
    x = np.linspace(0, 10, 50)
    assert lin_ccc(x, x + 5) < 0.5            # perfectly correlated, but biased
    assert lin_ccc(x, 2 * x) < 0.9           # perfectly correlated, but scaled


def test_ccc_degenerate_cases():
    assert math.isnan(lin_ccc([4.0, 4.0, 4.0], [4.0, 4.0, 4.0]))    # constant and equal: undefined, not 1
    assert lin_ccc([4.0, 4.0, 4.0], [5.0, 5.0, 5.0]) == 0.0           # constant, different: defined
    assert lin_ccc([4.0, 4.0, 4.0], [1.0, 2.0, 3.0]) == 0.0           # one varies: covariance 0
    assert math.isnan(lin_ccc([1.0], [1.0]))
    assert math.isnan(lin_ccc([1.0, np.nan], [1.0, 2.0]))
    with pytest.raises(InputError):
        lin_ccc([1, 2, 3], [1, 2])


@settings(max_examples=200, deadline=None)
@given(paired())
def test_ccc_properties(xy):
    x, y = xy
    c = lin_ccc(x, y)
    if math.isnan(c):
        assert np.ptp(x) == 0 and np.ptp(y) == 0 and np.all(x == y)
        return
    assert -1.0 <= c <= 1.0
    assert lin_ccc(y, x) == pytest.approx(c, abs=1e-12)               # symmetric
    # concordance is at most |Pearson|
    if np.ptp(x) > 0 and np.ptp(y) > 0:
        with np.errstate(all="ignore"):
            r = np.corrcoef(x, y)[0, 1]
        if np.isfinite(r):
            assert abs(c) <= abs(r) + 1e-9


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(2, 40), elements=finite))
def test_ccc_of_identical_nonconstant_samples_is_one(x):
    if np.ptp(x) > 0:
        assert lin_ccc(x, x) == pytest.approx(1.0)


def test_ccc_per_feature_pairs_rows_by_index_and_drops_nonfinite():
    rng = np.random.default_rng(0)
    ref = pd.DataFrame(rng.normal(size=(10, 3)), index=[f"r{i}" for i in range(10)], columns=["a", "b", "c"])
    cand = ref.iloc[::-1].copy()                      # same values, rows in another order
    cand["c"] = 7.0
    ref["c"] = 7.0                                    # constant and equal: undefined
    cand.loc["r3", "a"] = np.nan
    out = ccc_per_feature(ref, cand)
    assert out["a"] == pytest.approx(1.0) and out["b"] == pytest.approx(1.0)
    assert math.isnan(out["c"])
    assert math.isnan(ccc_per_feature(ref.iloc[:2], cand.loc[ref.index[:2]])["a"])   # < min_pairs
    with pytest.raises(InputError):
        ccc_per_feature(ref, cand.drop(columns="b"))


def test_ccc_across_images_pairs_patients_by_id():
    rng = np.random.default_rng(5)
    ref = {f"p{i}": pd.DataFrame({"a": [v], "b": [2 * v]}, index=["body"]) for i, v in enumerate(rng.normal(size=6))}
    same = {k: v.iloc[0] for k, v in reversed(list(ref.items()))}      # Series, other order
    out = ccc_across_images(ref, same)
    assert out["a"] == pytest.approx(1.0) and out["b"] == pytest.approx(1.0)
    shifted = {k: v + 1.0 for k, v in ref.items()}
    assert ccc_across_images(ref, shifted)["a"] < 1.0
    with pytest.raises(InputError):
        ccc_across_images(ref, {"p0": ref["p0"]})


def test_summarize_counts_undefined_and_fraction():
    ccc = pd.Series({"f1": 0.9, "f2": 0.5, "f3": np.nan, "f4": 0.95, "f5": 0.2})
    classes = pd.Series({"f1": "A", "f2": "A", "f3": "A", "f4": "B", "f5": None})
    s = summarize_ccc(ccc, classes, threshold=0.85)
    assert list(s.index) == ["A", "B", "all"]
    assert s.loc["A", "mean"] == pytest.approx(0.7) and s.loc["A", "n"] == 2 and s.loc["A", "n_undefined"] == 1
    assert s.loc["A", "std"] == pytest.approx(np.std([0.9, 0.5], ddof=1))
    assert s.loc["A", "frac_ge"] == pytest.approx(0.5)
    assert math.isnan(s.loc["B", "std"])                       # one feature: no SD
    assert s.loc["all", "n"] == 4 and s.loc["all", "frac_ge"] == pytest.approx(0.5)


def test_relative_error():
    ref = pd.DataFrame({"a": [1.0, -2.0, 3.0], "b": [0.0, 0.0, 0.0]})
    cand = pd.DataFrame({"a": [1.5, -2.0, 2.0], "b": [1.0, 0.0, 0.0]})
    out = relative_error(ref, cand)
    assert out["a"] == pytest.approx(1.5 / 6.0)
    assert math.isnan(out["b"])


# ------------------------------------------------------------------------------------ image metrics
def test_hu_bias_psnr_ssim_hand_values():
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 50, size=(2, 64, 64))
    assert hu_bias(ref, ref + 7.5) == pytest.approx(7.5)
    mask = np.zeros(ref.shape, bool)
    mask[:, 10:20, 10:20] = True
    shifted = ref.copy()
    shifted[mask] += 3.0
    assert hu_bias(ref, shifted, mask) == pytest.approx(3.0)
    assert psnr(ref, ref + 10.0, data_range=1000.0) == pytest.approx(10 * np.log10(1000.0**2 / 100.0))
    assert psnr(ref, ref) == math.inf
    assert ssim(ref, ref) == pytest.approx(1.0)
    assert ssim(ref, ref + rng.normal(0, 50, ref.shape)) < 0.8
    # a small offset on a bright image keeps structure and contrast, lowers only the luminance term
    assert 0.99 < ssim(ref + 1000.0, ref + 1005.0, data_range=400.0) < 1.0
    with pytest.raises(InputError):
        hu_bias(ref, ref[:1])


def test_detrend_removes_polynomial_and_noise_sd():
    yy, xx = np.mgrid[:32, :32].astype(float)
    plane = 3.0 * xx - 2.0 * yy + 0.05 * xx * yy + 100.0
    np.testing.assert_allclose(detrend(plane, order=2), 0.0, atol=1e-8)
    rng = np.random.default_rng(2)
    patches = [plane + rng.normal(0, 12.0, plane.shape) for _ in range(20)]
    assert np.median(noise_sd(patches)) == pytest.approx(12.0, rel=0.05)


def test_radial_nps_of_white_noise_is_flat_at_variance_times_pixel_area():
    rng = np.random.default_rng(3)
    sigma, dx, dy = 20.0, 0.7, 0.7
    patches = [rng.normal(0, sigma, (64, 64)) for _ in range(60)]
    f, nps = radial_nps(patches, (dy, dx), order=0)
    assert f[0] > 0 and f[-1] <= 0.5 / dx + 1e-9            # mm^-1, DC left out, up to Nyquist
    np.testing.assert_allclose(np.median(nps), sigma**2 * dx * dy, rtol=0.05)
    # smoothing moves power from high to low frequencies
    from scipy.ndimage import gaussian_filter

    f2, nps2 = radial_nps([gaussian_filter(p, 1.0) for p in patches], (dy, dx), order=0)
    assert nps2[-1] < 0.05 * nps2[0]


def test_radial_power_spectrum_frequency_axis_from_spacing():
    # a cosine at 0.2 cycles/mm peaks in the annulus holding 0.2 mm^-1
    dx = 0.5
    x = np.arange(256) * dx
    image = np.tile(np.cos(2 * np.pi * 0.2 * x), (256, 1))
    f, p = radial_power_spectrum(image, (dx, dx), bin_width=0.02)
    assert abs(f[np.nanargmax(p)] - 0.2) <= 0.01 + 1e-9


@settings(max_examples=150, deadline=None)
@given(paired(3), st.sampled_from([-3.0, -0.5, 0.25, 1.0, 7.0]), st.integers(-1000, 1000), st.randoms())
def test_ccc_invariant_to_a_shared_affine_map_and_pair_order(xy, scale, shift, rnd):
    """The same a·v + b applied to both samples, or any reordering of the pairs, leaves CCC unchanged."""
    x, y = xy
    c = lin_ccc(x, y)
    order = list(range(len(x)))
    rnd.shuffle(order)
    permuted = lin_ccc(x[order], y[order])
    mapped = lin_ccc(scale * x + shift, scale * y + shift)
    if math.isnan(c):
        assert math.isnan(permuted)
        return
    assert permuted == pytest.approx(c, abs=1e-9)
    if np.isfinite(mapped):
        assert mapped == pytest.approx(c, abs=1e-6)

