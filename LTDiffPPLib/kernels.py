"""The kernel library: reconstruction kernels, their frequency responses and how they were calibrated.

One place for the kernel concept. A :class:`Kernel` is an FBP window W(f) (f in mm⁻¹) — what the
simulator (:mod:`LTDiffPPLib.simulation`) multiplies the ramp filter by. The windows are calibrated on the
only real paired-kernel data we have (one chest slice reconstructed with Siemens B10f/B30f/B50f/B70f from
the same projections): the ratio of a kernel's window to B30f's is the measured √(P_kernel / P_B30f) of
that slice (:func:`kernel_ratio`, ``resources/kernel_calibration.json``, ``bench/calibrate_kernels.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator

from .errors import InputError

REFERENCE_KERNEL = "B30f"
CALIBRATION_PATH = Path(__file__).resolve().parent / "resources" / "kernel_calibration.json"

# ------------------------------------------------------------------------------------------ kernels


#: Half-response frequency (mm⁻¹) of the reference B30f window. The ratios between kernels come from the
#: real pair's spectra; this absolute scale comes from the real pair's *noise*: in the five most
#: homogeneous soft-tissue windows of test1 the B70f/B30f noise SD ratio is 6.8 (B30f 13.6 HU, B70f
#: 90.6 HU; ``kernel_calibration.json``), and with 0.45 mm⁻¹ a simulated water scan at the same pixel
#: size gives 7.0 (B30f 11.9 HU, B70f 83.9 HU at 2e5 photons/ray). With 0.38 it gave only 4.7: the
#: back-projector's aperture removes high-frequency noise, which the sharp kernel has most of.
REFERENCE_F50_MM = 0.45


def reference_window(f_mm: np.ndarray) -> np.ndarray:
    """Window W(f) of the reference smooth kernel (B30f-like): exp(−ln2 · (f/f50)²·²), f in mm⁻¹."""
    return np.exp(-math.log(2.0) * (np.abs(f_mm) / REFERENCE_F50_MM) ** 2.2)


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel: FBP window W(f) = reference_window(f) · exp(log_ratio(f)).

    ``log_ratio`` is interpolated (monotone cubic, PCHIP) through ``(0, 0)`` and the calibration
    points ``(freqs_mm, log(ratios))``; beyond the last point it continues with the last slope.
    """

    name: str
    description: str
    freqs_mm: tuple[float, ...] = ()
    ratios: tuple[float, ...] = ()

    def window(self, f_mm: np.ndarray) -> np.ndarray:
        f = np.abs(np.asarray(f_mm, dtype=np.float64))
        if not self.freqs_mm:
            return reference_window(f)
        x = np.array((0.0, *self.freqs_mm))
        y = np.log(np.array((1.0, *self.ratios)))
        inside = PchipInterpolator(x, y, extrapolate=False)(np.minimum(f, x[-1]))
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        log_ratio = np.where(f > x[-1], y[-1] + slope * (f - x[-1]), inside)
        return reference_window(f) * np.exp(log_ratio)


def load_kernels(path: str | os.PathLike = CALIBRATION_PATH) -> dict[str, Kernel]:
    """The kernel library: the reference kernel plus one kernel per calibrated ratio."""
    cal = json.loads(Path(path).read_text())
    use = [i for i, f in enumerate(cal["frequencies_mm"]) if f <= cal["max_frequency_used_mm"]]
    freqs = tuple(cal["frequencies_mm"][i] for i in use)
    kernels = {REFERENCE_KERNEL: Kernel(REFERENCE_KERNEL, cal["descriptions"][REFERENCE_KERNEL])}
    for name, ratios in cal["ratios_to_reference"].items():
        kernels[name] = Kernel(name, cal["descriptions"][name], freqs, tuple(ratios[i] for i in use))
    return kernels


@lru_cache(maxsize=1)
def kernel_library() -> dict[str, Kernel]:
    """The calibrated kernels shipped in ``resources/kernel_calibration.json``, by name."""
    return load_kernels()


def get_kernel(name: str) -> Kernel:
    lib = kernel_library()
    try:
        return lib[name]
    except KeyError:
        raise InputError(f"unknown kernel {name!r}; the simulator knows {', '.join(lib)}") from None


# ------------------------------------------------------------------------------ kernel measurement


def kernel_ratio(
    sharp: np.ndarray,
    smooth: np.ndarray,
    pixel_mm: float,
    freqs_mm: Sequence[float],
    *,
    half_width_mm: float = 0.05,
    crop: int = 128,
) -> np.ndarray:
    """√(P_sharp / P_smooth) in frequency bands, from the same slice reconstructed with two kernels.

    Power spectra are summed over Hann-windowed ``crop``² crops lying entirely inside the body (tiles
    at half-crop stride), so the clipped air outside the patient and the skin edge do not enter; each
    band is ``f ± half_width_mm`` (mm⁻¹). On the real pair this agrees between body regions within a
    few per cent up to ~0.6 mm⁻¹ (whole-image spectra instead hit a noise floor above ~0.5 mm⁻¹).
    Inputs are (y, x) HU slices on the same grid.
    """
    from .radiomics import body_mask  # here, not at import: it loads pandas

    if sharp.shape != smooth.shape or sharp.ndim != 2:
        raise InputError(f"kernel_ratio needs two (y, x) slices of one shape, got {sharp.shape} and {smooth.shape}")
    inside = ndimage.binary_erosion(body_mask(smooth[None])[0], iterations=3)
    win = np.outer(np.hanning(crop), np.hanning(crop))
    f = np.fft.fftfreq(crop, d=pixel_mm)
    fr = np.hypot(*np.meshgrid(f, f))
    p_sharp = np.zeros_like(fr)
    p_smooth = np.zeros_like(fr)
    step = crop // 2
    n_tiles = 0
    for y0 in range(0, sharp.shape[0] - crop + 1, step):
        for x0 in range(0, sharp.shape[1] - crop + 1, step):
            if not inside[y0 : y0 + crop, x0 : x0 + crop].all():
                continue
            for img, acc in ((sharp, p_sharp), (smooth, p_smooth)):
                tile = img[y0 : y0 + crop, x0 : x0 + crop].astype(np.float64)
                acc += np.abs(np.fft.fft2((tile - tile.mean()) * win)) ** 2
            n_tiles += 1
    if n_tiles == 0:
        raise InputError(f"no {crop}×{crop} region lies entirely inside the body; cannot measure kernel spectra")
    out = []
    for c in freqs_mm:
        band = (fr >= c - half_width_mm) & (fr < c + half_width_mm)
        out.append(math.sqrt(p_sharp[band].sum() / p_smooth[band].sum()))
    return np.array(out)
