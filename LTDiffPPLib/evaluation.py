"""Radiomic evaluation of converted CT images against a real target-kernel reference (issue #5).

:func:`evaluate` puts ROIs at identical coordinates in the reference and every candidate, extracts the
features of :mod:`LTDiffPPLib.radiomics`, and reports Lin's CCC per feature, per class (the paper's six
and PyRadiomics' native ones) and per method, with image-level numbers (HU bias, noise SD, NPS, PSNR,
SSIM), written atomically into one folder:

- ``results.json`` — everything (per feature, per class, per method; software versions; settings; notes)
- ``table.md`` — Table-I-style tables (rows = methods, columns = classes as mean ± std, "all", fraction ≥ 0.85)
- ``ccc_per_feature.csv``, ``relative_error_per_feature.csv``, ``ccc_summary.csv``, ``image_metrics.csv``,
  ``rois.csv``, ``features/<image>.csv`` (ROI × feature tables)
- ``ccc_by_class.png``, ``nps.png``, ``crops.png``

With ``source`` (the unconverted source-kernel image) two baselines are added: the Fourier kernel-ratio
filter calibrated on (source, reference) and applied to the source — in-sample on one patient — and
ComBat on features, cross-fitted over ROIs (each ROI harmonized by a model fitted without it).

The ``ltdiffpp evaluate`` subcommand (:mod:`LTDiffPPLib.cli`) calls :func:`evaluate`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import platform
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .baselines import apply_kernel_ratio, combat_cross_fitted, estimate_kernel_ratio
from .concordance import (ccc_per_feature, hu_bias, noise_sd, psnr, radial_nps, relative_error, ssim,
                          summarize_ccc)
from .errors import InputError
from .io import CTVolume, atomic_output, check_output_path, read_volume
from .radiomics import (HU_STRATA, NATIVE_CLASSES, PAPER_CLASSES, RadiomicsParams, Roi, body_mask, body_roi,
                        extract_features_many, feature_table, label_rois, load_params, square_rois)

__all__ = ["FOURIER", "COMBAT", "EvaluationResult", "class_summary", "evaluate", "format_tables"]

#: names of the baseline rows added when a source image is given
FOURIER = "Fourier ratio (in-sample)"
COMBAT = "ComBat (cross-fitted ROIs)"
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class EvaluationResult:
    """What :func:`evaluate` wrote: the folder, the tables it holds, and the results.json content."""

    out_dir: Path
    ccc: pd.DataFrame                    # features × methods (NaN = undefined)
    summaries: dict[str, pd.DataFrame]   # method → rows paper classes, native classes, all
    image_metrics: pd.DataFrame          # methods × metrics
    results: dict[str, Any]
    tables_markdown: str = ""
    features: dict[str, pd.DataFrame] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ inputs
def _load(item: str | Path | CTVolume, what: str) -> CTVolume:
    if isinstance(item, CTVolume):
        return item
    if isinstance(item, (str, Path)):
        volume = read_volume(item)
        return volume
    raise InputError(f"{what}: expected a path or a CTVolume, got {type(item).__name__}")


def _label(volume: CTVolume, fallback: str) -> str:
    return volume.source or fallback


def _lost_geometry(v: CTVolume) -> bool:
    """A header that carries no geometry: unit spacing, zero origin, identity direction (what ITK writes
    when the information is missing)."""
    return (np.allclose(v.spacing, 1.0, atol=1e-9) and np.allclose(v.origin, 0.0, atol=1e-9)
            and np.allclose(v.direction, _IDENTITY, atol=1e-9))


def _same_geometry(a: CTVolume, b: CTVolume) -> bool:
    return (np.allclose(a.spacing, b.spacing, rtol=1e-3, atol=1e-4) and np.allclose(a.origin, b.origin, atol=1e-2)
            and np.allclose(a.direction, b.direction, atol=1e-4))


def _harmonize(volumes: list[tuple[str, CTVolume]]) -> tuple[list[CTVolume], list[str]]:
    """Check that all volumes share the first one's pixel grid; copy geometry onto lost headers.

    Shapes must match (:class:`InputError` naming both files otherwise). The authoritative geometry is
    the first volume whose header is not 'lost' (see :func:`_lost_geometry`); lost headers get it
    (same pixel grid, no resampling) and a note says so; two real geometries that differ are an error.
    """
    ref_name, ref = volumes[0]
    for name, v in volumes[1:]:
        if v.hu.shape != ref.hu.shape:
            raise InputError(f"{_label(v, name)} is shaped {v.hu.shape} (z, y, x) but the reference "
                             f"{_label(ref, ref_name)} is {ref.hu.shape}; evaluation compares images voxel by "
                             "voxel on one grid (resample them onto the reference first).")
    authority = next(((n, v) for n, v in volumes if not _lost_geometry(v)), None)
    notes, out = [], []
    for name, v in volumes:
        if authority is None or v is authority[1]:
            out.append(v)
            continue
        a_name, a = authority
        if _lost_geometry(v):
            if not _same_geometry(v, a):
                notes.append(f"{_label(v, name)}: header has no geometry (spacing 1 mm, origin 0, identity); "
                             f"treated as the same pixel grid as {_label(a, a_name)} and given its geometry "
                             f"(spacing {', '.join(f'{s:.6g}' for s in a.spacing)} mm); no resampling.")
            out.append(replace(v, spacing=a.spacing, origin=a.origin, direction=a.direction))
        elif not _same_geometry(v, a):
            raise InputError(f"{_label(v, name)} has geometry spacing {v.spacing}, origin {v.origin} but "
                             f"{_label(a, a_name)} has spacing {a.spacing}, origin {a.origin}; the images must lie "
                             "on one grid (same spacing, origin and direction).")
        else:
            out.append(v)
    if authority is None:
        notes.append("no input carries geometry (all say spacing 1 mm); mm-based quantities (LoG sigma, NPS "
                     "frequencies, gradients) assume 1 mm pixels.")
    return out, notes


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def _digest(volume: CTVolume) -> str:
    return hashlib.sha1(np.ascontiguousarray(volume.hu).tobytes()).hexdigest()


# -------------------------------------------------------------------------------------------- ROIs
def _select_rois(reference: CTVolume, mask: Any, rois: int, roi_size: int, seed: int,
                 params: RadiomicsParams, notes: list[str]) -> tuple[list[Roi], str, np.ndarray]:
    strata = [tuple(s) for s in params.rois.get("hu_strata", HU_STRATA)]
    threshold = float(params.rois.get("body_threshold_hu", -500.0))
    body = body_mask(reference.hu, threshold)
    if mask is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            selected = square_rois(reference, rois, roi_size, seed, strata=strata, body=body,
                                   min_separation=int(params.rois.get("min_separation_px", 8)))
        notes += [str(w.message) for w in caught]
        return selected, "square", body
    if isinstance(mask, str) and mask == "body":
        return [body_roi(reference, threshold)], "body", body
    if isinstance(mask, (str, Path)):
        mask = _load(mask, "mask")
    if isinstance(mask, CTVolume):
        harmonized, mask_notes = _harmonize([("reference", reference), ("mask", mask)])
        notes += mask_notes
        array = harmonized[1].hu
    else:
        array = np.asarray(mask)
        if array.shape != reference.hu.shape:
            raise InputError(f"label map is shaped {array.shape}, the reference {reference.hu.shape}")
    return label_rois(array, reference, strata), "labels", body


def _homogeneous_patches(reference: CTVolume, rois: list[Roi], body: np.ndarray, roi_size: int, seed: int,
                         params: RadiomicsParams) -> list[Roi]:
    """Square ROIs of the homogeneous stratum with the lowest detrended reference SD."""
    stratum = int(params.concordance.get("homogeneous_stratum", 2))
    fraction = float(params.concordance.get("homogeneous_fraction", 0.25))
    order = int(params.concordance.get("detrend_order", 2))
    pool = [r for r in rois if r.mask is None and r.stratum == stratum and r.shape[0] == 1]
    if not pool:
        strata = [tuple(s) for s in params.rois.get("hu_strata", HU_STRATA)]
        counts = [40 if i == stratum else 0 for i in range(len(strata))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool = square_rois(reference, 0, roi_size, seed, strata=strata, counts=counts, body=body,
                               min_separation=int(params.rois.get("min_separation_px", 8)))
    if not pool:
        return []
    sds = noise_sd([reference.hu[r.slices][0] for r in pool], order)
    keep = max(1, int(round(fraction * len(pool))))
    return [pool[i] for i in np.argsort(sds, kind="stable")[:keep]]


# -------------------------------------------------------------------------------------- evaluation
def evaluate(reference: str | Path | CTVolume, candidates: Mapping[str, str | Path | CTVolume],
             source: str | Path | CTVolume | None = None, mask: Any = None, rois: int = 200, roi_size: int = 32,
             seed: int = 0, out_dir: str | Path = "ltdiffpp-evaluation", *, workers: int | None = None,
             overwrite: bool = False, params: RadiomicsParams | str | Path | None = None, mode: str | None = None,
             baselines: bool = True, progress: Callable[[int, int], None] | None = None) -> EvaluationResult:
    """Evaluate candidate conversions against a reference image and write the report into ``out_dir``.

    ``reference``: the real target-kernel image; ``candidates``: name → image (path or CTVolume), all on
    the reference's pixel grid (a header without geometry gets the others', see the notes);
    ``source``: the unconverted source image, enabling the Fourier-ratio and ComBat baselines (pass it
    also as a candidate to get an 'unconverted' row); ``mask``: None (``rois`` square ROIs of
    ``roi_size`` px stratified by reference HU, seeded by ``seed``), a label map (path, CTVolume or
    (z, y, x) array: one ROI per label) or ``"body"`` (whole body, one ROI: CCC then needs several
    images and is undefined here); ``params``: parameter file or :class:`RadiomicsParams` (default the
    shipped one); ``mode``: '2d'/'3d' (default: the file's). Raises :class:`InputError` (naming the
    file) for unreadable or mismatched inputs, :class:`OutputError` when ``out_dir`` exists without
    ``overwrite``.
    """
    t_start = time.perf_counter()
    params = params if isinstance(params, RadiomicsParams) else load_params(params)
    params = params.with_mode(mode)
    out_dir = check_output_path(out_dir, overwrite=overwrite, is_dir=True)
    if not candidates:
        raise InputError("evaluate needs at least one candidate (NAME=PATH)")
    reserved = {"reference", "source", FOURIER, COMBAT}
    for name in candidates:
        if not name or name in reserved:
            raise InputError(f"candidate name {name!r} is empty or reserved ({sorted(reserved)})")
    if len({_slug(n) for n in candidates}) != len(candidates):
        raise InputError(f"candidate names must differ in letters/digits: {list(candidates)}")

    loaded = [("reference", _load(reference, "reference"))]
    if source is not None:
        loaded.append(("source", _load(source, "source")))
    loaded += [(name, _load(path, name)) for name, path in candidates.items()]
    harmonized, notes = _harmonize(loaded)
    volumes = dict(zip([n for n, _ in loaded], harmonized))
    ref = volumes["reference"]
    src = volumes.get("source")
    spacing_yx = (ref.spacing[1], ref.spacing[0])

    # the reference's storage floor, applied to the images under test
    floor = None
    rmin = float(ref.hu.min())
    if params.evaluation.get("clip_to_reference_floor", True) and \
            float(np.mean(ref.hu == rmin)) >= float(params.evaluation.get("floor_min_fraction", 0.001)):
        floor = rmin

    def clip(v: CTVolume, name: str) -> CTVolume:
        if floor is None or float(v.hu.min()) >= floor:
            return v
        notes.append(f"{name}: {100 * float(np.mean(v.hu < floor)):.2f} % of voxels below the reference's stored "
                     f"floor ({floor:g} HU) clipped to it.")
        return v.with_hu(np.maximum(v.hu, floor))

    images: dict[str, CTVolume] = {name: clip(volumes[name], name) for name in candidates}
    kinds = {name: "candidate" for name in candidates}
    ratio_info = None
    if src is not None and baselines:
        ev = params.evaluation
        lo, hi = (float(v) for v in ev.get("fourier_band_per_mm", (0.1, 0.5)))
        bin_width = float(ev.get("fourier_bin_width_per_mm", 0.025))
        usable_hi = min(hi, 0.9 * 0.5 / max(spacing_yx))  # 90 % of the coarser axis' Nyquist frequency
        if usable_hi < hi:
            notes.append(f"Fourier ratio: calibration band {lo:g}-{hi:g} mm^-1 capped at {usable_hi:.3f} mm^-1 "
                         f"(90 % of Nyquist for {max(spacing_yx):g} mm pixels).")
        if usable_hi - lo < 2 * bin_width:
            notes.append(f"Fourier ratio baseline skipped: {max(spacing_yx):g} mm pixels leave no usable "
                         f"calibration band above {lo:g} mm^-1.")
        else:
            ratio = estimate_kernel_ratio(src.hu, ref.hu, spacing_yx, band=(lo, usable_hi), bin_width=bin_width,
                                          extrapolation=str(ev.get("fourier_extrapolation", "fit")),
                                          max_gain=float(ev.get("fourier_max_gain", 50.0)))
            ratio_info = ratio.to_dict()
            images[FOURIER] = clip(src.with_hu(apply_kernel_ratio(src.hu, spacing_yx, ratio)), FOURIER)
            kinds[FOURIER] = "baseline"

    roi_list, roi_kind, body = _select_rois(ref, mask, rois, roi_size, seed, params, notes)
    if mask is not None:
        notes.append(f"ROIs from the mask ({roi_kind}, {len(roi_list)}); the square-ROI count is not used.")

    # features: one extraction per distinct image
    to_extract: dict[str, CTVolume] = {}
    key_of: dict[str, str] = {}
    for name, v in [("reference", ref)] + ([("source", src)] if src is not None else []) + list(images.items()):
        digest = _digest(v)
        key_of[name] = digest
        to_extract.setdefault(digest, v)
    t_features = time.perf_counter()
    tables = extract_features_many(to_extract, roi_list, params, workers=workers, progress=progress)
    t_features = time.perf_counter() - t_features
    features = {name: tables[key] for name, key in key_of.items()}
    if src is not None and baselines:
        strata = [r.stratum if r.stratum is not None else -1 for r in roi_list]
        if len(roi_list) >= 4:
            features[COMBAT] = combat_cross_fitted(features["source"], features["reference"], folds=2, seed=seed,
                                                   strata=strata, eb=bool(params.evaluation.get("combat_eb", False)))
            kinds[COMBAT] = "baseline"
        else:
            notes.append("ComBat baseline skipped: it needs at least 4 ROIs.")

    classes = feature_table(list(features["reference"].columns))
    in_ccc = classes.index[classes["in_ccc"]]
    threshold = float(params.concordance.get("ccc_threshold", 0.85))
    min_pairs = int(params.concordance.get("min_pairs", 3))
    methods = list(candidates) + [m for m in (FOURIER, COMBAT) if m in kinds]
    ccc = pd.DataFrame({m: ccc_per_feature(features["reference"][in_ccc], features[m][in_ccc], min_pairs)
                        for m in methods})
    rel = pd.DataFrame({m: relative_error(features["reference"][in_ccc], features[m][in_ccc]) for m in methods})
    summaries = {m: class_summary(ccc[m], classes.loc[in_ccc], threshold) for m in methods}

    homogeneous = _homogeneous_patches(ref, roi_list, body, roi_size, seed, params)
    image_metrics, nps_curves, ref_image = _image_metrics(ref, images, body, homogeneous, roi_list, spacing_yx,
                                                          params)

    results = _results_json(params=params, volumes=volumes, roi_list=roi_list, roi_kind=roi_kind, n_rois=rois,
                            roi_size=roi_size, seed=seed, workers=workers, notes=notes, floor=floor,
                            ratio_info=ratio_info, classes=classes, methods=methods, kinds=kinds, ccc=ccc, rel=rel,
                            summaries=summaries, image_metrics=image_metrics, nps_curves=nps_curves,
                            ref_image=ref_image, threshold=threshold)
    results["timing_s"] = {"features": round(t_features, 2), "total": None,
                           "images_extracted": len(to_extract), "rois": len(roi_list)}
    markdown = format_tables(results)
    with atomic_output(out_dir, overwrite=overwrite, is_dir=True) as tmp:
        results["timing_s"]["total"] = round(time.perf_counter() - t_start, 2)
        _write_outputs(tmp, results, markdown, features, classes, ccc, rel, summaries, image_metrics, roi_list,
                       ref, src, images, nps_curves, homogeneous)
    return EvaluationResult(out_dir=out_dir, ccc=ccc, summaries=summaries, image_metrics=image_metrics,
                            results=results, tables_markdown=markdown, features=features)


def class_summary(ccc: pd.Series, classes: pd.DataFrame, threshold: float, *,
                  image_types: bool = True) -> pd.DataFrame:
    """CCC of each feature summarized per class (``summarize_ccc`` columns). Rows: the paper's six classes
    (Table I order), the native classes, the image types (filters, in extraction order; unless
    ``image_types`` is False), then 'all'; column ``grouping`` says which ('paper', 'native', 'image_type',
    'all'). ``classes`` is :func:`~LTDiffPPLib.radiomics.feature_table` of the features in ``ccc``."""
    paper = summarize_ccc(ccc, classes["paper_class"], threshold)
    native = summarize_ccc(ccc, classes["native_class"], threshold)
    parts = [("paper", paper.loc[[c for c in PAPER_CLASSES if c in paper.index]]),
             ("native", native.loc[[c for c in NATIVE_CLASSES if c in native.index]])]
    if image_types:
        parts.append(("image_type", summarize_ccc(ccc, classes["image_type"], threshold).drop(index="all")))
    parts.append(("all", native.loc[["all"]]))
    frame = pd.concat([p for _, p in parts])
    frame.insert(0, "grouping", [g for g, p in parts for _ in range(len(p))])
    return frame


def _image_metrics(ref: CTVolume, images: dict[str, CTVolume], body: np.ndarray, homogeneous: list[Roi],
                   rois: list[Roi], spacing_yx: tuple[float, float], params: RadiomicsParams):
    """Per image: HU bias in the body and per HU stratum (mean over the stratum's ROIs of candidate −
    reference ROI mean), noise SD and NPS in the homogeneous ROIs (and their ratio / mean |log| error
    to the reference's), PSNR and SSIM in the body. Returns (table, NPS curves, reference numbers)."""
    order = int(params.concordance.get("detrend_order", 2))
    sigma = float(params.evaluation.get("ssim_sigma_px", 1.5))
    data_range = float(ref.hu[body].max() - ref.hu[body].min()) if body.any() else None
    mask = body if body.any() else None
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ref_image: dict[str, Any] = {"noise_sd_hu": float("nan"), "n_homogeneous_rois": len(homogeneous)}
    if homogeneous:
        patches = [ref.hu[r.slices][0] for r in homogeneous]
        ref_image["noise_sd_hu"] = float(np.median(noise_sd(patches, order)))
        curves["reference"] = radial_nps(patches, spacing_yx, order)
    rows = {}
    for name, v in images.items():
        row = {"hu_bias_hu": hu_bias(ref.hu, v.hu, mask), "noise_sd_hu": float("nan"),
               "noise_sd_ratio": float("nan"), "nps_log_error": float("nan"),
               "psnr_db": psnr(ref.hu, v.hu, mask, data_range), "ssim": ssim(ref.hu, v.hu, mask, data_range, sigma)}
        for k in sorted({r.stratum for r in rois if r.stratum is not None}):
            members = [r for r in rois if r.stratum == k]
            row[f"hu_bias_stratum_{k}_hu"] = float(np.mean([r.values(v.hu).mean() - r.values(ref.hu).mean()
                                                            for r in members]))
        if homogeneous:
            patches = [v.hu[r.slices][0] for r in homogeneous]
            row["noise_sd_hu"] = float(np.median(noise_sd(patches, order)))
            ref_sd = ref_image["noise_sd_hu"]
            row["noise_sd_ratio"] = row["noise_sd_hu"] / ref_sd if ref_sd else math.nan
            f, nps = radial_nps(patches, spacing_yx, order)
            curves[name] = (f, nps)
            rf = curves["reference"][1]
            ok = (f > 0) & (nps > 0) & (rf > 0)
            row["nps_log_error"] = float(np.mean(np.abs(np.log(nps[ok] / rf[ok])))) if ok.any() else math.nan
        rows[name] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    return frame, curves, ref_image


# ------------------------------------------------------------------------------------------ output
def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, numpy scalars → Python, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _software() -> dict[str, str]:
    import pywt
    import radiomics
    import scipy
    import SimpleITK as sitk

    return {"ltdiffpp": __version__, "pyradiomics": str(radiomics.__version__), "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__, "SimpleITK": sitk.Version_VersionString(),
            "PyWavelets": pywt.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _results_json(*, params: RadiomicsParams, volumes: dict[str, CTVolume], roi_list: list[Roi], roi_kind: str,
                  n_rois: int, roi_size: int, seed: int, workers: int | None, notes: list[str], floor: float | None,
                  ratio_info: dict | None, classes: pd.DataFrame, methods: list[str], kinds: dict[str, str],
                  ccc: pd.DataFrame, rel: pd.DataFrame, summaries: dict[str, pd.DataFrame],
                  image_metrics: pd.DataFrame, nps_curves: dict, ref_image: dict, threshold: float) -> dict[str, Any]:
    """The results.json content (JSON-safe: NaN → null)."""
    strata = [tuple(s) for s in params.rois.get("hu_strata", HU_STRATA)]
    obtained = [sum(1 for r in roi_list if r.stratum == i) for i in range(len(strata))]
    requested = [n_rois // len(strata) + (1 if i < n_rois % len(strata) else 0) for i in range(len(strata))]
    inputs = {name: {"path": v.source, "shape_zyx": list(v.hu.shape), "spacing_xyz_mm": list(v.spacing)}
              for name, v in volumes.items()}
    method_entries = {}
    for m in methods:
        summary = summaries[m]
        method_entries[m] = {
            "kind": kinds[m],
            "path": volumes[m].source if m in volumes else None,
            "summary": {grouping: {cls: summary.loc[cls].drop("grouping").to_dict()
                                   for cls in summary.index[summary["grouping"] == grouping]}
                        for grouping in ("paper", "native", "image_type", "all")},
            "ccc": ccc[m].to_dict(),
            "relative_error": rel[m].to_dict(),
            "image": image_metrics.loc[m].to_dict() if m in image_metrics.index else None,
        }
    descriptions = {FOURIER: "source filtered by sqrt(P_reference/P_source) estimated on the same source/reference "
                             "pair (in-sample on one patient)",
                    COMBAT: "source features harmonized onto the reference features by ComBat (Johnson 2007; "
                            "location/scale, empirical Bayes per the parameter file's evaluation.combat_eb; reference "
                            "batch = reference), 2-fold cross-fitted over ROIs of this image"}
    for m, d in descriptions.items():
        if m in method_entries:
            method_entries[m]["description"] = d
    return _clean({
        "format": "ltdiffpp-evaluation/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "software": _software(),
        "settings": {"rois": n_rois, "roi_size_px": roi_size, "seed": seed, "workers": workers,
                     "mode": params.mode, "ccc_threshold": threshold, "reference_floor_hu": floor,
                     "parameters": params.to_dict()},
        "inputs": inputs,
        "notes": notes,
        "rois": {"kind": roi_kind, "hu_strata": [list(s) for s in strata], "requested_per_stratum": requested
                 if roi_kind == "square" else None, "obtained_per_stratum": obtained, "count": len(roi_list),
                 "list": [r.to_dict() for r in roi_list]},
        "features": {"n_total": int(len(classes)), "n_in_ccc": int(classes["in_ccc"].sum()),
                     "n_per_native_class": classes["native_class"].value_counts().to_dict(),
                     "n_per_paper_class": classes["paper_class"].value_counts().to_dict(),
                     "classes": {name: {"native": row.native_class, "paper": row.paper_class,
                                        "image_type": row.image_type, "in_ccc": bool(row.in_ccc)}
                                 for name, row in classes.iterrows()}},
        "kernel_ratio": ratio_info,
        "reference_image": ref_image,
        "nps": {name: {"frequency_per_mm": f, "nps_hu2_mm2": p} for name, (f, p) in nps_curves.items()},
        "methods": method_entries,
    })


def _fmt(mean: Any, std: Any) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def format_tables(results: dict[str, Any]) -> str:
    """The Markdown report of a results.json dictionary: Table-I-style paper classes, native classes,
    image metrics, and the notes. Numbers are results.json's, rounded to 3 decimals."""
    methods = results["methods"]
    rois = results["rois"]
    lines = [f"Reference: `{results['inputs']['reference']['path'] or 'reference'}` — {rois['count']} ROIs "
             f"({rois['kind']}; per HU stratum {rois['obtained_per_stratum']}), "
             f"{results['features']['n_in_ccc']} features in CCC "
             f"(of {results['features']['n_total']}; shape excluded), mode {results['settings']['mode']}.", ""]
    thr = results["settings"]["ccc_threshold"]

    def table(title: str, grouping: str, classes: list[str]) -> None:
        lines.append(f"**{title}** — Lin's CCC, mean ± SD over the features in each column")
        lines.append("")
        lines.append("| Method | " + " | ".join(classes) + f" | all | CCC ≥ {thr:g} |")
        lines.append("|---" * (len(classes) + 3) + "|")
        for m, entry in methods.items():
            cells = []
            for c in classes:
                s = entry["summary"][grouping].get(c)
                cells.append(_fmt(s["mean"], s["std"]) if s else "n/a")
            a = entry["summary"]["all"]["all"]
            frac = "n/a" if a["frac_ge"] is None else f"{a['frac_ge']:.3f}"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(a['mean'], a['std'])} | {frac} |")
        lines.append("")

    first = next(iter(methods.values()))
    table("Paper classes (Table I layout)", "paper", [c for c in PAPER_CLASSES if c in first["summary"]["paper"]])
    table("PyRadiomics native classes", "native", [c for c in NATIVE_CLASSES if c in first["summary"]["native"]])
    table("By image type (filter)", "image_type", list(first["summary"]["image_type"]))
    undefined = {m: e["summary"]["all"]["all"]["n_undefined"] for m, e in methods.items()}
    if any(undefined.values()):
        lines.append("Undefined CCC (feature constant and equal in both images; excluded above): "
                     + ", ".join(f"{m}: {n}" for m, n in undefined.items()) + ".")
        lines.append("")
    ref_sd = results["reference_image"]["noise_sd_hu"]
    lines.append("**Image metrics** — inside the body mask; noise in the "
                 f"{results['reference_image']['n_homogeneous_rois']} most homogeneous soft-tissue ROIs "
                 f"(reference noise SD {'n/a' if ref_sd is None else f'{ref_sd:.1f}'} HU)")
    lines.append("")
    lines.append("| Method | HU bias | noise SD (HU) | noise SD / ref | NPS log error | PSNR (dB) | SSIM |")
    lines.append("|---|---|---|---|---|---|---|")

    def num(v: Any, digits: int) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    for m, entry in methods.items():
        img = entry["image"]
        if img is None:
            lines.append(f"| {m} | (features only) | | | | | |")
            continue
        lines.append(f"| {m} | {num(img['hu_bias_hu'], 2)} | {num(img['noise_sd_hu'], 1)} | "
                     f"{num(img['noise_sd_ratio'], 3)} | {num(img['nps_log_error'], 3)} | {num(img['psnr_db'], 2)} | "
                     f"{num(img['ssim'], 4)} |")
    lines.append("")
    if results["notes"]:
        lines.append("Notes:")
        lines += [f"- {n}" for n in results["notes"]]
        lines.append("")
    return "\n".join(lines)


def _write_outputs(folder: Path, results: dict[str, Any], markdown: str, features: dict[str, pd.DataFrame],
                   classes: pd.DataFrame, ccc: pd.DataFrame, rel: pd.DataFrame, summaries: dict[str, pd.DataFrame],
                   image_metrics: pd.DataFrame, roi_list: list[Roi], ref: CTVolume, src: CTVolume | None,
                   images: dict[str, CTVolume], nps_curves: dict, homogeneous: list[Roi]) -> None:
    """Every output file into ``folder`` (the temporary folder of :func:`atomic_output`)."""
    (folder / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False), encoding="utf-8")
    (folder / "table.md").write_text(markdown, encoding="utf-8")
    meta = classes.loc[ccc.index, ["native_class", "paper_class"]]
    pd.concat([meta, ccc], axis=1).to_csv(folder / "ccc_per_feature.csv", index_label="feature")
    pd.concat([meta, rel], axis=1).to_csv(folder / "relative_error_per_feature.csv", index_label="feature")
    long = pd.concat([s.assign(method=m).rename_axis("class").reset_index() for m, s in summaries.items()])
    long[["method", "grouping", "class", "mean", "std", "n", "n_undefined", "frac_ge"]].to_csv(
        folder / "ccc_summary.csv", index=False)
    image_metrics.to_csv(folder / "image_metrics.csv", index_label="method")
    pd.DataFrame([r.to_dict() for r in roi_list]).to_csv(folder / "rois.csv", index=False)
    (folder / "features").mkdir()
    for name, table in features.items():
        table.to_csv(folder / "features" / f"{_slug(name)}.csv", index_label="roi")
    _plot_ccc(folder / "ccc_by_class.png", summaries)
    if nps_curves:
        _plot_nps(folder / "nps.png", nps_curves)
    shown_src = None if src is None or any(np.array_equal(src.hu, v.hu) for v in images.values()) else src
    _plot_crops(folder / "crops.png", ref, shown_src, images, roi_list, homogeneous,
                int(results["settings"]["parameters"]["evaluation"].get("crop_px", 96)))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _plot_ccc(path: Path, summaries: dict[str, pd.DataFrame]) -> None:
    fig = _figure(12, 4.8)
    groups = [("paper", [c for c in PAPER_CLASSES] + ["all"]), ("native", [c for c in NATIVE_CLASSES if c != "shape"])]
    methods = list(summaries)
    width = 0.8 / max(len(methods), 1)
    for k, (grouping, classes) in enumerate(groups):
        ax = fig.add_subplot(1, 2, k + 1)
        x = np.arange(len(classes))
        for j, m in enumerate(methods):
            s = summaries[m]
            means = [float(s.loc[c, "mean"]) if c in s.index else np.nan for c in classes]
            stds = [float(s.loc[c, "std"]) if c in s.index else np.nan for c in classes]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=m)
        ax.set_xticks(x, classes)
        ax.set_ylim(-0.2 if any((s["mean"] < 0).any() for s in summaries.values()) else 0, 1.05)
        ax.axhline(0.85, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("Lin's CCC (mean ± SD over features)")
        ax.set_title("paper classes" if grouping == "paper" else "PyRadiomics classes")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)


