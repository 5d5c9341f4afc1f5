"""Which files are images and which outputs are DICOM folders, by name."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "is_image_path"]

IMAGE_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
_COMPRESSED_EXTENSIONS = (".nrrd", ".nhdr", ".nii.gz", ".mha", ".mhd")
_DETACHED_HEADER_EXTENSIONS = (".nhdr", ".mhd")  # header + separate data file


def _image_ext(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    return next((e for e in sorted(IMAGE_EXTENSIONS, key=len, reverse=True) if name.endswith(e)), None)


def is_image_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names an image file by extension; any other output path is a DICOM folder."""
    return _image_ext(path) is not None
