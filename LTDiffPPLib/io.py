"""Reading and writing CT volumes: DICOM series (pydicom) and image files (SimpleITK).

Every volume is a :class:`CTVolume`: float32 Hounsfield units shaped (z, y, x) plus SimpleITK-style
geometry (spacing, origin and direction in mm, LPS patient coordinates, all in (x, y, z) order).
Bad inputs raise :class:`~LTDiffPPLib.errors.InputError`, problems with an output path raise
:class:`~LTDiffPPLib.errors.OutputError`; both name the file or folder. Every write goes through
:func:`atomic_output`, so a failed write leaves neither a partial output nor a damaged old one.
"""

from __future__ import annotations

import copy
import ctypes
import datetime
import hashlib
import logging
import math
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from .errors import InputError, LTDiffPPError, OutputError

__all__ = [
    "HU_LIMITS", "IMAGE_EXTENSIONS", "CTVolume", "DicomSeriesInfo", "atomic_output", "available_memory", "check_memory",
    "check_output_path", "cpu_name", "from_sitk", "is_image_path",
    "list_dicom_series", "read_dicom_series", "software_versions", "read_image", "read_volume", "resample_inplane", "to_sitk", "write_dicom_series",
    "write_image", "write_volume",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_COMPRESSED_EXTENSIONS = (".nrrd", ".nhdr", ".nii.gz", ".mha", ".mhd")
_DETACHED_HEADER_EXTENSIONS = (".nhdr", ".mhd")  # header + separate data file
_INT16_MIN, _INT16_MAX = -32768, 32767
_PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])
# Patient/study/equipment attributes copied from the source header into a written series.
_CARRIED_TAGS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "PatientIdentityRemoved", "DeidentificationMethod", "StudyInstanceUID",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription", "ReferringPhysicianName",
    "InstitutionName", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "PatientPosition",
    "PositionReferenceIndicator", "ContrastBolusAgent", "KVP", "AcquisitionDate", "AcquisitionTime",
)
_TYPE2_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
               "AccessionNumber", "ReferringPhysicianName", "Manufacturer", "KVP", "PositionReferenceIndicator",
               "AcquisitionNumber")


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its patient-space geometry.

    ``hu`` is float32 shaped (z, y, x); ``spacing`` (mm), ``origin`` (mm, LPS, centre of the first voxel)
    and ``direction`` (9 floats, row-major, column j = direction of axis j) follow SimpleITK's (x, y, z)
    order. ``dicom_header`` is the first slice's header (without pixel data) when read from DICOM.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    dicom_header: Dataset | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self.hu = np.asarray(self.hu, dtype=np.float32)
        if self.hu.ndim != 3:
            raise InputError(f"{self.source or 'volume'}: voxels must be shaped (z, y, x), got {self.hu.shape}")
        self.spacing = tuple(float(v) for v in self.spacing)
        self.origin = tuple(float(v) for v in self.origin)
        self.direction = tuple(float(v) for v in self.direction)
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise InputError(f"{self.source or 'volume'}: spacing/origin need 3 values and direction 9")

    def with_hu(self, hu: np.ndarray) -> CTVolume:
        """The same geometry and header with new voxels (HU, same (z, y, x) shape, made float32)."""
        hu = np.asarray(hu)
        if hu.shape != self.hu.shape:
            raise InputError(f"{self.source or 'volume'}: new voxels are shaped {hu.shape}, expected {self.hu.shape}")
        return replace(self, hu=hu)


@dataclass
class DicomSeriesInfo:
    """One DICOM series found in a folder (``kernel`` is ConvolutionKernel, values joined by '\\')."""

    series_uid: str
    n_files: int
    modality: str
    description: str
    kernel: str
    rows: int
    cols: int


