"""Digital phantoms: built-in CT samples that need no external data.

:func:`qa_phantom` is a sensitometry phantom in the manner of a CT QA module (e.g. Catphan CTP404): a
water cylinder in air with rods of known attenuation. It is the built-in sample of the demo and the
tests until the digital chest phantom lands (Paired-kernel data issue).
"""

from __future__ import annotations

import numpy as np

#: rod material → HU (nominal values of common sensitometry inserts)
QA_RODS: dict[str, float] = {"air": -1000.0, "lung": -850.0, "fat": -100.0, "acrylic": 120.0, "bone50": 700.0, "teflon": 950.0}


def qa_phantom(
    shape: tuple[int, int, int] = (8, 256, 256),
    spacing_mm: float = 0.8,
    noise_hu: float = 10.0,
    seed: int = 0,
) -> np.ndarray:
    """A (z, y, x) float32 HU volume: air (−1000), a 200 mm water cylinder (0 HU), six rods of 12 mm.

    Rods of :data:`QA_RODS` sit on a ring of radius 60 mm; white Gaussian noise of SD ``noise_hu`` is
    added (seeded). Lengths are in mm at in-plane pixel size ``spacing_mm``.
    """
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    yy = (yy - (ny - 1) / 2) * spacing_mm
    xx = (xx - (nx - 1) / 2) * spacing_mm
    img = np.full((ny, nx), -1000.0, dtype=np.float32)
    img[xx**2 + yy**2 <= 100.0**2] = 0.0
    for k, hu in enumerate(QA_RODS.values()):
        angle = 2 * np.pi * k / len(QA_RODS)
        cx, cy = 60.0 * np.cos(angle), 60.0 * np.sin(angle)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= 6.0**2] = hu
    rng = np.random.default_rng(seed)
    vol = np.repeat(img[None], nz, axis=0)
    return (vol + rng.normal(0.0, noise_hu, size=vol.shape)).astype(np.float32)
