"""Radiomic features of CT ROIs: PyRadiomics classes plus the IBEX gradient-orientation histogram (GOH).

Everything is set in ONE parameter file, ``resources/radiomics_params.yaml`` (:func:`load_params`).
Arrays are (z, y, x) in HU; spacings follow SimpleITK's (x, y, z) order in mm, like :class:`CTVolume`.

- ROIs (:class:`Roi`): square ROIs stratified by the reference ROI mean (:func:`square_rois`), one ROI
  per label of a label map (:func:`label_rois`), or the whole body (:func:`body_roi`, :func:`body_mask`).
- Extraction (:func:`extract_features`, :func:`extract_features_many`): each filtered image
  (Original, Gradient, LoG, Wavelet, ...) is computed once per slice (2D mode, ``force2D``) or once per
  ROI block (3D mode) and every ROI is cropped from it; the PyRadiomics feature classes then run on the
  crop exactly as ``RadiomicsFeatureExtractor`` would run them. Work is spread over worker processes;
  a ROI's features depend only on its own slice(s) or block, never on how ROIs were grouped, so results
  are identical for any worker count. Workers are started with the 'spawn' method (safe inside Slicer
  or next to torch threads): a script that extracts features must guard its entry point with
  ``if __name__ == "__main__":``, as multiprocessing requires.
- Feature classes (:func:`feature_table`): every feature gets its native class (firstorder, glcm,
  glrlm, glszm, gldm, ngtdm, shape, goh) and, where the paper has one, its paper class (GOH, GLCM,
  GLRLM, ID, IH, NID). ``firstorder`` splits by what PyRadiomics computes it on: Entropy and Uniformity
  use the discretized histogram (binWidth) → IH ("intensity histogram"); all other first-order features
  use the raw HU values (moments, energy, order statistics) → ID ("intensity direct"). glszm and gldm
  have no paper class; shape features are excluded from concordance (the ROI is shared).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .io import CTVolume

__all__ = [
    "GOH_FEATURES", "HU_STRATA", "IH_FIRSTORDER", "NATIVE_CLASSES", "PAPER_CLASSES", "PARAMS_FILE", "RadiomicsParams",
    "Roi", "body_mask", "body_roi", "extract_features", "extract_features_many", "feature_table", "goh_features",
    "gradient_2d", "label_rois", "load_params", "orientation_histogram", "split_feature_name", "square_rois",
    "stratum_of",
]

PARAMS_FILE = Path(__file__).resolve().parent / "resources" / "radiomics_params.yaml"

#: default strata of the reference ROI mean (HU): [lo, hi) except the last, which includes hi
HU_STRATA: tuple[tuple[float, float], ...] = ((-1000.0, -500.0), (-500.0, -100.0), (-100.0, 100.0), (100.0, 1500.0))
#: native classes in report order (shape2D is reported as shape)
NATIVE_CLASSES = ("goh", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm", "shape")
#: the paper's six classes in its Table I order
PAPER_CLASSES = ("GOH", "GLCM", "GLRLM", "ID", "IH", "NID")
#: first-order features PyRadiomics computes on the discretized histogram → paper class IH; the rest → ID
IH_FIRSTORDER = frozenset({"Entropy", "Uniformity"})
_PAPER_OF_NATIVE = {"goh": "GOH", "glcm": "GLCM", "glrlm": "GLRLM", "ngtdm": "NID"}
#: GOH feature names in output order
GOH_FEATURES = ("Mean", "StandardDeviation", "Skewness", "Kurtosis", "Median", "Percentile10", "Percentile90",
                "InterquartileRange", "Entropy", "Energy", "MaxProbability", "PeakOrientation", "CircularMean",
                "ResultantLength", "AxialResultantLength")
_TOP_KEYS = {"pyradiomics", "goh", "extraction", "rois", "concordance", "evaluation"}
_SLICEWISE_2D = {"LoG", "Gradient"}  # neighbourhood filters that must run per slice in 2D mode


# ------------------------------------------------------------------------------------------ params
@dataclass(frozen=True)
class RadiomicsParams:
    """All settings of extraction, ROI sampling and concordance, as read from the parameter file.

    ``settings``, ``image_types`` and ``feature_classes`` are PyRadiomics' own (validated by its schema);
    ``goh``, ``extraction``, ``rois``, ``concordance`` and ``evaluation`` are LTDiffPP's sections.
    """

    settings: dict[str, Any]
    image_types: dict[str, dict[str, Any]]
    feature_classes: dict[str, list[str] | None]
    goh: dict[str, Any]
    extraction: dict[str, Any]
    rois: dict[str, Any]
    concordance: dict[str, Any]
    evaluation: dict[str, Any]
    path: str = ""

    @property
    def mode(self) -> str:
        """'2d' (force2D: in-plane filters and texture matrices) or '3d'."""
        return "2d" if self.settings.get("force2D", False) else "3d"

    def with_mode(self, mode: str | None) -> RadiomicsParams:
        """The same parameters in '2d' or '3d' mode (None: unchanged)."""
        if mode is None or mode == self.mode:
            return self
        if mode not in ("2d", "3d"):
            raise InputError(f"extraction mode must be '2d' or '3d', got {mode!r}")
        return replace(self, settings={**self.settings, "force2D": mode == "2d", "force2Ddimension": 0})

    def with_image_types(self, image_types: Mapping[str, Mapping[str, Any]]) -> RadiomicsParams:
        """The same parameters with other enabled image types (e.g. ``{"Original": {}}`` for quick runs)."""
        unknown = set(image_types) - set(_image_type_names())
        if unknown:
            raise InputError(f"unknown PyRadiomics image types {sorted(unknown)}; known: {_image_type_names()}")
        return replace(self, image_types={k: dict(v) for k, v in image_types.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of every setting."""
        return {"file": self.path, "mode": self.mode,
                "pyradiomics": {"setting": self.settings, "imageType": self.image_types,
                                "featureClass": self.feature_classes},
                "goh": self.goh, "extraction": self.extraction, "rois": self.rois,
                "concordance": self.concordance, "evaluation": self.evaluation}