# ----------------------------------------------------------------------------------------- helpers
def _image_ext(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    return next((e for e in sorted(IMAGE_EXTENSIONS, key=len, reverse=True) if name.endswith(e)), None)


def is_image_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names an image file by extension; any other output path is a DICOM folder."""
    return _image_ext(path) is not None


def _one_line(exc: BaseException) -> str:
    """SimpleITK's multi-line exception text reduced to its reason."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln.split("ERROR:", 1)[1].strip() for ln in lines if "ERROR:" in ln), lines[-1] if lines else "")
    if reason.endswith(":") and lines and lines[-1] not in reason:  # the reason is on the last line (NRRD, ...)
        reason = f"{reason} {lines[-1]}"
    return reason or type(exc).__name__


def _text(value: object) -> str:
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _ds(value: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters)."""
    return format_number_as_ds(float(round(value, 6)) + 0.0)


# ------------------------------------------------------------------------------------ DICOM read
# files that are DICOM by name: refused (not skipped) when they cannot be parsed, so no slice is lost silently
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_IMAGE_HINTS = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _get(ds: Dataset, keyword: str, path: Path) -> object:
    """``ds.get(keyword)``; a value pydicom cannot decode raises :class:`InputError` naming the file."""
    try:
        return ds.get(keyword)
    except Exception as exc:  # malformed element bytes (odd length for US, undecodable text, ...)
        raise InputError(f"{path}: {keyword} cannot be decoded ({type(exc).__name__}: {exc}); the file is "
                         "corrupted.") from exc


def _numbers(ds: Dataset, keyword: str, path: Path, count: int | None = None) -> list[float] | None:
    """The finite numbers of a numeric attribute (None when absent or empty); anything else: InputError."""
    value = _get(ds, keyword, path)
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return None
    items = list(value) if isinstance(value, (pydicom.multival.MultiValue, list, tuple)) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        raise InputError(f"{path}: {keyword} is not numeric ({_text(value)[:64]!r}); the header is corrupted.") from None
    if count is not None and len(numbers) != count:
        raise InputError(f"{path}: {keyword} has {len(numbers)} values, DICOM requires {count}; the header is "
                         "corrupted.")
    if not all(np.isfinite(numbers)):
        raise InputError(f"{path}: {keyword} is not finite ({_text(value)[:64]!r}); the header is corrupted.")
    return numbers


def _int(ds: Dataset, keyword: str, path: Path, default: int | None = None, low: int = 0) -> int:
    numbers = _numbers(ds, keyword, path, count=1)
    if numbers is None:
        if default is None:
            raise InputError(f"{path} lacks {keyword}; the file is incomplete, export the series again.")
        return default
    if numbers[0] != int(numbers[0]) or numbers[0] < low:
        raise InputError(f"{path}: {keyword} = {numbers[0]:g} is not a valid value (an integer >= {low}).")
    return int(numbers[0])


# SOP classes of single-slice images (CT, enhanced CT, MR, secondary capture and their sub-classes)
_IMAGE_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7")


def _declares_image(ds: Dataset) -> bool:
    """True when the file's SOP class is an image class, when it declares none, or when it holds no data
    elements beyond its file meta (a header cut short)."""
    try:
        if len(ds) == 0:
            return True
        sop = _text(ds.get("SOPClassUID")) or _text(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID"))
    except Exception:
        return True
    return not sop or any(sop == c or sop.startswith(c + ".") for c in _IMAGE_SOP_CLASSES)


def _scan_folder(folder: str | os.PathLike) -> dict[str, list[tuple[Path, Dataset]]]:
    """Headers of the DICOM image files directly inside ``folder``, grouped by SeriesInstanceUID.

    Files that are not DICOM are skipped; a file that is DICOM (by its 'DICM' marker or a .dcm/.dicom/.ima
    name) but cannot be parsed is refused, since skipping it could silently drop a slice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise InputError(f"DICOM folder {folder} {what}; pass the folder that holds the series' files.")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"Cannot list DICOM folder {folder}: {exc}") from exc
    for path in entries:
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's warnings about odd values: checked below
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            if path.suffix.lower() in _DICOM_SUFFIXES or _has_dicm_marker(path):
                raise InputError(f"{path} is a DICOM file that cannot be parsed (truncated or corrupted: "
                                 f"{type(exc).__name__}: {exc}); export the series again or remove the file.") from exc
            log.debug("skipping %s: %s", path, exc)  # not DICOM (notes, thumbnails, ...)
            continue
        try:
            present = [kw for kw in _IMAGE_HINTS if kw in ds]
        except Exception as exc:
            raise InputError(f"{path}: the DICOM header is corrupted ({type(exc).__name__}: {exc}).") from exc
        if not present:  # not an image (SR, RT structure set, presentation state, ...): skipped
            if _declares_image(ds):  # ... unless it says it is one: then the header is cut short
                raise InputError(f"{path} is a DICOM image file without image attributes (Rows, Columns, "
                                 "position); it is truncated or corrupted. Export the series again or remove it.")
            continue
        if "Rows" not in present or "Columns" not in present:
            raise InputError(f"{path} is a DICOM image without Rows/Columns; the file is corrupted, export the "
                             "series again or remove the file.")
        series.setdefault(_text(_get(ds, "SeriesInstanceUID", path)), []).append((path, ds))
    if not series:
        raise InputError(f"No DICOM image files found in folder {folder} (subfolders are not searched); "
                         "pass the folder that directly contains the series' files.")
    return series


def _describe(uid: str, files: list[tuple[Path, Dataset]]) -> DicomSeriesInfo:
    path, ds = files[0]
    return DicomSeriesInfo(uid, len(files), _text(_get(ds, "Modality", path)),
                           _text(_get(ds, "SeriesDescription", path)), _text(_get(ds, "ConvolutionKernel", path)),
                           _int(ds, "Rows", path, low=1), _int(ds, "Columns", path, low=1))


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeriesInfo]:
    """The DICOM series directly inside ``folder`` (not recursive), largest first."""
    infos = [_describe(uid, files) for uid, files in _scan_folder(folder).items()]
    return sorted(infos, key=lambda s: (-s.n_files, s.series_uid))


def _series_table(infos: list[DicomSeriesInfo]) -> str:
    return "\n".join(f"  {s.series_uid or '(empty UID)'}: {s.n_files} files, {s.modality or '?'}, "
                     f"'{s.description}', kernel '{s.kernel}'" for s in infos)


