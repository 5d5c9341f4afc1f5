"""Agreement between a candidate image and the reference: feature concordance and image metrics.

Feature tables are pandas DataFrames with one row per ROI (or per image/patient) and one column per
feature, as :func:`LTDiffPPLib.radiomics.extract_features` returns them; rows are paired by index.
Images are numpy arrays in HU shaped (z, y, x) (2D (y, x) where stated); spacings in mm.

- :func:`lin_ccc`: Lin's concordance correlation coefficient (Lin 1989), population moments (1/n):
  ρc = 2·s_xy / (s_x² + s_y² + (x̄ − ȳ)²). **Degenerate case:** when the denominator is 0 (both inputs
  constant and equal) ρc is undefined and returned as NaN — never silently 1; :func:`summarize_ccc`
  counts such features as ``n_undefined`` and leaves them out of mean, std and fraction. A feature
  constant in only one image is defined (ρc = 0 when the other varies).
- :func:`ccc_per_feature` (across ROIs), :func:`ccc_across_images` (across images/patients, e.g. one
  whole-body ROI each), :func:`summarize_ccc`, :func:`relative_error`: per feature and per class.
- :func:`hu_bias`, :func:`noise_sd`, :func:`radial_nps`, :func:`radial_power_spectrum`, :func:`psnr`,
  :func:`ssim`: image-level numbers (HU, HU²·mm², mm⁻¹, dB).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from .errors import InputError

__all__ = [
    "ccc_across_images", "ccc_per_feature", "detrend", "hu_bias", "lin_ccc", "noise_sd", "psnr", "radial_nps",
    "radial_power_spectrum", "relative_error", "ssim", "summarize_ccc",
]


# ------------------------------------------------------------------------------------------- CCC
def lin_ccc(x: Iterable[float], y: Iterable[float]) -> float:
    """Lin's CCC of paired samples (float in [−1, 1]; NaN when undefined or when any value is not finite).

    Moments use 1/n (Lin 1989). Undefined (NaN): fewer than 2 pairs, or both samples constant and equal.
    """
    x = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64).ravel()
    y = np.asarray(list(y) if not isinstance(y, np.ndarray) else y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"lin_ccc needs paired samples of equal length, got {x.size} and {y.size}")
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    # centre on a common value first: exact for constant inputs and stable for large offsets
    shift = 0.5 * (x.mean() + y.mean())
    x, y = x - shift, y - shift
    mx, my = x.mean(), y.mean()
    dx, dy = x - mx, y - my
    vx, vy, cov = np.mean(dx * dx), np.mean(dy * dy), np.mean(dx * dy)
    denominator = vx + vy + (mx - my) ** 2
    scale = max(np.mean(x * x), np.mean(y * y))
    if denominator <= 1e-24 * scale or denominator == 0.0:
        return float("nan")
    return float(np.clip(2.0 * cov / denominator, -1.0, 1.0))


def ccc_per_feature(reference: pd.DataFrame, candidate: pd.DataFrame, min_pairs: int = 3) -> pd.Series:
    """Lin's CCC of every feature (column) across the rows (ROIs, or images/patients) of two tables.

    Rows are paired by index and must be the same set; columns must match. Per feature, rows where
    either value is not finite are dropped; with fewer than ``min_pairs`` pairs left, or a degenerate
    feature (see :func:`lin_ccc`), the CCC is NaN. Returns a float Series indexed by feature.
    """
    _check_pair(reference, candidate)
    candidate = candidate.loc[reference.index, reference.columns]
    r = reference.to_numpy(np.float64)
    c = candidate.to_numpy(np.float64)
    out = np.full(r.shape[1], np.nan)
    for j in range(r.shape[1]):
        ok = np.isfinite(r[:, j]) & np.isfinite(c[:, j])
        if ok.sum() >= max(2, min_pairs):
            out[j] = lin_ccc(r[ok, j], c[ok, j])
    return pd.Series(out, index=reference.columns, name="ccc", dtype=np.float64)


def ccc_across_images(reference: dict[str, pd.DataFrame | pd.Series], candidate: dict[str, pd.DataFrame | pd.Series],
                      min_pairs: int = 3) -> pd.Series:
    """Lin's CCC per feature across images (patients): one value pair per image.

    ``reference`` and ``candidate`` map an image (patient) id to its features — a Series, or a one-row
    table such as :func:`~LTDiffPPLib.radiomics.extract_features` gives for a whole-body or one-label
    ROI. Images are paired by id; the result is :func:`ccc_per_feature` over the stacked rows.
    """
    if set(reference) != set(candidate):
        raise InputError(f"images differ between reference and candidate: {sorted(set(reference) ^ set(candidate))}")

    def row(item: pd.DataFrame | pd.Series, image: str) -> pd.Series:
        if isinstance(item, pd.DataFrame):
            if len(item) != 1:
                raise InputError(f"image {image!r}: expected one row of features (one ROI), got {len(item)}")
            item = item.iloc[0]
        return item.rename(image)

    ids = sorted(reference, key=str)
    ref = pd.DataFrame([row(reference[i], i) for i in ids])
    cand = pd.DataFrame([row(candidate[i], i) for i in ids])
    return ccc_per_feature(ref, cand, min_pairs)


def _check_pair(reference: pd.DataFrame, candidate: pd.DataFrame) -> None:
    if set(reference.columns) != set(candidate.columns):
        missing = sorted(set(reference.columns) ^ set(candidate.columns))[:5]
        raise InputError(f"feature tables have different features (e.g. {missing})")
    if set(reference.index) != set(candidate.index) or len(reference.index) != len(candidate.index):
        raise InputError("feature tables have different rows (ROIs/images); rows are paired by index")


def summarize_ccc(ccc: pd.Series, classes: pd.Series | None = None, threshold: float = 0.85) -> pd.DataFrame:
    """Mean ± std of CCC per class, with counts and the fraction of features with CCC ≥ ``threshold``.

    ``classes`` maps feature → class name (None/NaN: feature belongs to no class and only counts in
    'all'); without it only the 'all' row is made. Rows: each class in order of first appearance, then
    'all'. Columns: mean, std (sample SD, ddof=1; NaN for one feature), n (defined features),
    n_undefined (NaN CCC, excluded from the statistics), frac_ge (fraction of defined features ≥ threshold).
    """
    groups: list[tuple[str, pd.Series]] = []
    if classes is not None:
        classes = classes.reindex(ccc.index)
        for name in pd.unique(classes.dropna()):
            groups.append((str(name), ccc[classes == name]))
    groups.append(("all", ccc))
    rows = {}
    for name, values in groups:
        defined = values.dropna()
        n = int(defined.size)
        rows[name] = {
            "mean": float(defined.mean()) if n else float("nan"),
            "std": float(defined.std(ddof=1)) if n > 1 else float("nan"),
            "n": n,
            "n_undefined": int(values.size - n),
            "frac_ge": float((defined >= threshold).mean()) if n else float("nan"),
        }
    return pd.DataFrame.from_dict(rows, orient="index")[["mean", "std", "n", "n_undefined", "frac_ge"]]


def relative_error(reference: pd.DataFrame, candidate: pd.DataFrame) -> pd.Series:
    """Normalized mean absolute error per feature: Σ|candidate − reference| / Σ|reference| over the rows
    with finite values (robust to single reference values near 0). NaN when Σ|reference| = 0."""
    _check_pair(reference, candidate)
    candidate = candidate.loc[reference.index, reference.columns]
    r = reference.to_numpy(np.float64)
    c = candidate.to_numpy(np.float64)
    ok = np.isfinite(r) & np.isfinite(c)
    num = np.where(ok, np.abs(c - r), 0.0).sum(axis=0)
    den = np.where(ok, np.abs(r), 0.0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return pd.Series(out, index=reference.columns, name="relative_error", dtype=np.float64)


# ----------------------------------------------------------------------------------- image metrics
def _pair_arrays(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None):
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise InputError(f"images differ in shape: reference {reference.shape}, candidate {candidate.shape}")
    if mask is None:
        mask = np.ones(reference.shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != reference.shape:
        raise InputError(f"mask shaped {mask.shape} does not match the images {reference.shape}")
    if not mask.any():
        raise InputError("mask is empty")
    return reference, candidate, mask


def hu_bias(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean of (candidate − reference) in HU inside ``mask`` (default: everywhere)."""
    reference, candidate, mask = _pair_arrays(reference, candidate, mask)
    return float(np.mean(candidate[mask] - reference[mask]))


