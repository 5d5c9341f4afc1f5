"""Paired-kernel datasets: the same scan with a source (non-standard) and a target (standard) kernel.

Three builders produce one format:

- :func:`pair_from_dicom` — a patient folder holding two series of the same scan with different
  kernels (e.g. Br40 and Bl64), slices paired by position along the slice normal;
- :func:`pair_from_files` — two image files (NRRD/MHA/NIfTI) of the same scan;
- :func:`pairs_from_simulation` — any CT volume or digital phantom, scanned by
  :mod:`LTDiffPPLib.simulation` at one or more doses and reconstructed with both kernels;
- :func:`scans_from_simulation` + :func:`write_multikernel_dataset` — the same, reconstructed with
  any number of kernels: a multi-kernel dataset (format version 2) from which every ordered pair of its
  kernels can be drawn, as the kernel-conditioned model is trained.

A dataset is a folder::

    manifest.json          {"format": "ltdiffpp-dataset", "format_version": 1, "source_kernel", "target_kernel",
                            "split": {...}, "pairs": [{"id", "patient", "split", "kind", "shape" (z, y, x),
                            "spacing_mm" (x, y, z), "dose", "thickness_mm", "source", "target", "provenance"}]}
    arrays/<id>_source.npy int16 HU, (z, y, x) — open with np.load(mmap_mode="r") for random patch access
    arrays/<id>_target.npy

A multi-kernel dataset (``format_version`` 2) has ``"kernels": [names]`` and ``"scans"`` instead of
``"pairs"``, each with ``"images": {kernel: "arrays/<id>_<kernel>.npy"}`` in place of source/target.

Train/validation/test subsets are assigned by patient (never by slice or by volume of one patient), so
no patient's anatomy is seen in two subsets. The folder is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io import CTVolume, atomic_output, list_dicom_series, read_dicom_series, read_image
from .simulation import ScanProtocol, simulate

FORMAT = "ltdiffpp-dataset"
FORMAT_VERSION = 1
MULTIKERNEL_VERSION = 2
SPLITS = ("train", "val", "test")
_POS_TOL_MM = 0.01


@dataclass
class Pair:
    """One paired volume: ``source`` and ``target`` on the same grid, with provenance."""

    patient: str
    source: CTVolume
    target: CTVolume
    kind: str  # "dicom", "files" or "simulated"
    source_kernel: str
    target_kernel: str
    dose: float | None = None
    thickness_mm: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ geometry


def _slice_positions(v: CTVolume) -> np.ndarray:
    """Position of each slice along the slice normal (mm)."""
    normal = np.array(v.direction).reshape(3, 3)[:, 2]
    return float(np.dot(v.origin, normal)) + np.arange(v.hu.shape[0]) * v.spacing[2]


def check_same_grid(a: CTVolume, b: CTVolume, *, what: str = "pair") -> None:
    """Refuse two volumes whose voxels are not on the same grid; the message says what differs."""
    problems = []
    if a.hu.shape != b.hu.shape:
        problems.append(f"shape {a.hu.shape} vs {b.hu.shape} (z, y, x)")
    if not np.allclose(a.spacing, b.spacing, atol=1e-3):
        problems.append(f"spacing {a.spacing} vs {b.spacing} mm")
    if not np.allclose(a.origin, b.origin, atol=_POS_TOL_MM):
        problems.append(f"origin {a.origin} vs {b.origin} mm")
    if not np.allclose(a.direction, b.direction, atol=1e-4):
        problems.append("orientation (direction cosines) differs")
    if problems:
        raise InputError(f"{what}: {a.source or 'source'} and {b.source or 'target'} are not on the same voxel grid — "
                         + "; ".join(problems))


# ------------------------------------------------------------------------------------------ builders


def _match_kernel(series, kernel: str, folder: Path):
    hits = [s for s in series if kernel.lower() in s.kernel.lower()]
    if len(hits) != 1:
        listing = "; ".join(f"{s.series_uid or '(empty UID)'}: kernel '{s.kernel}', {s.n_files} files" for s in series)
        state = "no series" if not hits else f"{len(hits)} series"
        raise InputError(f"{folder}: {state} with kernel matching {kernel!r} (series: {listing})")
    return hits[0]


def pair_from_dicom(folder: str | os.PathLike, source_kernel: str, target_kernel: str) -> Pair:
    """Pair two series of one scan in ``folder``, told apart by their ConvolutionKernel (substring match).

    Slices are paired by position along the slice normal; the in-plane geometry must be identical.
    When one series covers more slices than the other, the common slices are kept (both must lie on
    the same slice positions); series with no common slice, or different pixel grids, are refused.
    """
    folder = Path(folder)
    series = list_dicom_series(folder)
    s_info, t_info = _match_kernel(series, source_kernel, folder), _match_kernel(series, target_kernel, folder)
    if s_info.series_uid == t_info.series_uid:
        raise InputError(f"{folder}: kernels {source_kernel!r} and {target_kernel!r} match the same series")
    src = read_dicom_series(folder, s_info.series_uid)
    tgt = read_dicom_series(folder, t_info.series_uid)
    ps, pt = _slice_positions(src), _slice_positions(tgt)
    common_s = [i for i, p in enumerate(ps) if np.any(np.abs(pt - p) < _POS_TOL_MM)]
    common_t = [int(np.argmin(np.abs(pt - ps[i]))) for i in common_s]
    if not common_s:
        raise InputError(f"{folder}: series {s_info.series_uid} (slices at {ps[0]:.2f}…{ps[-1]:.2f} mm) and "
                         f"{t_info.series_uid} (at {pt[0]:.2f}…{pt[-1]:.2f} mm) share no slice position")
    if np.any(np.diff(common_s) != 1) or np.any(np.diff(common_t) != 1):
        raise InputError(f"{folder}: the two series' slices interleave instead of coinciding (different slice "
                         f"spacing {src.spacing[2]:.3f} vs {tgt.spacing[2]:.3f} mm); they are not one scan")
    src, tgt = _slab(src, common_s), _slab(tgt, common_t)
    check_same_grid(src, tgt, what=f"DICOM pair in {folder}")
    header = src.dicom_header
    patient = str(header.get("PatientID", "")) if header is not None else ""
    return Pair(patient or folder.name, src, tgt, "dicom", s_info.kernel, t_info.kernel,
                thickness_mm=float(header.get("SliceThickness") or src.spacing[2]) if header is not None else None,
                provenance={"folder": str(folder), "source_series": s_info.series_uid,
                            "target_series": t_info.series_uid, "slices": len(common_s)})


def _slab(v: CTVolume, idx: list[int]) -> CTVolume:
    normal = np.array(v.direction).reshape(3, 3)[:, 2]
    origin = tuple(np.array(v.origin) + idx[0] * v.spacing[2] * normal)
    return CTVolume(hu=v.hu[idx[0] : idx[-1] + 1], spacing=v.spacing, origin=origin, direction=v.direction,
                    dicom_header=v.dicom_header, source=v.source)


def pair_from_files(
    source: str | os.PathLike,
    target: str | os.PathLike,
    source_kernel: str,
    target_kernel: str,
    *,
    patient: str | None = None,
    assume_same_grid: bool = False,
) -> Pair:
    """Pair two image files of the same scan. ``assume_same_grid`` copies the source's geometry onto the
    target when only the metadata disagrees (e.g. a file that lost its spacing); the shapes must match."""
    src, tgt = read_image(source), read_image(target)
    if assume_same_grid and src.hu.shape == tgt.hu.shape:
        tgt = src.with_hu(tgt.hu)
        tgt.source = str(target)
    check_same_grid(src, tgt, what="file pair")
    return Pair(patient or Path(source).name.split(".")[0], src, tgt, "files", source_kernel, target_kernel,
                provenance={"source_file": str(source), "target_file": str(target),
                            "geometry_copied_from_source": assume_same_grid})


def pairs_from_simulation(
    volume: CTVolume,
    patient: str,
    source_kernel: str,
    target_kernel: str,
    *,
    doses: Sequence[float] = (2.0e5,),
    thickness_mm: float | None = None,
    views: int = 720,
    seed: int = 0,
    workers: int | None = None,
) -> list[Pair]:
    """One simulated pair per dose: the same noisy scan reconstructed with both kernels."""
    pairs = []
    for j, dose in enumerate(doses):
        res = simulate(volume, [source_kernel, target_kernel], protocol=ScanProtocol(dose=dose, views=views),
                       thickness_mm=thickness_mm, seed=seed + 1000 * j, workers=workers)
        pairs.append(Pair(patient, res.volumes[source_kernel], res.volumes[target_kernel], "simulated",
                          source_kernel, target_kernel, dose=dose, thickness_mm=thickness_mm,
                          provenance=dict(res.provenance)))
    return pairs


@dataclass
class Scan:
    """One scan reconstructed with several kernels: ``volumes`` maps kernel name → volume, all on one grid."""

    patient: str
    volumes: dict[str, CTVolume]
    kind: str  # "simulated"
    dose: float | None = None
    thickness_mm: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def scans_from_simulation(
    volume: CTVolume,
    patient: str,
    kernels: Sequence[str],
    *,
    doses: Sequence[float] = (2.0e5,),
    thickness_mm: float | None = None,
    views: int = 720,
    seed: int = 0,
    workers: int | None = None,
) -> list[Scan]:
    """One simulated scan per dose, its noisy raw data reconstructed with every kernel in ``kernels``.
    With the same seed, the images equal those :func:`pairs_from_simulation` makes for any two of them."""
    scans = []
    for j, dose in enumerate(doses):
        res = simulate(volume, list(kernels), protocol=ScanProtocol(dose=dose, views=views),
                       thickness_mm=thickness_mm, seed=seed + 1000 * j, workers=workers)
        scans.append(Scan(patient, dict(res.volumes), "simulated", dose=dose, thickness_mm=thickness_mm,
                          provenance=dict(res.provenance)))
    return scans


# ------------------------------------------------------------------------------------ split & writing


def split_by_patient(patients: Iterable[str], *, val: float = 0.1, test: float = 0.1, seed: int = 0) -> dict[str, str]:
    """Assign each patient to train/val/test (seeded). With ≥ 3 patients every subset gets at least one."""
    unique = sorted(set(patients))
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise InputError(f"validation and test fractions must be in [0, 1) and sum below 1 (got {val}, {test})")
    order = list(np.random.default_rng(seed).permutation(len(unique)))
    n = len(unique)
    n_test = max(1, round(test * n)) if test > 0 and n >= 3 else 0
    n_val = max(1, round(val * n)) if val > 0 and n >= 3 else 0
    out = {}
    for rank, i in enumerate(order):
        out[unique[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def _patient_splits(patients: list[str], fixed: Mapping[str, str] | None, val: float, test: float,
                    seed: int) -> dict[str, str]:
    """Patient → subset: the ``fixed`` ones as given, the others by :func:`split_by_patient`."""
    bad = {p: v for p, v in (fixed or {}).items() if v not in SPLITS}
    if bad:
        raise InputError(f"unknown subsets {bad}; use one of {', '.join(SPLITS)}")
    split = split_by_patient((p for p in patients if p not in (fixed or {})), val=val, test=test, seed=seed)
    split.update(fixed or {})
    return split


def write_dataset(
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike,
    *,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    splits: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``pairs`` as a dataset folder (atomically); returns its path.

    Patients are split at random by the ``val``/``test`` fractions, except those named in ``splits``
    (patient → "train"/"val"/"test"), e.g. to hold out a scanner or a body region on purpose.
    """
    if not pairs:
        raise InputError("no pairs to write")
    kernels = {(p.source_kernel, p.target_kernel) for p in pairs}
    if len({k for k, _ in kernels}) > 1 and any(p.kind == "simulated" for p in pairs):
        raise InputError(f"simulated pairs must share one source and one target kernel, got {sorted(kernels)}")
    split = _patient_splits([p.patient for p in pairs], splits, val, test, seed)
    out_dir = Path(out_dir)
    entries = []
    with atomic_output(out_dir, overwrite=overwrite, is_dir=True) as tmp:
        (tmp / "arrays").mkdir()
        for i, p in enumerate(pairs):
            check_same_grid(p.source, p.target, what=f"pair {i} (patient {p.patient})")
            pid = f"{i:05d}_{_safe(p.patient)}"
            for role, vol in (("source", p.source), ("target", p.target)):
                np.save(tmp / "arrays" / f"{pid}_{role}.npy", _to_int16(vol.hu))
            entries.append({
                "id": pid, "patient": p.patient, "split": split[p.patient], "kind": p.kind,
                "source_kernel": p.source_kernel, "target_kernel": p.target_kernel, **_grid_fields(p.source),
                "dose": p.dose, "thickness_mm": p.thickness_mm,
                "source": f"arrays/{pid}_source.npy", "target": f"arrays/{pid}_target.npy",
                "provenance": p.provenance,
            })
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "source_kernel": pairs[0].source_kernel, "target_kernel": pairs[0].target_kernel,
            "split": {"val": val, "test": test, "seed": seed, "by": "patient", "fixed": dict(splits or {})},
            "pairs": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def write_multikernel_dataset(
    scans: Sequence[Scan],
    out_dir: str | os.PathLike,
    *,
    splits: Mapping[str, str] | None = None,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``scans`` (every one with the same kernels) as a multi-kernel dataset folder, atomically;
    subsets by patient as in :func:`write_dataset`. Returns its path."""
    if not scans:
        raise InputError("no scans to write")
    kernels = list(scans[0].volumes)
    if len(kernels) < 2:
        raise InputError(f"a multi-kernel dataset needs two or more kernels, got {kernels}")
    odd = [s.patient for s in scans if list(s.volumes) != kernels]
    if odd:
        raise InputError(f"every scan must hold the kernels {kernels}; {odd[:3]} do not")
    split = _patient_splits([s.patient for s in scans], splits, val, test, seed)
    out_dir = Path(out_dir)
    entries = []
    with atomic_output(out_dir, overwrite=overwrite, is_dir=True) as tmp:
        (tmp / "arrays").mkdir()
        for i, sc in enumerate(scans):
            first = sc.volumes[kernels[0]]
            for k in kernels[1:]:
                check_same_grid(first, sc.volumes[k], what=f"scan {i} (patient {sc.patient}, kernel {k})")
            sid = f"{i:05d}_{_safe(sc.patient)}"
            images = {}
            for k in kernels:
                images[k] = f"arrays/{sid}_{_safe(k)}.npy"
                np.save(tmp / images[k], _to_int16(sc.volumes[k].hu))
            entries.append({
                "id": sid, "patient": sc.patient, "split": split[sc.patient], "kind": sc.kind, **_grid_fields(first),
                "dose": sc.dose, "thickness_mm": sc.thickness_mm, "images": images, "provenance": sc.provenance,
            })
        manifest = {
            "format": FORMAT, "format_version": MULTIKERNEL_VERSION, "kernels": kernels,
            "split": {"val": val, "test": test, "seed": seed, "by": "patient", "fixed": dict(splits or {})},
            "scans": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def _grid_fields(vol: CTVolume) -> dict[str, list]:
    """The manifest's record of an entry's voxel grid: shape (z, y, x), spacing (x, y, z) mm, origin, direction."""
    return {"shape": list(vol.hu.shape), "spacing_mm": list(vol.spacing), "origin_mm": list(vol.origin),
            "direction": list(vol.direction)}


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]
    return keep or hashlib.sha1(name.encode()).hexdigest()[:8]


def _to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


# ------------------------------------------------------------------------------------------- reading


@dataclass
class Dataset:
    """A dataset folder: its manifest, and memory-mapped access to each entry's arrays. The entries are
    pairs (format version 1) or multi-kernel scans (version 2); either way ``pairs`` lists them."""

    root: Path
    manifest: dict[str, Any]

    @property
    def multikernel(self) -> bool:
        return self.manifest.get("format_version") == MULTIKERNEL_VERSION

    @property
    def kernels(self) -> list[str]:
        """The kernels of every entry: [source, target] of a paired dataset, all of a multi-kernel one."""
        if self.multikernel:
            return list(self.manifest["kernels"])
        return [self.manifest["source_kernel"], self.manifest["target_kernel"]]

    @property
    def pairs(self) -> list[dict[str, Any]]:
        return self.manifest["scans" if self.multikernel else "pairs"]

    def subset(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; choose one of {SPLITS}")
        return [p for p in self.pairs if p["split"] == split]

    def arrays(self, pair: dict[str, Any], kernels: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) int16 HU arrays (z, y, x), memory-mapped read-only. ``kernels`` = (source,
        target) names which of a multi-kernel scan's images to pair (required there)."""
        if not self.multikernel:
            if kernels is not None and tuple(kernels) != tuple(self.kernels):
                raise InputError(f"{self.root}: a {self.kernels[0]} → {self.kernels[1]} dataset has no {kernels} pair")
            return (np.load(self.root / pair["source"], mmap_mode="r"), np.load(self.root / pair["target"], mmap_mode="r"))
        if kernels is None or any(k not in pair["images"] for k in kernels):
            raise InputError(f"{self.root}: name two of the multi-kernel dataset's kernels {self.kernels} (got {kernels})")
        return self.image(pair, kernels[0]), self.image(pair, kernels[1])

    def image(self, scan: dict[str, Any], kernel: str) -> np.ndarray:
        """One kernel's int16 HU array (z, y, x) of a multi-kernel scan, memory-mapped read-only."""
        if not self.multikernel or kernel not in scan["images"]:
            raise InputError(f"{self.root}: no {kernel!r} image in entry {scan.get('id')} (kernels {self.kernels})")
        return np.load(self.root / scan["images"][kernel], mmap_mode="r")


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Open a dataset folder written by :func:`write_dataset`; checks format, version and files."""
    root = Path(path)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{root}: not a readable LTDiffPP dataset ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in (FORMAT_VERSION, MULTIKERNEL_VERSION):
        raise InputError(f"{root}: dataset format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
                         f" is not {FORMAT!r} version {FORMAT_VERSION} or {MULTIKERNEL_VERSION}")
    if manifest["format_version"] == MULTIKERNEL_VERSION:
        files = [f for sc in manifest["scans"] for f in sc["images"].values()]
    else:
        files = [p[r] for p in manifest["pairs"] for r in ("source", "target")]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise InputError(f"{root}: dataset is incomplete, missing {missing[:3]}{' …' if len(missing) > 3 else ''}")
    return Dataset(root, manifest)