def _select_series(folder: Path, series_uid: str | None) -> list[tuple[Path, Dataset]]:
    series = _scan_folder(folder)
    infos = sorted((_describe(u, f) for u, f in series.items()), key=lambda s: (-s.n_files, s.series_uid))
    if series_uid is None:
        if len(series) > 1:
            raise InputError(f"Folder {folder} holds {len(series)} DICOM series; pass the series UID of the one "
                             f"to read (series_uid / --series-uid):\n{_series_table(infos)}")
        return next(iter(series.values()))
    if series_uid not in series:
        raise InputError(f"Folder {folder} has no series with UID {series_uid}; available:\n{_series_table(infos)}")
    return series[series_uid]


def _check_ct(folder: Path, files: list[tuple[Path, Dataset]]) -> None:
    """A CT series (missing Modality: warn) of single-frame files."""
    for path, ds in files:
        if _int(ds, "NumberOfFrames", path, default=1) > 1:
            raise InputError(f"{path} is a multi-frame (enhanced) DICOM file; only series with one slice per "
                             "file are supported.")
    modalities = {_text(_get(ds, "Modality", path)) for path, ds in files}
    if modalities - {"CT", ""}:
        raise InputError(f"Series in {folder} has modality {', '.join(sorted(modalities - {''}))}, not CT; "
                         "LTDiffPP only standardizes CT images.")
    if "" in modalities:
        warnings.warn(f"Series in {folder}: Modality missing in some files; assuming CT.", stacklevel=3)


def _check_rescale(folder: Path, files: list[tuple[Path, Dataset]]) -> bool:
    """RescaleSlope/Intercept: present in every file or in none (then warned by the caller), numeric,
    finite, slope non-zero. Returns whether they are present. Per-slice values may differ (allowed by
    DICOM and applied per slice)."""
    present = [("RescaleSlope" in ds, "RescaleIntercept" in ds) for _, ds in files]
    for (path, ds), (has_slope, has_intercept) in zip(files, present):
        if has_slope != has_intercept:
            raise InputError(f"{path} has {'RescaleSlope' if has_slope else 'RescaleIntercept'} without "
                             f"{'RescaleIntercept' if has_slope else 'RescaleSlope'}; stored values cannot be "
                             "converted to HU. Fix the header or export the series again.")
        if has_slope:
            slope = _numbers(ds, "RescaleSlope", path, count=1)
            intercept = _numbers(ds, "RescaleIntercept", path, count=1)
            if slope is None or intercept is None:
                raise InputError(f"{path}: RescaleSlope/RescaleIntercept are empty; stored values cannot be "
                                 "converted to HU.")
            if slope[0] == 0:
                raise InputError(f"{path}: RescaleSlope is 0, which would make every voxel the same HU; the "
                                 "header is corrupted.")
    with_rescale = sum(p[0] for p in present)
    if 0 < with_rescale < len(files):
        missing = next(path for (path, _), p in zip(files, present) if not p[0])
        having = next(path for (path, _), p in zip(files, present) if p[0])
        raise InputError(f"Inconsistent series in {folder}: {missing.name} has no RescaleSlope/RescaleIntercept "
                         f"but {having.name} does ({len(files) - with_rescale} of {len(files)} files lack them); "
                         "stored values cannot be converted to HU consistently. Export the series again.")
    return with_rescale > 0


def _tol(distance: float) -> float:
    """Geometric tolerance in mm: 1 % of a distance, at least 0.01 mm."""
    return max(0.01, 0.01 * abs(distance))


