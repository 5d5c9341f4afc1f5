"""Reading and writing CT volumes: DICOM series (pydicom) and image files (SimpleITK).

Every volume is a :class:`CTVolume`: float32 Hounsfield units shaped (z, y, x) plus SimpleITK-style
geometry (spacing, origin and direction in mm, LPS patient coordinates, all in (x, y, z) order).
Bad inputs raise :class:`~LTDiffPPLib.errors.InputError`, problems with an output path raise
:class:`~LTDiffPPLib.errors.OutputError`; both name the file or folder. Every write goes through
:func:`atomic_output`, so a failed write leaves neither a partial output nor a damaged old one.

The modules, by what they hold:

- :mod:`.volume` — :class:`CTVolume`, the HU-range and memory checks every reader applies
- :mod:`.formats` — image extensions; which output paths are image files and which DICOM folders
- :mod:`.dicom_read` / :mod:`.dicom_write` — DICOM CT series (pydicom)
- :mod:`.images` — image files and SimpleITK conversion
- :mod:`.readwrite` — :func:`read_volume` / :func:`write_volume`, choosing by path
- :mod:`.atomic` — atomic output (temporary, then rename), output-path checks, the output lock
- :mod:`.machine` — available memory, CPU name, software versions
"""

from __future__ import annotations

from .atomic import atomic_output, check_not_input, check_output_path, output_lock
from .dicom_read import DicomSeriesInfo, list_dicom_series, read_dicom_series
from .dicom_write import CT_IMAGE_STORAGE, series_description, write_dicom_series
from .formats import IMAGE_EXTENSIONS, is_image_path, output_is_image
from .images import from_sitk, read_image, resample_inplane, to_sitk, write_image
from .machine import available_memory, cpu_name, software_versions
from .readwrite import read_volume, write_volume
from .volume import HU_LIMITS, CTVolume, check_memory

__all__ = [
    "series_description",
    "CT_IMAGE_STORAGE", "HU_LIMITS", "IMAGE_EXTENSIONS", "CTVolume", "DicomSeriesInfo", "atomic_output",
    "available_memory", "check_memory", "check_not_input", "check_output_path", "cpu_name", "from_sitk",
    "is_image_path", "list_dicom_series", "output_is_image", "output_lock", "read_dicom_series", "read_image",
    "read_volume", "resample_inplane", "software_versions", "to_sitk", "write_dicom_series", "write_image",
    "write_volume",
]
