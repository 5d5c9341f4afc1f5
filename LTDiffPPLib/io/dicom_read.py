"""Reading DICOM CT series (pydicom): one volume in HU from the single-slice files of one series.

Bad files raise :class:`~LTDiffPPLib.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from ..errors import InputError, LTDiffPPError
from .images import _one_line
from .volume import HU_LIMITS, CTVolume, _check_hu_range, check_memory

__all__ = ["DicomSeriesInfo", "list_dicom_series", "read_dicom_series"]

log = logging.getLogger(__name__)


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


def tag_text(value: object) -> str:
    """A DICOM value as text: multi-valued elements joined by backslashes, None as the empty string."""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


# ------------------------------------------------------------------------------------ DICOM read
# files that are DICOM by name: refused (not skipped) when they cannot be parsed, so no slice is lost silently
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_IMAGE_HINTS = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")


def looks_like_dicom(path: Path) -> bool:
    """A DICOM file by its name (.dcm, .dicom, .ima) or its 'DICM' marker at byte 128."""
    return path.suffix.lower() in _DICOM_SUFFIXES or _has_dicm_marker(path)


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
        raise InputError(f"{path}: {keyword} is not numeric ({tag_text(value)[:64]!r}); the header is corrupted.") from None
    if count is not None and len(numbers) != count:
        raise InputError(f"{path}: {keyword} has {len(numbers)} values, DICOM requires {count}; the header is "
                         "corrupted.")
    if not all(np.isfinite(numbers)):
        raise InputError(f"{path}: {keyword} is not finite ({tag_text(value)[:64]!r}); the header is corrupted.")
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
        sop = tag_text(ds.get("SOPClassUID")) or tag_text(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID"))
    except Exception:
        return True
    return not sop or any(sop == c or sop.startswith(c + ".") for c in _IMAGE_SOP_CLASSES)


def scan_dicom_folder(folder: str | os.PathLike) -> dict[str, list[tuple[Path, Dataset]]]:
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
            if looks_like_dicom(path):
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
        series.setdefault(tag_text(_get(ds, "SeriesInstanceUID", path)), []).append((path, ds))
    if not series:
        raise InputError(f"No DICOM image files found in folder {folder} (subfolders are not searched); "
                         "pass the folder that directly contains the series' files.")
    return series


def _describe(uid: str, files: list[tuple[Path, Dataset]]) -> DicomSeriesInfo:
    path, ds = files[0]
    return DicomSeriesInfo(uid, len(files), tag_text(_get(ds, "Modality", path)),
                           tag_text(_get(ds, "SeriesDescription", path)), tag_text(_get(ds, "ConvolutionKernel", path)),
                           _int(ds, "Rows", path, low=1), _int(ds, "Columns", path, low=1))


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeriesInfo]:
    """The DICOM series directly inside ``folder`` (not recursive), largest first."""
    infos = [_describe(uid, files) for uid, files in scan_dicom_folder(folder).items()]
    return sorted(infos, key=lambda s: (-s.n_files, s.series_uid))


def _series_table(infos: list[DicomSeriesInfo]) -> str:
    return "\n".join(f"  {s.series_uid or '(empty UID)'}: {s.n_files} files, {s.modality or '?'}, "
                     f"'{s.description}', kernel '{s.kernel}'" for s in infos)


def _select_series(folder: Path, series_uid: str | None) -> list[tuple[Path, Dataset]]:
    series = scan_dicom_folder(folder)
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
    modalities = {tag_text(_get(ds, "Modality", path)) for path, ds in files}
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


def _stored_value(ds: Dataset, keyword: str, tag: str, path: Path) -> int | None:
    """``keyword`` (PixelPaddingValue or PixelPaddingRangeLimit) as a stored pixel value of this file's pixel
    type, or None when absent. A value written in the other signedness (63536 for the bit pattern of −2000
    in 16 bits, a common export slip) is read as that bit pattern; one that no stored value can be is an
    :class:`InputError` naming the file and the tag."""
    numbers = _numbers(ds, keyword, path, count=1)
    if numbers is None:
        return None
    bits = _int(ds, "BitsAllocated", path, default=16, low=1)
    signed = _int(ds, "PixelRepresentation", path, default=0) == 1
    value = numbers[0]
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if value == int(value) and not low <= value <= high:
        if signed and 2 ** (bits - 1) <= value < 2**bits:
            value -= 2**bits
        elif not signed and -(2 ** (bits - 1)) <= value < 0:
            value += 2**bits
    if value != int(value) or not low <= value <= high:
        raise InputError(f"{path}: {keyword} {tag} = {numbers[0]:g} is not a {bits}-bit "
                         f"{'signed' if signed else 'unsigned'} pixel value, so it cannot mark padding; the header "
                         "is corrupted.")
    return int(value)


#: padding (outside the scan field) becomes air
PADDING_HU = -1024.0


def _slice_hu(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """One slice in HU (stored value × RescaleSlope + RescaleIntercept, 1/0 when absent), shaped (y, x), and
    its padding mask (None when the file declares no PixelPaddingValue).

    Stored values equal to PixelPaddingValue (0028,0120), or between it and PixelPaddingRangeLimit
    (0028,0121), are padding: they become air (−1024 HU). Other values that give HU no CT can hold
    (outside [−32768, 32767]) raise :class:`InputError` naming the file and the tags involved.
    """
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
    pad = _stored_value(ds, "PixelPaddingValue", "(0028,0120)", path)
    pad_limit = _stored_value(ds, "PixelPaddingRangeLimit", "(0028,0121)", path) if pad is not None else None
    pad_range = None if pad is None else (min(pad, pad_limit if pad_limit is not None else pad),
                                          max(pad, pad_limit if pad_limit is not None else pad))
    syntax = _transfer_syntax(ds)
    if syntax is None:
        raise InputError(f"{path}: TransferSyntaxUID {tag_text(ds.file_meta.get('TransferSyntaxUID'))!r} is not a "
                         "DICOM transfer syntax; the file is corrupted.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
        if raw.dtype.kind not in "iuf":
            raise ValueError(f"pixel values of type {raw.dtype}")
        with np.errstate(all="ignore"):
            hu = raw.astype(np.float64) * slope + intercept
        padding = None if pad_range is None else (raw >= pad_range[0]) & (raw <= pad_range[1])
    except Exception as exc:
        if not syntax.is_compressed:
            raise InputError(f"{path}: invalid pixel data ({type(exc).__name__}: {exc}).") from exc
        hu = _slice_hu_gdcm(path, exc)  # compressed syntax pydicom has no decoder for: SimpleITK's GDCM
        padding = None
        if pad_range is not None:  # GDCM applied the rescale: compare in HU
            bounds = sorted(v * slope + intercept for v in pad_range)
            padding = (hu >= bounds[0] - 1e-3) & (hu <= bounds[1] + 1e-3)
    if hu.shape != shape:
        raise InputError(f"{path}: pixel data is shaped {hu.shape}, but Rows/Columns say {shape}.")
    if not np.isfinite(hu).all():
        raise InputError(f"{path}: pixel values times RescaleSlope plus RescaleIntercept are not finite.")
    if padding is not None:
        hu[padding] = PADDING_HU
    kept = hu if padding is None else hu[~padding]
    if kept.size and (kept.min() < HU_LIMITS[0] or kept.max() > HU_LIMITS[1]):
        bad = float(kept.max() if kept.max() > HU_LIMITS[1] else kept.min())
        stored = (bad - intercept) / slope
        padding_note = ("the file lacks PixelPaddingValue (0028,0120)" if pad is None else
                        f"its PixelPaddingValue (0028,0120) is {pad}")
        raise InputError(f"{path}: stored value {stored:.6g} gives {bad:.6g} HU (RescaleSlope (0028,1053) {slope:g}, "
                         f"RescaleIntercept (0028,1052) {intercept:g}), which no CT can hold (HU lie within "
                         f"[{HU_LIMITS[0]:g}, {HU_LIMITS[1]:g}]); if that value marks padding outside the scan field, "
                         f"{padding_note}. The header does not match the pixel data.")
    return hu.astype(np.float32), (padding if padding is not None and padding.any() else None)


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
    padding: np.ndarray | None = None
    for k, (path, _) in enumerate(files):
        hu[k], slice_padding = _slice_hu(path, shape)
        if slice_padding is not None:
            if padding is None:
                padding = np.zeros(hu.shape, dtype=bool)
            padding[k] = slice_padding
    if not has_rescale:
        warnings.warn(f"Series in {folder}: RescaleSlope/RescaleIntercept missing in all {len(files)} files; "
                      "assuming 1/0 (stored values taken as HU).", stacklevel=3)
    _check_hu_range(hu, folder, padding)
    header = copy.deepcopy(files[0][1])
    return CTVolume(hu=hu, spacing=(col_spacing, row_spacing, step), origin=tuple(float(v) for v in positions[0]),
                    direction=tuple(direction.ravel()), dicom_header=header, source=str(folder), padding=padding)