def _image_type_names() -> list[str]:
    from radiomics import getImageTypes

    return sorted(getImageTypes())


def load_params(path: str | Path | None = None) -> RadiomicsParams:
    """Read and validate a parameter file (default: the shipped ``resources/radiomics_params.yaml``).

    Raises :class:`InputError` naming the file when it is missing, not YAML, has unknown sections, or
    when PyRadiomics' schema rejects its ``pyradiomics`` section.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path) if path is not None else PARAMS_FILE
    if not path.is_file():
        raise InputError(f"Radiomics parameter file {path} does not exist.")
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except (YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"Radiomics parameter file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "pyradiomics" not in data:
        raise InputError(f"Radiomics parameter file {path} needs a top-level 'pyradiomics' section.")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise InputError(f"Radiomics parameter file {path}: unknown sections {sorted(unknown)} "
                         f"(known: {sorted(_TOP_KEYS)}).")
    extractor = _validated_extractor(data["pyradiomics"], path)
    sections = {k: dict(data.get(k) or {}) for k in ("goh", "extraction", "rois", "concordance", "evaluation")}
    return RadiomicsParams(settings=dict(extractor.settings), image_types=dict(extractor.enabledImagetypes),
                           feature_classes=dict(extractor.enabledFeatures), path=str(path), **sections)


def _validated_extractor(pyradiomics_section: Any, path: Path):
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    with _quiet_radiomics(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pykwalify loads PyRadiomics' schema via load_module
        try:
            return RadiomicsFeatureExtractor(pyradiomics_section)
        except Exception as exc:  # pykwalify SchemaError and friends: the section is invalid
            raise InputError(f"Radiomics parameter file {path}: PyRadiomics rejects the 'pyradiomics' section: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc


@contextlib.contextmanager
def _quiet_radiomics() -> Iterator[None]:
    """Silence PyRadiomics' and pykwalify's INFO/WARNING chatter for the duration of a block."""
    import radiomics  # noqa: F401  (its first import sets the logger's level: import before changing it)

    loggers = [logging.getLogger(n) for n in ("radiomics", "pykwalify")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -------------------------------------------------------------------------------------------- ROIs
@dataclass(eq=False)
class Roi:
    """A region of interest on a volume's voxel grid, shaped (z, y, x).

    ``start`` is the first voxel (z, y, x) of its bounding box and ``shape`` the box size in voxels;
    ``mask`` (bool, ``shape``) marks the ROI inside the box, None meaning the whole box (square ROIs).
    ``stratum`` indexes the HU strata of the reference mean, ``reference_mean`` is that mean in HU.
    """

    name: str
    start: tuple[int, int, int]
    shape: tuple[int, int, int]
    mask: np.ndarray | None = None
    stratum: int | None = None
    reference_mean: float | None = None
    label: int | None = None

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index of the bounding box in the volume's (z, y, x) array."""
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.shape))

    def box_mask(self) -> np.ndarray:
        """The ROI inside its bounding box (bool, ``shape``)."""
        return np.ones(self.shape, dtype=bool) if self.mask is None else self.mask

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape)) if self.mask is None else int(self.mask.sum())

    def values(self, hu: np.ndarray) -> np.ndarray:
        """The ROI's voxel values of a (z, y, x) array, flattened."""
        return hu[self.slices][self.box_mask()]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "start_zyx": list(self.start), "shape_zyx": list(self.shape),
                "n_voxels": self.n_voxels, "stratum": self.stratum, "reference_mean_hu": self.reference_mean,
                "label": self.label}


