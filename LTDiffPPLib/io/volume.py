"""The in-memory CT volume and the checks every reader applies to it.

:class:`CTVolume`: float32 Hounsfield units shaped (z, y, x) plus SimpleITK-style geometry (spacing,
origin and direction in mm, LPS patient coordinates, all in (x, y, z) order). :func:`check_memory`
refuses a volume too large to read before any voxel is allocated; ``_check_hu_range`` refuses values
no CT in HU can hold.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace

import numpy as np
from pydicom.dataset import Dataset

from ..errors import InputError
from .machine import available_memory

__all__ = ["HU_LIMITS", "CTVolume", "check_memory"]


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