def detrend(patch: np.ndarray, order: int = 2) -> np.ndarray:
    """A 2D (y, x) patch minus its least-squares polynomial surface of total degree ``order`` (0: mean)."""
    patch = np.asarray(patch, dtype=np.float64)
    if patch.ndim != 2:
        raise InputError(f"detrend needs a 2D (y, x) patch, got shape {patch.shape}")
    ny, nx = patch.shape
    yy, xx = np.mgrid[:ny, :nx]
    yy = (yy - (ny - 1) / 2) / max(ny, 1)
    xx = (xx - (nx - 1) / 2) / max(nx, 1)
    columns = [xx**i * yy**j for i in range(order + 1) for j in range(order + 1 - i)]
    design = np.stack([c.ravel() for c in columns], axis=1)
    coef, *_ = np.linalg.lstsq(design, patch.ravel(), rcond=None)
    return patch - (design @ coef).reshape(patch.shape)


def noise_sd(patches: Sequence[np.ndarray], order: int = 2) -> np.ndarray:
    """Noise SD in HU of each 2D patch (a homogeneous region) after removing a polynomial trend; the
    sample SD uses ddof = number of fitted coefficients."""
    n_coef = (order + 1) * (order + 2) // 2
    out = []
    for patch in patches:
        residual = detrend(patch, order)
        out.append(np.sqrt(np.sum(residual**2) / max(residual.size - n_coef, 1)))
    return np.asarray(out, dtype=np.float64)