def _sorted_geometry(files: list[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], np.ndarray, float,
                                                                 np.ndarray, tuple[int, int], tuple[float, float]]:
    """Sort slices along the slice normal and check that they form one regular, untilted stack.

    Returns the sorted files, the 3x3 direction matrix (columns: row cosine, column cosine, normal),
    the slice step in mm (SliceThickness, else 1.0, for a single slice), the sorted slice positions,
    (Rows, Columns) and PixelSpacing (row spacing, column spacing).
    """
    first_path, first = files[0]
    orientations, positions = [], []
    shape0 = spacing0 = None
    for path, ds in files:
        iop, ipp = _numbers(ds, "ImageOrientationPatient", path, 6), _numbers(ds, "ImagePositionPatient", path, 3)
        spacing = _numbers(ds, "PixelSpacing", path, 2)
        if iop is None or ipp is None or spacing is None:
            raise InputError(f"{path} lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing, so the "
                             "slice cannot be placed in space; export the series again with full geometry.")
        if min(spacing) <= 0:
            raise InputError(f"{path}: PixelSpacing {spacing} is not positive; the header is corrupted.")
        shape = (_int(ds, "Rows", path, low=1), _int(ds, "Columns", path, low=1))
        if shape0 is None:
            shape0, spacing0 = shape, spacing
        if orientations and not np.allclose(iop, orientations[0], atol=1e-4):
            raise InputError(f"{path} and {first_path} have different ImageOrientationPatient; the folder mixes "
                             "differently oriented slices (use a folder with one consistent series).")
        if shape != shape0 or not np.allclose(spacing, spacing0, rtol=1e-4):
            raise InputError(f"{path} and {first_path} differ in Rows/Columns/PixelSpacing; all slices of a series "
                             "must have the same size and pixel spacing.")
        orientations.append(iop)
        positions.append(ipp)
    iop = np.array(orientations[0], dtype=float)
    norms = np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])
    if min(norms) < 1e-6 or abs(norms[0] - 1) > 0.01 or abs(norms[1] - 1) > 0.01:
        raise InputError(f"{first_path}: ImageOrientationPatient {list(iop)} does not hold two unit vectors; "
                         "the header is corrupted.")
    row, col = iop[:3] / norms[0], iop[3:] / norms[1]
    if abs(row @ col) > 1e-3:
        raise InputError(f"{first_path}: ImageOrientationPatient row and column directions are not orthogonal.")
    normal = np.cross(row, col)
    positions = np.array(positions, dtype=float)
    order = np.argsort(positions @ normal, kind="stable")
    files, positions = [files[i] for i in order], positions[order]
    keys = positions @ normal
    steps = np.diff(keys)
    for k in np.flatnonzero(steps < 1e-3):
        raise InputError(f"{files[k][0]} and {files[k + 1][0]} are at the same slice position ({keys[k]:.3f} mm); "
                         "remove duplicate slices or pass the series UID of one series.")
    median = float(np.median(steps)) if len(steps) else 0.0
    for k in np.flatnonzero(np.abs(steps - median) > _tol(median)):
        raise InputError(f"Irregular slice spacing in {files[0][0].parent}: {steps[k]:.3f} mm between "
                         f"{files[k][0].name} and {files[k + 1][0].name} where the series steps {median:.3f} mm; "
                         "slices are missing (or the series is incomplete). Export the complete series.")
    offsets = positions - positions[0]
    lateral = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if any(lat > _tol(along) for lat, along in zip(lateral, offsets @ normal)):
        raise InputError(f"Series in {files[0][0].parent} was acquired with gantry tilt (slices are not stacked "
                         "along their normal); resample it to an untilted grid first.")
    if len(files) > 1:
        step = (keys[-1] - keys[0]) / (len(files) - 1)
    else:
        thickness = _numbers(first, "SliceThickness", first_path, 1)
        step = thickness[0] if thickness and thickness[0] > 0 else 1.0
    return files, np.column_stack([row, col, normal]), float(step), positions, shape0, (spacing0[0], spacing0[1])


def _transfer_syntax(ds: Dataset) -> pydicom.uid.UID | None:
    try:
        uid = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
        uid.is_compressed  # noqa: B018 - raises ValueError for a UID that is not a transfer syntax
        return uid
    except Exception:
        return None


def _slice_hu(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """One slice in HU (stored value × RescaleSlope + RescaleIntercept, 1/0 when absent), shaped (y, x)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot read DICOM file ({type(exc).__name__}: {exc}).") from exc
    if "PixelData" not in ds:
        raise InputError(f"{path} has no pixel data; the file is incomplete, export the series again.")
    samples = _int(ds, "SamplesPerPixel", path, default=1)
    if samples != 1:
        raise InputError(f"{path} is a colour image (SamplesPerPixel {samples}); CT slices must be greyscale.")
    slope = (_numbers(ds, "RescaleSlope", path, 1) or [1.0])[0]
    intercept = (_numbers(ds, "RescaleIntercept", path, 1) or [0.0])[0]
    syntax = _transfer_syntax(ds)
    if syntax is None:
        raise InputError(f"{path}: TransferSyntaxUID {_text(ds.file_meta.get('TransferSyntaxUID'))!r} is not a "
                         "DICOM transfer syntax; the file is corrupted.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
        if raw.dtype.kind not in "iuf":
            raise ValueError(f"pixel values of type {raw.dtype}")
        with np.errstate(all="ignore"):
            hu = raw.astype(np.float64) * slope + intercept
    except Exception as exc:
        if not syntax.is_compressed:
            raise InputError(f"{path}: invalid pixel data ({type(exc).__name__}: {exc}).") from exc
        hu = _slice_hu_gdcm(path, exc)  # compressed syntax pydicom has no decoder for: SimpleITK's GDCM
    if hu.shape != shape:
        raise InputError(f"{path}: pixel data is shaped {hu.shape}, but Rows/Columns say {shape}.")
    if not np.isfinite(hu).all():
        raise InputError(f"{path}: pixel values times RescaleSlope plus RescaleIntercept are not finite.")
    return hu.astype(np.float32)


def _slice_hu_gdcm(path: Path, pydicom_error: Exception) -> np.ndarray:
    """Decode one compressed slice with SimpleITK's GDCM (which applies the rescale itself)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        image = sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot decode compressed pixel data ({pydicom_error}; GDCM: {_one_line(exc)}); "
                         "decompress the series first (e.g. gdcmconv --raw).") from exc
    return (image[0] if image.ndim == 3 else image).astype(np.float64)


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup (container) limit; None
    when unknown (then the size check is skipped)."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                candidates.append(max(0, int(limit) - int(Path(usage_file).read_text().strip())))
            break
        except (OSError, ValueError):
            continue
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(candidates)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def check_memory(needed: int, source: str | os.PathLike, shape: tuple[int, ...]) -> None:
    """Raise :class:`InputError` before allocating when reading a ``shape`` volume needs ``needed`` bytes
    and less is available (see :func:`available_memory`)."""
    available = available_memory()
    if available is not None and needed > available:
        dims = " × ".join(str(int(n)) for n in shape)
        raise InputError(f"{source}: reading this {dims} volume needs about {_gib(needed)} of memory, but only "
                         f"{_gib(available)} is available; crop or downsample it first, or use a machine with "
                         "more memory.")


