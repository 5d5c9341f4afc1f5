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
    ``padding`` is None or a bool mask shaped like ``hu``: True where a DICOM series marked voxels as
    padding (PixelPaddingValue: outside the scan field). They read as air (−1024 HU), and :meth:`with_hu`
    keeps them so, which leaves them outside what a conversion changes. A copy of another shape (sliced,
    resampled) drops the mask.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    dicom_header: Dataset | None = None
    source: str = ""
    padding: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.hu = np.asarray(self.hu, dtype=np.float32)
        if self.hu.ndim != 3:
            raise InputError(f"{self.source or 'volume'}: voxels must be shaped (z, y, x), got {self.hu.shape}")
        self.spacing = tuple(float(v) for v in self.spacing)
        self.origin = tuple(float(v) for v in self.origin)
        self.direction = tuple(float(v) for v in self.direction)
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise InputError(f"{self.source or 'volume'}: spacing/origin need 3 values and direction 9")
        if self.padding is not None:
            self.padding = np.asarray(self.padding, dtype=bool)
            if self.padding.shape != self.hu.shape:
                self.padding = None

    def with_hu(self, hu: np.ndarray) -> CTVolume:
        """The same geometry and header with new voxels (HU, same (z, y, x) shape, made float32); padding
        voxels keep their value (air), whatever ``hu`` holds there."""
        hu = np.asarray(hu)
        if hu.shape != self.hu.shape:
            raise InputError(f"{self.source or 'volume'}: new voxels are shaped {hu.shape}, expected {self.hu.shape}")
        if self.padding is not None:
            hu = np.where(self.padding, self.hu, hu)
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


#: the Hounsfield units a CT can hold: those of signed 16-bit storage (extended-scale scanners reach about
#: +30 700 HU). Values outside are not HU, whatever the rescale: unsigned stored values whose padding or
#: offset was not applied (63 536, the bit pattern of −2000, read as 62 512 HU), or not a CT image.
HU_LIMITS = (-32768.0, 32767.0)


def _check_hu_range(hu: np.ndarray, source: str | os.PathLike, padding: np.ndarray | None = None) -> None:
    """Refuse values no CT in HU can hold; warn when the volume looks like raw unsigned stored values
    (judged without ``padding`` voxels, which read as air)."""
    values = hu if padding is None else hu[~padding]
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())
    if lo < HU_LIMITS[0] or hi > HU_LIMITS[1]:
        raise InputError(f"{source}: values range from {lo:.6g} to {hi:.6g}, far outside the Hounsfield scale "
                         f"[{HU_LIMITS[0]:g}, {HU_LIMITS[1]:g}]; this is not a CT in HU (wrong rescale slope or "
                         "intercept, or not a CT image).")
    if lo >= 0 and hi >= 1000:
        warnings.warn(f"{source}: no voxel is below 0 HU (range {lo:.0f} to {hi:.0f}), so there is no air, lung or "
                      "fat; these look like raw unsigned stored values (air 0, water 1024) rather than HU. Check the "
                      "rescale intercept: results will be wrong if they are not HU.", stacklevel=3)
