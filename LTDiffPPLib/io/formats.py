"""Which files are images and which outputs are DICOM folders, by name."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputError

__all__ = ["IMAGE_EXTENSIONS", "is_image_path", "output_is_image"]

IMAGE_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
_COMPRESSED_EXTENSIONS = (".nrrd", ".nhdr", ".nii.gz", ".mha", ".mhd")
_DETACHED_HEADER_EXTENSIONS = (".nhdr", ".mhd")  # header + separate data file


def _image_ext(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    return next((e for e in sorted(IMAGE_EXTENSIONS, key=len, reverse=True) if name.endswith(e)), None)


def is_image_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names an image file by extension; any other output path is a DICOM folder."""
    return _image_ext(path) is not None


#: extensions of files that cannot hold a CT in Hounsfield units with its geometry (8-bit or colour
#: pictures, documents, bare arrays, single DICOM files): refused as outputs rather than taken as folder names
_NOT_HU_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".svg", ".pdf", ".txt",
                      ".csv", ".json", ".md", ".html", ".xml", ".npy", ".npz", ".mat", ".h5", ".hdr", ".img", ".vtk",
                      ".vti", ".raw", ".zip", ".gz", ".dcm", ".dicom", ".safetensors", ".pt", ".pth")


def output_is_image(path: str | os.PathLike) -> bool:
    """True when output ``path`` is an image file, False when it is a folder for a DICOM series.

    Raises :class:`~LTDiffPPLib.errors.OutputError` for a name whose extension cannot hold HU (``.png``,
    ``.tif``, ``.dcm``, ...), naming the supported ones, instead of silently writing a folder of that name.
    """
    if is_image_path(path):
        return True
    suffix = Path(path).suffix.lower()
    if suffix in (".dcm", ".dicom"):
        raise OutputError(f"{path}: DICOM output is a folder (one file per slice); pass a folder path.")
    if suffix in _NOT_HU_EXTENSIONS:
        raise OutputError(f"{path}: a {suffix} file cannot hold Hounsfield units; name an image file ending in "
                          f"{', '.join(IMAGE_EXTENSIONS)}, or a folder (no extension) for a DICOM series.")
    return False