#: below any CT value (−32768 is the smallest stored int16) or above any (65535, the largest uint16):
#: voxels there are not Hounsfield units, whatever the rescale
HU_LIMITS = (-32768.0, 65535.0)


def _check_hu_range(hu: np.ndarray, source: str | os.PathLike) -> None:
    """Refuse values no CT in HU can hold; warn when the volume looks like raw unsigned stored values."""
    lo, hi = float(hu.min()), float(hu.max())
    if lo < HU_LIMITS[0] or hi > HU_LIMITS[1]:
        raise InputError(f"{source}: values range from {lo:.6g} to {hi:.6g}, far outside the Hounsfield scale "
                         f"[{HU_LIMITS[0]:g}, {HU_LIMITS[1]:g}]; this is not a CT in HU (wrong rescale slope or "
                         "intercept, or not a CT image).")
    if lo >= 0 and hi >= 1000:
        warnings.warn(f"{source}: no voxel is below 0 HU (range {lo:.0f} to {hi:.0f}), so there is no air, lung or "
                      "fat; these look like raw unsigned stored values (air 0, water 1024) rather than HU. Check the "
                      "rescale intercept: results will be wrong if they are not HU.", stacklevel=3)


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """Read one CT series from the files directly inside ``folder`` into HU, shaped (z, y, x).

    Slices are ordered by position along the slice normal; the folder may hold other files (skipped)
    and several series (then ``series_uid`` picks one). Raises :class:`InputError` for anything that
    does not make a regular, untilted CT volume, for a corrupted file, and (before reading any pixels)
    for a volume too large for the available memory.
    """
    folder = Path(folder)
    try:
        return _read_dicom_series(folder, series_uid)
    except LTDiffPPError:
        raise
    except MemoryError as exc:
        raise InputError(f"DICOM series in {folder}: out of memory while reading it ({exc}).") from exc
    except Exception as exc:  # a safety net: a malformed file must never escape as a raw library exception
        error = InputError(f"Cannot read the DICOM series in {folder}: {type(exc).__name__}: {exc}. The files are "
                           "probably corrupted; please report this if they are not.")
        error.unanticipated = True  # no specific check caught it (the fuzz tests treat this as a finding)
        raise error from exc


def _read_dicom_series(folder: Path, series_uid: str | None) -> CTVolume:
    files = _select_series(folder, series_uid)
    _check_ct(folder, files)
    has_rescale = _check_rescale(folder, files)
    files, direction, step, positions, shape, (row_spacing, col_spacing) = _sorted_geometry(files)
    check_memory(len(files) * shape[0] * shape[1] * 4 + shape[0] * shape[1] * 16, folder, (len(files), *shape))
    hu = np.empty((len(files), *shape), dtype=np.float32)
    for k, (path, _) in enumerate(files):
        hu[k] = _slice_hu(path, shape)
    if not has_rescale:
        warnings.warn(f"Series in {folder}: RescaleSlope/RescaleIntercept missing in all {len(files)} files; "
                      "assuming 1/0 (stored values taken as HU).", stacklevel=3)
    _check_hu_range(hu, folder)
    header = copy.deepcopy(files[0][1])
    return CTVolume(hu=hu, spacing=(col_spacing, row_spacing, step), origin=tuple(float(v) for v in positions[0]),
                    direction=tuple(direction.ravel()), dicom_header=header, source=str(folder))


# ------------------------------------------------------------------------------------ image files
def from_sitk(image: sitk.Image, source: str = "") -> CTVolume:
    """A SimpleITK image (2-D or 3-D, scalar) as a float32 HU volume; a 2-D image becomes z = 1 (1 mm)."""
    name = source or "image"
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per pixel (vector/RGB); "
                         "a CT image must have one value (HU) per voxel.")
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InputError(f"{name} is {dim}-D; only 2-D slices and 3-D volumes are supported.")
    if 0 in image.GetSize():
        raise InputError(f"{name} is empty (size {image.GetSize()}); there is nothing to standardize.")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    if dim == 2:
        hu, spacing, origin = hu[None], (*spacing, 1.0), (*origin, 0.0)
        direction = (direction[0], direction[1], 0.0, direction[2], direction[3], 0.0, 0.0, 0.0, 1.0)
    if not np.isfinite(hu).all():
        raise InputError(f"{name} contains NaN or infinite voxels; a CT image must be finite HU everywhere.")
    return CTVolume(hu=hu, spacing=spacing, origin=origin, direction=direction, source=source)


