"""A volume from, or to, a path: a DICOM series folder or an image file, chosen by the path."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom

from ..errors import InputError
from .dicom_read import read_dicom_series
from .dicom_write import write_dicom_series
from .formats import output_is_image
from .images import read_image, write_image
from .volume import CTVolume

__all__ = ["read_volume", "write_volume"]


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


def write_volume(volume: CTVolume, path: str | os.PathLike, *, overwrite: bool = False,
                 series_description: str = "LTDiffPP standardized", convolution_kernel: str = "",
                 provenance: dict[str, str] | None = None) -> Path:
    """Write an image file when ``path`` has an image extension, else a DICOM series into folder ``path``.

    An extension that cannot hold HU (``.png``, ``.tif``, ...) is refused (:func:`output_is_image`), and so
    is a path that is, holds or lies inside ``volume.source`` (inputs are never modified)."""
    path = Path(path)
    if output_is_image(path):
        return write_image(volume, path, overwrite=overwrite, provenance=provenance)
    return write_dicom_series(volume, path, series_description=series_description,
                              convolution_kernel=convolution_kernel, overwrite=overwrite, provenance=provenance)