def _plot_nps(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, (f, p) in curves.items():
        ax.semilogy(f, p, lw=2.2 if name == "reference" else 1.2, color="black" if name == "reference" else None,
                    label=name)
    ax.set_xlabel("spatial frequency (mm⁻¹)")
    ax.set_ylabel("NPS (HU²·mm²)")
    ax.set_title("radial NPS in homogeneous soft-tissue ROIs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _plot_crops(path: Path, ref: CTVolume, src: CTVolume | None, images: dict[str, CTVolume], rois: list[Roi],
                homogeneous: list[Roi], size: int) -> None:
    """Crops of every image side by side: a soft-tissue region (W400/L40) and, when there is a lung ROI,
    a lung region (W1500/L−600), both at identical coordinates."""
    panels = [("reference", ref.hu)] + ([("source", src.hu)] if src is not None else []) + \
        [(n, v.hu) for n, v in images.items()]
    rows = [(homogeneous[0] if homogeneous else rois[0], (-160, 240), "W400/L40")]
    lung = next((r for r in rois if r.stratum == 0), None)
    if lung is not None:
        rows.append((lung, (-1350, 150), "W1500/L-600"))
    ny, nx = ref.hu.shape[1:]
    size = min(size, ny, nx)
    fig = _figure(2.2 * len(panels), 2.4 * len(rows) + 0.3)
    for i, (centre_roi, (vmin, vmax), window) in enumerate(rows):
        z = centre_roi.start[0] + centre_roi.shape[0] // 2
        y0 = int(np.clip(centre_roi.start[1] + centre_roi.shape[1] // 2 - size // 2, 0, ny - size))
        x0 = int(np.clip(centre_roi.start[2] + centre_roi.shape[2] // 2 - size // 2, 0, nx - size))
        for k, (name, hu) in enumerate(panels):
            ax = fig.add_subplot(len(rows), len(panels), i * len(panels) + k + 1)
            ax.imshow(hu[z, y0:y0 + size, x0:x0 + size], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{name}\nz {z}, y {y0}, x {x0}, {window}" if k == 0 else name, fontsize=7)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------------------------- CLI