def stratum_of(mean_hu: float, strata: Sequence[Sequence[float]] = HU_STRATA) -> int | None:
    """Index of the stratum holding ``mean_hu`` ([lo, hi), the last one [lo, hi]); None when outside all."""
    last = len(strata) - 1
    for i, (lo, hi) in enumerate(strata):
        if lo <= mean_hu < hi or (i == last and mean_hu == hi):
            return i
    return None


def body_mask(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """The patient's body in a (z, y, x) HU array (bool, same shape).

    HU above ``threshold`` → largest 3D face-connected component (drops the table, cables, noise) →
    holes filled slice by slice (lungs and airways enclosed by the chest wall become body).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise InputError(f"body_mask needs a (z, y, x) array, got shape {hu.shape}")
    labels, n = ndimage.label(hu > threshold)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def _box_sums(image: np.ndarray, size: int) -> np.ndarray:
    """Sums over all size×size windows of a 2D array; element [y, x] is the window starting at (y, x)."""
    c = np.zeros((image.shape[0] + 1, image.shape[1] + 1), dtype=np.float64)
    c[1:, 1:] = np.cumsum(np.cumsum(image, axis=0, dtype=np.float64), axis=1)
    return c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]


def _strata_counts(n: int, n_strata: int, counts: Sequence[int] | None) -> list[int]:
    if counts is not None:
        if len(counts) != n_strata or any(int(c) < 0 for c in counts):
            raise InputError(f"counts needs {n_strata} non-negative numbers (one per stratum), got {list(counts)}")
        return [int(c) for c in counts]
    if n < 0:
        raise InputError(f"the number of ROIs must be >= 0, got {n}")
    return [n // n_strata + (1 if i < n % n_strata else 0) for i in range(n_strata)]


def square_rois(reference: CTVolume | np.ndarray, n: int = 200, size: int = 32, seed: int = 0, *,
                strata: Sequence[Sequence[float]] = HU_STRATA, counts: Sequence[int] | None = None,
                body: np.ndarray | None = None, body_threshold: float = -500.0,
                min_separation: int = 8) -> list[Roi]:
    """Square ROIs of ``size``×``size`` px on single slices, stratified by their mean in the reference.

    Every ROI lies entirely inside ``body`` (default :func:`body_mask` of the reference). Candidate
    positions are all top-left corners whose window is inside the body, grouped by the stratum of the
    window's reference mean (HU). Stratum i gets ``counts[i]`` ROIs (default: ``n`` split equally),
    drawn with ``numpy.random.default_rng(seed)``: first greedily at least ``min_separation`` px apart
    (Chebyshev distance, same slice), then, if a stratum has too few such positions, from the remaining
    positions; a stratum with fewer positions than asked gives what it has (a ``UserWarning`` says so).
    Same inputs and seed → same ROIs. ROIs are ordered by stratum, named ``roi{k:03d}_s{stratum}``.
    """
    hu = reference.hu if isinstance(reference, CTVolume) else np.asarray(reference, dtype=np.float32)
    if hu.ndim != 3:
        raise InputError(f"square_rois needs a (z, y, x) volume, got shape {hu.shape}")
    if size < 2 or size > min(hu.shape[1:]):
        raise InputError(f"ROI size {size} px does not fit slices of {hu.shape[1]}×{hu.shape[2]} px (need >= 2)")
    per_stratum = _strata_counts(n, len(strata), counts)
    body = body_mask(hu, body_threshold) if body is None else np.asarray(body, dtype=bool)
    if body.shape != hu.shape:
        raise InputError(f"body mask is shaped {body.shape}, the reference {hu.shape}")
    area = float(size * size)
    candidates: list[list[np.ndarray]] = [[] for _ in strata]  # per stratum: arrays of (z, y, x, mean)
    edges = np.array([lo for lo, _ in strata] + [strata[-1][1]], dtype=np.float64)
    for z in range(hu.shape[0]):
        inside = _box_sums(body[z].astype(np.float64), size) >= area - 0.5
        if not inside.any():
            continue
        means = _box_sums(hu[z], size) / area
        ys, xs = np.nonzero(inside)
        m = means[ys, xs]
        for i in range(len(strata)):
            sel = (m >= edges[i]) & ((m < edges[i + 1]) | ((i == len(strata) - 1) & (m == edges[i + 1])))
            if sel.any():
                candidates[i].append(np.column_stack([np.full(sel.sum(), z), ys[sel], xs[sel], m[sel]]))
    rng = np.random.default_rng(seed)
    rois: list[Roi] = []
    for i, want in enumerate(per_stratum):
        pool = np.concatenate(candidates[i]) if candidates[i] else np.zeros((0, 4))
        order = rng.permutation(len(pool))
        chosen = _draw(pool[:, :3].astype(np.int64), order, want, min_separation)
        if len(chosen) < want:
            warnings.warn(f"stratum {i} [{strata[i][0]:g}, {strata[i][1]:g}] HU: only {len(chosen)} of {want} "
                          f"ROI positions of {size}×{size} px inside the body", UserWarning, stacklevel=2)
        for k in chosen:
            z, y, x = (int(v) for v in pool[k, :3])
            rois.append(Roi(name=f"roi{len(rois):03d}_s{i}", start=(z, y, x), shape=(1, size, size),
                            stratum=i, reference_mean=float(pool[k, 3])))
    return rois


def _draw(positions: np.ndarray, order: np.ndarray, want: int, min_separation: int) -> list[int]:
    """Indices into ``positions`` (z, y, x): greedily min_separation apart in ``order``, then any others."""
    chosen: list[int] = []
    if want <= 0:
        return chosen
    if min_separation > 0:
        accepted = np.zeros((0, 3), dtype=np.int64)
        for k in order:
            p = positions[k]
            same = accepted[:, 0] == p[0]
            if same.any() and np.min(np.max(np.abs(accepted[same, 1:] - p[1:]), axis=1)) < min_separation:
                continue
            chosen.append(int(k))
            accepted = np.vstack([accepted, p])
            if len(chosen) == want:
                return chosen
    taken = set(chosen)
    for k in order:
        if len(chosen) == want:
            break
        if int(k) not in taken:
            chosen.append(int(k))
    return chosen


def label_rois(labels: np.ndarray, reference: CTVolume | np.ndarray | None = None,
               strata: Sequence[Sequence[float]] = HU_STRATA) -> list[Roi]:
    """One ROI per non-zero label of a (z, y, x) label map (sorted by label, named ``label{v}``).

    With ``reference`` the ROIs carry the reference mean (HU) and its stratum.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"label map must be shaped (z, y, x), got {labels.shape}")
    if not np.allclose(labels, np.round(labels)):
        raise InputError("label map has non-integer values; pass a label map (one integer per segment)")
    labels = np.round(labels).astype(np.int64)
    hu = None if reference is None else (reference.hu if isinstance(reference, CTVolume) else np.asarray(reference))
    rois = []
    objects = ndimage.find_objects(np.where(labels > 0, labels, 0))
    for value, box in enumerate(objects, start=1):
        if box is None:
            continue
        mask = labels[box] == value
        start = tuple(int(s.start) for s in box)
        roi = Roi(name=f"label{value}", start=start, shape=mask.shape, mask=mask, label=value)
        if hu is not None:
            roi.reference_mean = float(roi.values(hu).mean())
            roi.stratum = stratum_of(roi.reference_mean, strata)
        rois.append(roi)
    if not rois:
        raise InputError("label map has no non-zero labels; nothing to measure")
    return rois


