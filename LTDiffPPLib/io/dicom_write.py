"""Writing a volume as a new derived DICOM CT series (pydicom), one file per slice, atomically."""

from __future__ import annotations

import copy
import datetime
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ..errors import InputError
from .atomic import atomic_output, check_not_input, write_failure
from .dicom_read import tag_text
from .machine import software_versions
from .volume import CTVolume

__all__ = ["CT_IMAGE_STORAGE", "write_dicom_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_INT16_MIN, _INT16_MAX = -32768, 32767
_PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])
# Patient/study/equipment attributes copied from the source header into a written series.
_CARRIED_TAGS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "PatientIdentityRemoved", "DeidentificationMethod", "StudyInstanceUID",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription", "ReferringPhysicianName",
    "InstitutionName", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "PatientPosition",
    "Laterality", "PositionReferenceIndicator", "ContrastBolusAgent", "KVP", "AcquisitionDate", "AcquisitionTime",
)
# required, possibly empty (type 2, and the type 2C ones of the CT Image IOD that dciodvfy asks for)
_TYPE2_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
               "AccessionNumber", "ReferringPhysicianName", "Manufacturer", "KVP", "PositionReferenceIndicator",
               "AcquisitionNumber", "PatientPosition", "Laterality")


def series_description(kernels: str, name: str, solver: str, steps: int, seed: int) -> str:
    """The description of a converted series (``kernels``: e.g. "LTDiffPP B30f->B70f"; model ``name``,
    sampling ``solver``/``steps`` and ``seed``), within DICOM's 64 characters (the model's name and the sampling
    are also in DerivationDescription and the provenance): dropped piece by piece while it does not fit."""
    for text in (f"{kernels} ({name}, {solver} {steps} steps, seed {seed})", f"{kernels} {name} {solver} {steps} steps",
                 f"{kernels} {solver} {steps} steps seed {seed}", f"{kernels} {solver} {steps} steps", kernels):
        if len(text) <= 64:
            return text
    return kernels[:64]


def _ds(value: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters)."""
    return format_number_as_ds(float(round(value, 6)) + 0.0)


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
    if "SpecificCharacterSet" in ds and not tag_text(ds.SpecificCharacterSet):
        del ds.SpecificCharacterSet  # empty is not allowed (type 1C); absent means the default repertoire
    if not tag_text(ds.get("StudyInstanceUID")):
        ds.StudyInstanceUID = generate_uid()  # type 1: a source without one gets a new study
    for keyword in _TYPE2_TAGS:  # required, possibly empty
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.SOPClassUID, ds.Modality, ds.ImageType = CT_IMAGE_STORAGE, "CT", ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = tag_text(header.get("FrameOfReferenceUID")) or generate_uid()
    old_number = tag_text(header.get("SeriesNumber"))
    ds.SeriesNumber = int(old_number) + 1000 if old_number.lstrip("-").isdigit() else 1000
    ds.SeriesDescription = _fit(series_description, 64, "SeriesDescription")
    if convolution_kernel:
        ds.ConvolutionKernel = _fit(convolution_kernel, 16, "ConvolutionKernel")
    source = tag_text(header.get("SeriesInstanceUID")) or volume.source or "(unknown)"
    source_kernel = tag_text(header.get("ConvolutionKernel"))
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
    check_not_input(folder, [volume.source])
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
                raise write_failure(folder / f"IM{k + 1:05d}.dcm", exc) from exc
    return folder