def _radial_average(power: np.ndarray, spacing_yx: tuple[float, float], bin_width: float | None,
                    f_max: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radial average of a centred-or-not 2D spectrum on the numpy FFT grid: (f, mean, counts)."""
    ny, nx = power.shape
    dy, dx = spacing_yx
    fy = np.fft.fftfreq(ny, d=dy)
    fx = np.fft.fftfreq(nx, d=dx)
    radius = np.hypot(fy[:, None], fx[None, :])
    if bin_width is None:
        bin_width = 1.0 / (max(ny * dy, nx * dx))
    if f_max is None:
        f_max = 0.5 / max(dy, dx)  # Nyquist of the coarser axis: annuli complete up to here
    edges = np.arange(0.0, f_max + bin_width / 2, bin_width)
    index = np.digitize(radius.ravel(), edges) - 1
    valid = (index >= 0) & (index < len(edges) - 1) & (radius.ravel() > 0)  # DC left out
    sums = np.bincount(index[valid], weights=power.ravel()[valid], minlength=len(edges) - 1)
    counts = np.bincount(index[valid], minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return 0.5 * (edges[:-1] + edges[1:]), mean, counts


def radial_nps(patches: Sequence[np.ndarray], spacing_yx: tuple[float, float], order: int = 2,
               bin_width: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radial noise power spectrum of homogeneous 2D patches of equal size.

    Each patch is detrended (:func:`detrend`), NPS(fx, fy) = Δx·Δy/(Nx·Ny) · |DFT|² (HU²·mm²), averaged
    over patches, then averaged over annuli of width ``bin_width`` (default 1/(N·Δ), mm⁻¹) up to the
    Nyquist frequency, leaving out the zero frequency (removed by detrending) and empty annuli.
    Returns (f in mm⁻¹ at annulus centres, NPS in HU²·mm²); ∫NPS d²f ≈ variance.
    """
    if not patches:
        raise InputError("radial_nps needs at least one patch")
    shape = np.shape(patches[0])
    if any(np.shape(p) != shape for p in patches) or len(shape) != 2:
        raise InputError("radial_nps needs 2D patches of one size")
    dy, dx = spacing_yx
    power = np.zeros(shape)
    for patch in patches:
        power += np.abs(np.fft.fft2(detrend(patch, order))) ** 2
    power *= dx * dy / (shape[0] * shape[1]) / len(patches)
    f, nps, counts = _radial_average(power, spacing_yx, bin_width, None)
    return f[counts > 0], nps[counts > 0]


def radial_power_spectrum(image: np.ndarray, spacing_yx: tuple[float, float], bin_width: float = 0.025,
                          f_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of a whole image (signal and noise), summed over slices.

    ``image`` is (y, x) or (z, y, x) HU; each slice's mean is removed. Returns (annulus centres in
    mm⁻¹, power in HU²·mm², mean over the annulus; NaN for an empty annulus), bins ``bin_width`` mm⁻¹
    wide up to Nyquist; the zero frequency is left out.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise InputError(f"radial_power_spectrum needs a (y, x) or (z, y, x) image, got {image.shape}")
    dy, dx = spacing_yx
    power = np.zeros(image.shape[1:])
    for s in image:
        power += np.abs(np.fft.fft2(s - s.mean())) ** 2
    power *= dx * dy / (image.shape[1] * image.shape[2])
    f, p, _ = _radial_average(power, spacing_yx, bin_width, f_max)
    return f, p


def psnr(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None = None,
         data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB inside ``mask``: 10·log10(L² / MSE), L = ``data_range`` (HU;
    default: max − min of the reference inside the mask). +inf for identical images."""
    reference, candidate, mask = _pair_arrays(reference, candidate, mask)
    if data_range is None:
        data_range = float(reference[mask].max() - reference[mask].min())
    mse = float(np.mean((candidate[mask] - reference[mask]) ** 2))
    if mse == 0:
        return float("inf")
    if data_range <= 0:
        return float("nan")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None = None,
         data_range: float | None = None, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) inside ``mask``, computed slice by slice in 2D.

    Gaussian window of SD ``sigma`` px (truncated at 3.5 SD, as the usual 11×11 window), K1 = 0.01,
    K2 = 0.03, L = ``data_range`` (HU; default max − min of the reference inside the mask). Images
    (y, x) or (z, y, x). 1 for identical images.
    """
    reference, candidate, mask = _pair_arrays(reference, candidate, mask)
    if data_range is None:
        data_range = float(reference[mask].max() - reference[mask].min())
    if data_range <= 0:
        return float("nan")
    if reference.ndim == 2:
        reference, candidate, mask = reference[None], candidate[None], mask[None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for r, c, m in zip(reference, candidate, mask):
        if not m.any():
            continue

        def blur(a: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=3.5)

        mr, mc = blur(r), blur(c)
        vr = blur(r * r) - mr**2
        vc = blur(c * c) - mc**2
        cov = blur(r * c) - mr * mc
        smap = ((2 * mr * mc + c1) * (2 * cov + c2)) / ((mr**2 + mc**2 + c1) * (vr + vc + c2))
        values.append(smap[m])
    return float(np.mean(np.concatenate(values)))