def body_roi(reference: CTVolume | np.ndarray, threshold: float = -500.0) -> Roi:
    """The whole body (:func:`body_mask`) of the reference as one ROI named ``body``."""
    hu = reference.hu if isinstance(reference, CTVolume) else np.asarray(reference)
    mask = body_mask(hu, threshold)
    box = ndimage.find_objects(mask.astype(np.int8))
    if not box or box[0] is None:
        raise InputError(f"no voxel above {threshold} HU: cannot find a body in the reference")
    box = box[0]
    roi = Roi(name="body", start=tuple(int(s.start) for s in box), shape=mask[box].shape, mask=mask[box])
    roi.reference_mean = float(roi.values(hu).mean())
    return roi


# --------------------------------------------------------------------------------------------- GOH
def gradient_2d(hu: np.ndarray, spacing_yx: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """In-plane gradient (gy, gx) in HU/mm of a (y, x) or (z, y, x) array, central differences
    (one-sided at the borders), each slice on its own."""
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim == 2:
        gy, gx = np.gradient(hu, *spacing_yx)
        return gy, gx
    if hu.ndim != 3:
        raise InputError(f"gradient_2d needs a (y, x) or (z, y, x) array, got shape {hu.shape}")
    if min(hu.shape[1:]) < 2:
        raise InputError(f"gradient_2d needs at least 2×2 pixels per slice, got {hu.shape[1:]}")
    gy, gx = np.gradient(hu, *spacing_yx, axis=(1, 2))
    return gy, gx


def orientation_histogram(gy: np.ndarray, gx: np.ndarray, mask: np.ndarray | None = None, bins: int = 36,
                          weighting: str = "magnitude") -> tuple[np.ndarray, np.ndarray]:
    """Histogram of gradient orientations: (bin centres in degrees, probabilities summing to 1).

    Orientation θ = atan2(gy, gx) in [0, 360): 0° points along +x (columns), 90° along +y (rows).
    Bin k is centred on k·360/bins degrees. ``weighting``: 'magnitude' (each pixel adds |∇I|) or
    'count' (each pixel with a non-zero gradient adds 1). Pixels without gradient are ignored; when no
    pixel has one the probabilities are all NaN.
    """
    if bins < 2:
        raise InputError(f"GOH needs at least 2 bins, got {bins}")
    if weighting not in ("magnitude", "count"):
        raise InputError(f"GOH weighting must be 'magnitude' or 'count', got {weighting!r}")
    gy, gx = np.asarray(gy, dtype=np.float64), np.asarray(gx, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        gy, gx = gy[mask], gx[mask]
    gy, gx = gy.ravel(), gx.ravel()
    magnitude = np.hypot(gy, gx)
    keep = magnitude > 0
    theta = np.degrees(np.arctan2(gy[keep], gx[keep])) % 360.0
    width = 360.0 / bins
    index = np.floor((theta + width / 2) / width).astype(np.int64) % bins
    weights = magnitude[keep] if weighting == "magnitude" else np.ones(int(keep.sum()))
    hist = np.bincount(index, weights=weights, minlength=bins)
    total = hist.sum()
    centres = np.arange(bins) * width
    return centres, (hist / total if total > 0 else np.full(bins, np.nan))


def _weighted_quantile(centres: np.ndarray, p: np.ndarray, q: float) -> float:
    """Smallest bin centre whose cumulative probability reaches q."""
    return float(centres[min(int(np.searchsorted(np.cumsum(p), q - 1e-12)), len(p) - 1)])


def goh_features(gy: np.ndarray, gx: np.ndarray, mask: np.ndarray | None = None, bins: int = 36,
                 weighting: str = "magnitude") -> dict[str, float]:
    """IBEX-style gradient-orientation-histogram features of one ROI (names in :data:`GOH_FEATURES`).

    On the histogram of :func:`orientation_histogram` (angles θ in degrees, [0, 360)):
    Mean, StandardDeviation (°), Skewness, Kurtosis (Pearson, not excess), Median, Percentile10,
    Percentile90, InterquartileRange (°) treat θ as a linear variable as IBEX does (so they depend on
    where 0° lies); Entropy (bits), Energy (Σp²), MaxProbability, PeakOrientation (° of the largest bin)
    describe the histogram's shape; CircularMean (°), ResultantLength (|Σp·e^{iθ}|: 0 isotropic, 1 one
    direction) and AxialResultantLength (|Σp·e^{2iθ}|: line-like anisotropy, opposite gradients of one
    edge add up) are wrap-around-free. A ROI without any gradient gives NaN for all.
    """
    centres, p = orientation_histogram(gy, gx, mask, bins, weighting)
    if not np.isfinite(p).all():
        return {name: float("nan") for name in GOH_FEATURES}
    mean = float(np.sum(p * centres))
    var = float(np.sum(p * (centres - mean) ** 2))
    sd = np.sqrt(var)
    skew = float(np.sum(p * (centres - mean) ** 3) / sd**3) if sd > 0 else 0.0
    kurt = float(np.sum(p * (centres - mean) ** 4) / var**2) if var > 0 else 0.0
    nz = p[p > 0]
    rad = np.radians(centres)
    first = np.sum(p * np.exp(1j * rad))
    second = np.sum(p * np.exp(2j * rad))
    p10, p25, p50, p75, p90 = (_weighted_quantile(centres, p, q) for q in (0.10, 0.25, 0.50, 0.75, 0.90))
    return {
        "Mean": mean, "StandardDeviation": float(sd), "Skewness": skew, "Kurtosis": kurt, "Median": p50,
        "Percentile10": p10, "Percentile90": p90, "InterquartileRange": p75 - p25,
        "Entropy": float(-np.sum(nz * np.log2(nz))), "Energy": float(np.sum(p**2)), "MaxProbability": float(p.max()),
        "PeakOrientation": float(centres[int(np.argmax(p))]),
        "CircularMean": float(np.degrees(np.angle(first)) % 360.0), "ResultantLength": float(abs(first)),
        "AxialResultantLength": float(abs(second)),
    }


# -------------------------------------------------------------------------------- feature classes
def split_feature_name(name: str) -> tuple[str, str, str]:
    """'<image type>_<class>_<feature>' → (image type, class, feature), e.g. ('wavelet-LH', 'glcm', 'Idm')."""
    parts = name.split("_", 2)
    if len(parts) != 3:
        raise InputError(f"{name!r} is not a feature name of the form <image type>_<class>_<feature>")
    return parts[0], parts[1], parts[2]


def _classes_of(name: str) -> tuple[str, str | None]:
    _, cls, feature = split_feature_name(name)
    native = "shape" if cls.startswith("shape") else cls
    if native not in NATIVE_CLASSES:
        raise InputError(f"{name!r}: unknown feature class {cls!r}")
    if native == "firstorder":
        return native, "IH" if feature in IH_FIRSTORDER else "ID"
    return native, _PAPER_OF_NATIVE.get(native)


def feature_table(names: Sequence[str]) -> pd.DataFrame:
    """One row per feature (index: name): image_type, native_class, paper_class (None for glszm, gldm,
    shape), feature, and in_ccc (False for shape features, which the shared ROI makes identical)."""
    rows = []
    for name in names:
        image_type, _, feature = split_feature_name(name)
        native, paper = _classes_of(name)
        rows.append({"name": name, "image_type": image_type, "native_class": native, "paper_class": paper,
                     "feature": feature, "in_ccc": native != "shape"})
    return pd.DataFrame(rows, columns=["name", "image_type", "native_class", "paper_class", "feature",
                                       "in_ccc"]).set_index("name")


# ------------------------------------------------------------------------------------- extraction
@dataclass
class _Task:
    """One unit of work: a block of voxels and the ROIs inside it (local coordinates)."""

    key: Any
    block: np.ndarray                  # (z, y, x) HU, float32
    spacing: tuple[float, float, float]  # (x, y, z) mm
    rois: list[tuple[int, tuple[int, int, int], np.ndarray]]  # (index, local start, box mask)
    params: RadiomicsParams


def _to_image(array: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing[: image.GetDimension()])
    return image


def _filtered_images(block: np.ndarray, spacing: tuple[float, float, float],
                     params: RadiomicsParams) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """(image type name, filtered (z, y, x) array, settings) for every enabled image type.

    Arrays keep the dtype SimpleITK/PyRadiomics produce from the float32 HU block, so the feature
    classes see exactly what ``RadiomicsFeatureExtractor`` would hand them.

    2D mode: LoG and Gradient run on each slice as a 2D image; the other types run on the block with
    force2D (wavelets in-plane). 3D mode: every type runs on the 3D block.
    """
    from radiomics import imageoperations

    block = np.asarray(block, dtype=np.float32)
    force2d = params.mode == "2d"
    image3d = _to_image(block, spacing)
    full_mask = _to_image(np.ones(block.shape, dtype=np.uint8), spacing)
    for image_type, custom in params.image_types.items():
        kwargs = {**params.settings, **(custom or {})}
        generator = getattr(imageoperations, f"get{image_type}Image")
        if force2d and image_type in _SLICEWISE_2D:
            per_name: dict[str, list[np.ndarray]] = {}
            for z in range(block.shape[0]):
                slice_image = _to_image(block[z], spacing)
                slice_mask = _to_image(np.ones(block.shape[1:], dtype=np.uint8), spacing)
                for out, name, _ in generator(slice_image, slice_mask, **kwargs):
                    per_name.setdefault(name, []).append(sitk.GetArrayFromImage(out))
            for name, arrays in per_name.items():
                if len(arrays) == block.shape[0]:
                    yield name.replace("-3D", "-2D"), np.stack(arrays), kwargs
        else:
            for out, name, _ in generator(image3d, full_mask, **kwargs):
                yield name, sitk.GetArrayFromImage(out), kwargs


def _class_features(image: sitk.Image, mask: sitk.Image, class_name: str, names: list[str] | None,
                    kwargs: dict[str, Any]) -> dict[str, float]:
    from radiomics import getFeatureClasses

    feature_class = getFeatureClasses()[class_name](image, mask, **kwargs)
    for feature in names or []:
        feature_class.enableFeatureByName(feature)
    return {k: float(v) for k, v in feature_class.execute().items()}


def _extract_task(task: _Task) -> tuple[Any, list[tuple[int, dict[str, float]]]]:
    """Features of every ROI in a task (runs in a worker process): shape and GOH on the original
    block, then every feature class on every filtered image, each cropped to the ROI's box."""
    params = task.params
    spacing = task.spacing
    results: dict[int, dict[str, float]] = {index: {} for index, _, _ in task.rois}
    crops = {index: (tuple(slice(s, s + n) for s, n in zip(start, mask.shape)), mask)
             for index, start, mask in task.rois}
    mask_images = {index: _to_image(mask.astype(np.uint8), spacing) for index, (_, mask) in crops.items()}
    with _quiet_radiomics(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # PyRadiomics' 0/0 on degenerate matrices → NaN
        # shape (describes the shared ROI) and GOH (original image) first
        shape_wanted = any(c.startswith("shape") for c in params.feature_classes)
        gy, gx = gradient_2d(task.block, (spacing[1], spacing[0])) if params.goh.get("enabled", True) else (None, None)
        for index, (box, mask) in crops.items():
            if shape_wanted:
                shape_class = "shape2D" if params.mode == "2d" and mask.shape[0] == 1 else "shape"
                names = params.feature_classes.get(shape_class)
                image = _to_image(task.block[box], spacing)
                feats = _class_features(image, mask_images[index], shape_class, names, params.settings)
                results[index].update({f"original_{shape_class}_{k}": v for k, v in feats.items()})
            if gy is not None:
                goh = goh_features(gy[box], gx[box], mask, int(params.goh.get("bins", 36)),
                                   str(params.goh.get("weighting", "magnitude")))
                results[index].update({f"original_goh_{k}": v for k, v in goh.items()})
        texture_classes = [(c, n) for c, n in params.feature_classes.items() if not c.startswith("shape")]
        for image_name, filtered, kwargs in _filtered_images(task.block, spacing, params):
            for index, (box, mask) in crops.items():
                image = _to_image(filtered[box], spacing)
                for class_name, names in texture_classes:
                    feats = _class_features(image, mask_images[index], class_name, names, kwargs)
                    results[index].update({f"{image_name}_{class_name}_{k}": v for k, v in feats.items()})
    return task.key, [(index, results[index]) for index, _, _ in task.rois]


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Environment inherited by worker processes started in the block: one BLAS/OpenMP thread each."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARIABLES}
    os.environ.update({k: "1" for k in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_rois(rois: Sequence[Roi], shape: tuple[int, ...], params: RadiomicsParams, source: str) -> None:
    names = [r.name for r in rois]
    if len(set(names)) != len(names):
        raise InputError("ROI names must be unique")
    min_dims = int(params.settings.get("minimumROIDimensions", 2))
    for roi in rois:
        stop = [s + n for s, n in zip(roi.start, roi.shape)]
        if len(roi.start) != 3 or any(s < 0 for s in roi.start) or any(e > d for e, d in zip(stop, shape)):
            raise InputError(f"ROI {roi.name} (start {roi.start}, shape {roi.shape}) lies outside {source} "
                             f"shaped {shape}")
        mask = roi.box_mask()
        if mask.shape != tuple(roi.shape):
            raise InputError(f"ROI {roi.name}: mask shaped {mask.shape}, box {roi.shape}")
        extent = [int(np.ptp(ix)) + 1 if ix.size else 0 for ix in np.nonzero(mask)]
        if sum(e > 1 for e in extent) < min_dims:
            raise InputError(f"ROI {roi.name} has {mask.sum()} voxels spanning fewer than {min_dims} dimensions; "
                             "too small for texture features")


def _tasks(key: Any, volume: CTVolume, rois: Sequence[Roi], params: RadiomicsParams,
           chunk_size: int) -> list[_Task]:
    """Split one volume's ROIs into tasks. 2D mode: whole slices z0..z1 of ROIs with the same slice
    range, chunked; 3D mode: each ROI's box padded by the 3D margin (clipped to the volume)."""
    hu = volume.hu
    spacing = volume.spacing
    tasks: list[_Task] = []
    if params.mode == "2d":
        groups: dict[tuple[int, int], list[int]] = {}
        for i, roi in enumerate(rois):
            groups.setdefault((roi.start[0], roi.start[0] + roi.shape[0]), []).append(i)
        for (z0, z1), members in sorted(groups.items()):
            block = hu[z0:z1]
            for c in range(0, len(members), chunk_size):
                chunk = members[c:c + chunk_size]
                entries = [(i, (0, rois[i].start[1], rois[i].start[2]), rois[i].box_mask()) for i in chunk]
                tasks.append(_Task((key, z0, c), block, spacing, entries, params))
    else:
        margin_mm = float(params.extraction.get("margin_mm_3d", 12.0))
        pad = [int(np.ceil(margin_mm / s)) for s in (spacing[2], spacing[1], spacing[0])]
        for i, roi in enumerate(rois):
            lo = [max(0, s - p) for s, p in zip(roi.start, pad)]
            hi = [min(d, s + n + p) for s, n, p, d in zip(roi.start, roi.shape, pad, hu.shape)]
            block = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            local = tuple(s - a for s, a in zip(roi.start, lo))
            tasks.append(_Task((key, i), block, spacing, [(i, local, roi.box_mask())], params))
    return tasks


def extract_features_many(volumes: Mapping[str, CTVolume], rois: Sequence[Roi],
                          params: RadiomicsParams | None = None, *, workers: int | None = None,
                          mode: str | None = None, chunk_size: int | None = None,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, pd.DataFrame]:
    """Features of the same ROIs in several volumes (one table per volume name), sharing one worker pool.

    Tables have one row per ROI (index: ROI name, in ``rois`` order) and one column per feature
    (``<image type>_<class>_<feature>``, float64, NaN where PyRadiomics yields no value). ``workers``
    worker processes (default: the parameter file's, 2). ``progress(done, total)`` counts ROIs.
    """
    params = (params or load_params()).with_mode(mode)
    workers = int(params.extraction.get("workers", 2) if workers is None else workers)
    chunk_size = int(params.extraction.get("chunk_size", 10) if chunk_size is None else chunk_size)
    if workers < 1 or chunk_size < 1:
        raise InputError(f"workers and chunk_size must be >= 1, got {workers} and {chunk_size}")
    if not rois:
        raise InputError("no ROIs to extract features from")
    tasks: list[_Task] = []
    for name, volume in volumes.items():
        _check_rois(rois, volume.hu.shape, params, volume.source or name)
        tasks += _tasks(name, volume, rois, params, chunk_size)
    total = len(rois) * len(volumes)
    collected: dict[str, dict[int, dict[str, float]]] = {name: {} for name in volumes}
    done = 0

    def take(result: tuple[Any, list[tuple[int, dict[str, float]]]]) -> None:
        nonlocal done
        key, items = result
        for index, feats in items:
            collected[key[0]][index] = feats
        done += len(items)
        if progress is not None:
            progress(done, total)

    # Always in worker processes, even for one worker: they start with single-threaded BLAS/OpenMP
    # (multi-threaded OpenBLAS makes GLCM's MCC eigenvalues ~20x slower on 2 cores), and the spawn
    # start method is safe in threaded hosts (Slicer, torch).
    with _single_threaded_children(), ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(_extract_task, tasks):
            take(result)
    names = [r.name for r in rois]
    return {name: pd.DataFrame([collected[name][i] for i in range(len(rois))], index=pd.Index(names, name="roi"),
                               dtype=np.float64) for name in volumes}


def extract_features(volume: CTVolume, rois: Sequence[Roi], params: RadiomicsParams | None = None, *,
                     workers: int | None = None, mode: str | None = None, chunk_size: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Features of ``rois`` in one volume: rows = ROIs, columns = features (see :func:`extract_features_many`)."""
    return extract_features_many({"volume": volume}, rois, params, workers=workers, mode=mode,
                                 chunk_size=chunk_size, progress=progress)["volume"]
