"""Bounds of the numeric options of the CLI and the library, and their one-line errors.

Every number a user passes (a seed, sampling steps, a batch size, a dose, ...) is checked against a
range here before any work, so that a typo gives a clear message instead of a traceback from deep in
PyTorch or NumPy (a seed of 2**64) or a run of days (100 000 steps).
"""

from __future__ import annotations

import math

from .errors import InputError

#: seeds of the noise field and the simulator (NumPy and PyTorch generators take 0 ... 2**32 - 1 everywhere)
SEED = (0, 2**32 - 1)
#: sampling steps: the diffusion schedules are defined over 1000 training steps; more cannot help, and
#: on a CPU 1000 steps of a 512² slice already take about 100 times the default 10
STEPS = (1, 1000)
#: slices per forward pass
BATCH_SIZE = (1, 1024)
#: samples averaged per slice
ENSEMBLE = (1, 64)
#: worker processes
WORKERS = (1, 256)
#: projection angles over 180 degrees
VIEWS = (16, 20000)
#: incident photons per detector ray
DOSE = (1.0, 1e12)
#: slice thickness (mm)
THICKNESS_MM = (0.01, 100.0)
#: digital phantoms to simulate
PHANTOMS = (0, 10000)
#: square ROIs and their side (pixels) in `evaluate`
ROIS = (1, 100000)
ROI_SIZE = (2, 4096)


def check_int(name: str, value: object, bounds: tuple[int, int]) -> int:
    """``value`` as an int within ``bounds`` (inclusive), else :class:`InputError` naming ``name``."""
    lo, hi = bounds
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise InputError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}") from None
    if isinstance(value, bool) or not lo <= number <= hi:
        raise InputError(f"{name} must be a whole number from {lo} to {hi}, got {value}")
    return number


def check_float(name: str, value: object, bounds: tuple[float, float]) -> float:
    """``value`` as a finite float within ``bounds`` (inclusive), else :class:`InputError` naming ``name``."""
    lo, hi = bounds
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise InputError(f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise InputError(f"{name} must be a number from {lo:g} to {hi:g}, got {value}")
    return number