def to_sitk(volume: CTVolume) -> sitk.Image:
    """The volume as a float32 SimpleITK image with the same geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu, dtype=np.float32))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def resample_inplane(volume: CTVolume, pixel_mm: float, size: int | None = None) -> CTVolume:
    """The volume resampled in-plane to square ``pixel_mm`` pixels (linear), slices unchanged.

    With ``size``, the new (y, x) grid is ``size`` × ``size`` pixels centred on the old field of view
    (cropping or padding with −1024 HU air); otherwise it covers the old field of view. Kernel texture
    scales with pixel size, so simulated training data is made at the pixel size the model will see.
    """
    if not pixel_mm > 0:
        raise InputError(f"pixel size must be positive, got {pixel_mm} mm")
    sx, sy, sz = volume.spacing
    nz, ny, nx = volume.hu.shape
    new_x = size or max(1, round(nx * sx / pixel_mm))
    new_y = size or max(1, round(ny * sy / pixel_mm))
    d = np.asarray(volume.direction).reshape(3, 3)
    centre = np.asarray(volume.origin) + d @ np.array([(nx - 1) / 2 * sx, (ny - 1) / 2 * sy, 0.0])
    origin = centre - d @ np.array([(new_x - 1) / 2 * pixel_mm, (new_y - 1) / 2 * pixel_mm, 0.0])
    ref = sitk.Image(int(new_x), int(new_y), int(nz), sitk.sitkFloat32)
    ref.SetSpacing((pixel_mm, pixel_mm, sz))
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(volume.direction)
    out = sitk.Resample(to_sitk(volume), ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    return CTVolume(hu=sitk.GetArrayFromImage(out), spacing=(pixel_mm, pixel_mm, sz),
                    origin=tuple(float(v) for v in origin), direction=volume.direction,
                    dicom_header=volume.dicom_header, source=volume.source)


def read_image(path: str | os.PathLike) -> CTVolume:
    """Read an image file (.nrrd .nhdr .nii .nii.gz .mha .mhd) as float32 HU, shaped (z, y, x)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Image file {path} {'is a folder' if path.is_dir() else 'does not exist'}.")
    if _image_ext(path) is None:
        raise InputError(f"{path}: unsupported image format; use one of {', '.join(IMAGE_EXTENSIONS)} "
                         "or a DICOM folder.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only: size and pixel type, to check memory first
        size, components = reader.GetSize(), reader.GetNumberOfComponents()
        bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
        voxels = math.prod(int(n) for n in size)
        # ITK's buffer, numpy's copy of it, and the float32 HU array
        check_memory(voxels * (2 * components * (int(bits.group(1)) // 8 if bits else 8) + 4), path, size[::-1])
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"Cannot read image {path}: {_one_line(exc)}") from exc
    except MemoryError as exc:
        raise InputError(f"Cannot read image {path}: out of memory ({exc}).") from exc
    volume = from_sitk(image, source=str(path))
    _check_hu_range(volume.hu, path)
    return volume


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a DICOM folder (:func:`read_dicom_series`) or an image file (:func:`read_image`)."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    if path.is_file() and (path.suffix.lower() in (".dcm", ".dicom") or pydicom.misc.is_dicom(path)):
        raise InputError(f"{path} is a single DICOM file; pass the folder that holds the series ({path.parent}).")
    if series_uid is not None and path.exists():
        raise InputError(f"{path}: a series UID only applies to DICOM folders, not to image files.")
    return read_image(path)


# ----------------------------------------------------------------------------------------- output
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_output_path(final_path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False) -> Path:
    """Raise :class:`OutputError` unless ``final_path`` can be written (call it before long work).

    Refuses an existing output without ``overwrite``, replacing a file by a folder or the reverse,
    and a missing or read-only parent folder.
    """
    final = Path(final_path)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputError(f"{final} already exists; pass overwrite=True (--overwrite) or choose another path.")
        if final.is_dir() != is_dir:
            raise OutputError(f"{final} exists and is {'not ' if is_dir else ''}a folder; refusing to replace it.")
    if not final.parent.is_dir():
        raise OutputError(f"Cannot write {final}: folder {final.parent} does not exist.")
    if not os.access(final.parent, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write {final}: folder {final.parent} is not writable.")
    return final


_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _sweep_stale(final: Path) -> None:
    """Remove ``final``'s temporaries left by writers on this host that were killed mid-write.

    A temporary is ``.{name}.tmp-{host}-{pid}-{random}``; one whose process no longer exists can never
    be completed. Temporaries of live processes and of other hosts (shared file systems) are left alone.
    """
    prefix = f".{final.name}.tmp-{_HOST_TAG}-"
    try:
        siblings = [p for p in final.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for path in siblings:
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("removing %s, left by an interrupted writer (pid %s)", path, pid)
            _remove(path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: kernel or file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


@contextmanager
def atomic_output(final_path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final_path``; move it into place when the block succeeds.

    The temporary is ``.{name}.tmp-{host}-{pid}-{random}`` (a file's keeps its extension at the end, so
    writers that choose a format by extension still work); with ``is_dir`` it is created as an empty
    folder. An exception in the block removes it and leaves any existing output untouched; a process
    killed mid-write leaves only the hidden temporary, which the next write of the same output removes.
    An existing output without ``overwrite``, or a missing or read-only parent folder, raise
    :class:`OutputError` up front. An existing folder is replaced by an atomic exchange (Linux), else
    by renaming it aside, moving the new one in, then deleting the old.
    """
    final = check_output_path(final_path, overwrite=overwrite, is_dir=is_dir)
    parent = final.parent
    _sweep_stale(final)
    token = f"{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = parent / f".{final.name}.tmp-{token}{'' if is_dir else (_image_ext(final) or final.suffix)}"
    try:
        if is_dir:
            tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"Cannot write {final}: {exc}") from exc
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        if not overwrite and (final.exists() or final.is_symlink()):
            raise OutputError(f"{final} appeared while it was being written; not replacing it.")
        if is_dir and final.exists() and _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
        elif is_dir and final.exists():
            aside = parent / f".{final.name}.old-{token}"
            os.replace(final, aside)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(aside, final)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(f"Cannot write {final}: {exc}") from exc
    except BaseException:
        _remove(tmp)
        raise


def write_image(volume: CTVolume, path: str | os.PathLike, *, overwrite: bool = False,
                provenance: dict[str, str] | None = None) -> Path:
    """Write the volume as a float32 HU image file, format by extension, geometry exact; returns the path.

    ``.nhdr``/``.mhd`` also write their data file beside the header (``.raw.gz``/``.zraw``).
    ``provenance`` (e.g. software versions, model checksum) is stored as ``LTDiffPP_{key}`` header
    fields in NRRD and MetaImage files; NIfTI has no room for it (ITK drops it).
    """
    path = Path(path)
    ext = _image_ext(path)
    if ext is None:
        raise OutputError(f"{path}: unknown image extension; use one of {', '.join(IMAGE_EXTENSIONS)}.")
    image = to_sitk(volume)
    for key, value in (provenance or {}).items():
        image.SetMetaData(f"LTDiffPP_{key}", " ".join(str(value).split()))  # one line per header field
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            if ext in _DETACHED_HEADER_EXTENSIONS:
                _write_detached(image, path, tmp, overwrite)
            else:
                sitk.WriteImage(image, str(tmp), useCompression=ext in _COMPRESSED_EXTENSIONS)
        except (RuntimeError, OSError) as exc:
            raise OutputError(f"Cannot write {path}: {_one_line(exc)}") from exc
    return path


def _write_detached(image: sitk.Image, path: Path, tmp_header: Path, overwrite: bool) -> None:
    """Write header + data file under their final names in a staging folder, then move the header to
    ``tmp_header`` (which :func:`atomic_output` moves into place) and the data file beside ``path``."""
    stage = tmp_header.with_name(tmp_header.name + ".d")
    stage.mkdir()
    try:
        sitk.WriteImage(image, str(stage / path.name), useCompression=True)
        data_files = [f for f in stage.iterdir() if f.name != path.name]
        for f in data_files:
            if (path.parent / f.name).exists() and not overwrite:
                raise OutputError(f"{path.parent / f.name} already exists; pass overwrite=True or choose another path.")
        os.replace(stage / path.name, tmp_header)
        for f in data_files:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _new_series_dataset(volume: CTVolume, series_description: str, convolution_kernel: str,
                        provenance: dict[str, str] | None = None) -> Dataset:
    """Series-level attributes of a derived CT series (everything but per-slice values)."""
    header = volume.dicom_header if volume.dicom_header is not None else Dataset()
    now = datetime.datetime.now()
    today, now_time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    for keyword in _CARRIED_TAGS:
        if keyword in header:
            ds.add(copy.deepcopy(header[keyword]))
    if volume.dicom_header is None:
        ds.PatientName, ds.PatientID, ds.StudyInstanceUID = "Anonymous", "LTDiffPP", generate_uid()
        ds.StudyDate, ds.StudyTime = today, now_time
    for keyword in _TYPE2_TAGS:  # required, possibly empty
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.SOPClassUID, ds.Modality, ds.ImageType = CT_IMAGE_STORAGE, "CT", ["DERIVED", "SECONDARY"]
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = _text(header.get("FrameOfReferenceUID")) or generate_uid()
    old_number = _text(header.get("SeriesNumber"))
    ds.SeriesNumber = int(old_number) + 1000 if old_number.lstrip("-").isdigit() else 1000
    ds.SeriesDescription = _fit(series_description, 64, "SeriesDescription")
    if convolution_kernel:
        ds.ConvolutionKernel = _fit(convolution_kernel, 16, "ConvolutionKernel")
    source = _text(header.get("SeriesInstanceUID")) or volume.source or "(unknown)"
    source_kernel = _text(header.get("ConvolutionKernel"))
    ds.DerivationDescription = (f"LTDiffPP reconstruction-kernel standardization of series {source}"
                                + (f" (kernel {source_kernel})" if source_kernel else "")
                                + (f" to kernel {convolution_kernel}" if convolution_kernel else "")
                                + "".join(f"; {k}: {v}" for k, v in (provenance or {}).items()))[:1024]
    ds.SoftwareVersions = [f"{name} {version}"[:64] for name, version in software_versions().items()]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = today
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now_time
    d = np.array(volume.direction).reshape(3, 3)
    ds.ImageOrientationPatient = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
    ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[0])]
    ds.SliceThickness = _ds(float(header.get("SliceThickness") or volume.spacing[2]))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = volume.hu.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "0", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    return ds


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what ``platform`` knows (for benchmark and model-card records).

    Virtual machines often report a bare family name ("AMD EPYC") for CPUs of different generations, so the
    family/model numbers and the widest vector extension (AVX-512 with or without BF16, AVX2) are appended."""
    try:
        info: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                if info:
                    break  # the first processor is enough
                continue
            info.setdefault(key.strip(), value.strip())
        if "model name" in info:
            flags = set(info.get("flags", "").split())
            isa = ("AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
                   else "AVX2" if "avx2" in flags else "")
            ids = f"family {info['cpu family']} model {info['model']}" if {"cpu family", "model"} <= set(info) else ""
            extra = ", ".join(x for x in (ids, isa) if x)
            return f"{info['model name']} ({extra})" if extra else info["model name"]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def software_versions() -> dict[str, str]:
    """LTDiffPP's version and those of the libraries that shape its output (torch only when loaded)."""
    from . import __version__

    versions = {"ltdiffpp": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
                "pydicom": pydicom.__version__, "SimpleITK": sitk.Version_VersionString()}
    if "torch" in sys.modules:
        versions["torch"] = str(sys.modules["torch"].__version__)
    return versions


def _fit(value: str, limit: int, keyword: str) -> str:
    value = str(value).replace("\\", "/")
    if len(value) > limit:
        warnings.warn(f"{keyword} '{value}' is longer than DICOM allows ({limit}); truncated.", stacklevel=4)
    return value[:limit]


def _save(ds: Dataset, path: Path) -> None:
    """Save as a DICOM file (preamble + file meta) with pydicom 3, or 2.4 (which needs the encoding flags)."""
    if _PYDICOM_MAJOR >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def write_dicom_series(volume: CTVolume, folder: str | os.PathLike, *, series_description: str,
                       convolution_kernel: str, overwrite: bool = False,
                       provenance: dict[str, str] | None = None) -> Path:
    """Write the volume as a new derived CT series, one file per slice ``IM{n:05d}.dcm`` (n = 1..z).

    HU are rounded and stored as int16 (slope 1, intercept 0; values outside int16 are clipped with a
    warning). Patient/study attributes come from ``volume.dicom_header`` when present; series, SOP
    instance UIDs are new. SoftwareVersions lists LTDiffPP's and its libraries' versions;
    ``provenance`` (e.g. the model checksum) is appended to DerivationDescription. A left-handed direction is written as given (slices then read back in the
    opposite order, same patient-space image).
    """
    folder = Path(folder)
    d = np.array(volume.direction).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise InputError(f"{volume.source or 'volume'}: direction matrix is not orthonormal; cannot write DICOM.")
    if not np.isfinite(volume.hu).all():
        raise InputError(f"{volume.source or 'volume'} contains NaN or infinite voxels; cannot write DICOM.")
    origin, normal = np.array(volume.origin), d[:, 2]
    with atomic_output(folder, overwrite=overwrite, is_dir=True) as tmp:
        rounded = np.rint(volume.hu)
        if rounded.min(initial=0) < _INT16_MIN or rounded.max(initial=0) > _INT16_MAX:
            warnings.warn(f"Writing {folder}: HU outside [{_INT16_MIN}, {_INT16_MAX}] clipped.", stacklevel=2)
        pixels = np.clip(rounded, _INT16_MIN, _INT16_MAX).astype("<i2")
        base = _new_series_dataset(volume, series_description, convolution_kernel, provenance)
        for k in range(pixels.shape[0]):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = origin + k * volume.spacing[2] * normal
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(position @ normal)
            ds.PixelData = pixels[k].tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            try:
                _save(ds, tmp / f"IM{k + 1:05d}.dcm")
            except OSError as exc:
                raise OutputError(f"Cannot write {folder}: {exc}") from exc
    return folder


def write_volume(volume: CTVolume, path: str | os.PathLike, *, overwrite: bool = False,
                 series_description: str = "LTDiffPP standardized", convolution_kernel: str = "",
                 provenance: dict[str, str] | None = None) -> Path:
    """Write an image file when ``path`` has an image extension, else a DICOM series into folder ``path``."""
    path = Path(path)
    if is_image_path(path):
        return write_image(volume, path, overwrite=overwrite, provenance=provenance)
    if path.suffix.lower() in (".dcm", ".dicom"):
        raise OutputError(f"{path}: DICOM output is a folder (one file per slice); pass a folder path.")
    return write_dicom_series(volume, path, series_description=series_description,
                              convolution_kernel=convolution_kernel, overwrite=overwrite, provenance=provenance)
