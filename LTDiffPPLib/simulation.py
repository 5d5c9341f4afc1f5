"""CT physics simulation: one raw scan reconstructed with several kernels, the way a scanner does.

For each axial slice (y, x) of a volume in HU:

1. HU → linear attenuation μ = μ_water · (1 + HU/1000) (mm⁻¹; air and below → 0);
2. forward projection in parallel-beam geometry (astra-toolbox, CPU; a clinical fan-beam scan rebinned
   to parallel has this geometry), ``views`` angles over 180°, detector pitch = pixel size;
3. Poisson noise of ``dose`` incident photons per ray (plus optional Gaussian electronic noise), and
   the log transform back to line integrals — one noisy sinogram per slice;
4. filtered back-projection of that SAME sinogram with each kernel: ramp × the kernel's window W(f)
   (implemented as one ramp-filtered back-projection followed by each kernel's window as a radial 2D
   filter, which the Fourier slice theorem makes equivalent; extra kernels then cost almost nothing);
5. what a scanner does to stored images: HU clipped to −1024…3071 and rounded to integers.

The kernel windows are calibrated on the only real paired-kernel data we have (one chest slice
reconstructed with Siemens B10f/B30f/B50f/B70f from the same projections): the ratio of a kernel's
window to B30f's is the measured √(P_kernel / P_B30f) of that slice (the kernel library,
:mod:`LTDiffPPLib.kernels`). Because every kernel filters the same sinogram, the ratio of
two simulated reconstructions' spectra is exactly the ratio of their windows (up to clipping and
rounding), so the simulated pair reproduces the real one; ``tests/test_simulation.py`` checks 15 %.
The absolute B30f window is a Gaussian-like roll-off whose width reproduces the real pair's noise-SD
ratio B70f/B30f (:data:`LTDiffPPLib.kernels.REFERENCE_F50_MM`); ``docs/SIMULATION.md`` reports every kernel's MTF and NPS.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .errors import InputError
from .io import CTVolume
from .kernels import CALIBRATION_PATH, get_kernel

MU_WATER_PER_MM = 0.0193  # water at ~70 keV effective energy (NIST XCOM: μ/ρ = 0.193 cm²/g)
STORED_HU_RANGE = (-1024.0, 3071.0)  # 12-bit stored CT values

# -------------------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class ScanProtocol:
    """Acquisition: ``dose`` incident photons per detector ray (None: noise-free), ``views`` angles
    over 180°, Gaussian ``electronic_noise`` (SD in photon counts), μ_water in mm⁻¹."""

    dose: float | None = 2.0e5
    views: int = 720
    electronic_noise: float = 0.0
    mu_water_per_mm: float = MU_WATER_PER_MM

    def __post_init__(self) -> None:
        if self.dose is not None and not self.dose > 0:
            raise InputError(f"dose must be a positive photon count per ray, got {self.dose}")
        if self.views < 16:
            raise InputError(f"at least 16 views are needed, got {self.views}")


@lru_cache(maxsize=4)
def _projectors(ny: int, nx: int, views: int) -> tuple[int, int]:
    """astra CPU projector ids for (forward projection, back-projection), per process and geometry.

    Forward: Joseph's method (``linear``). Back-projection: area-weighted (``strip``), i.e. each
    detector bin integrated over its aperture. Linear-interpolation back-projection aliases the
    ramp-filtered high frequencies into a moiré centred on the rotation axis: 4.5 HU SD in the noise-free
    centre of a 200 mm water cylinder, against 0.09 HU with ``strip`` (``tests/test_simulation.py``).
    """
    import astra

    n_det = int(math.ceil(math.hypot(ny, nx))) + 2
    vol = astra.create_vol_geom(ny, nx)
    proj = astra.create_proj_geom("parallel", 1.0, n_det, np.linspace(0.0, np.pi, views, endpoint=False))
    return astra.create_projector("linear", proj, vol), astra.create_projector("strip", proj, vol)


@lru_cache(maxsize=8)
def _ramp(n_det: int) -> np.ndarray:
    """Frequency response (rfft layout, per pixel) of the band-limited spatial-domain ramp (Kak & Slaney),
    which has the right DC term, for detector rows of ``n_det`` samples zero-padded to a power of two."""
    n_pad = 1 << int(math.ceil(math.log2(2 * n_det)))
    k = np.arange(-(n_pad // 2), n_pad // 2)
    h = np.zeros(n_pad)
    h[k == 0] = 0.25
    odd = k % 2 == 1
    h[odd] = -1.0 / (np.pi * k[odd]) ** 2
    return np.abs(np.fft.rfft(np.fft.ifftshift(h)))


@lru_cache(maxsize=16)
def _window_2d(ny: int, nx: int, pixel_mm: float, kernel: str) -> np.ndarray:
    """A kernel's window W(|f|) on the rfft2 grid of a (2ny, 2nx) zero-padded image."""
    fy = np.fft.fftfreq(2 * ny, d=pixel_mm)[:, None]
    fx = np.fft.rfftfreq(2 * nx, d=pixel_mm)[None, :]
    return get_kernel(kernel).window(np.sqrt(fy * fy + fx * fx))


def _ramp_fbp(sino: np.ndarray, bp_id: int) -> np.ndarray:
    """Ramp-filtered back-projection (no kernel window) of a (views, detectors) sinogram, pixel units."""
    import astra

    n_views, n_det = sino.shape
    h = _ramp(n_det)
    n_pad = 2 * (len(h) - 1)
    filtered = np.fft.irfft(np.fft.rfft(sino, n=n_pad, axis=1) * h, n=n_pad, axis=1)[:, :n_det]
    data_id, bp = astra.create_backprojection(filtered.astype(np.float32), bp_id)
    astra.data2d.delete(data_id)
    return bp.astype(np.float64) * (np.pi / n_views)


def _apply_window(image: np.ndarray, pixel_mm: float, kernel: str) -> np.ndarray:
    """Filter a ramp-only reconstruction (attenuation, zero outside the object) with a kernel's window.

    By the Fourier slice theorem, filtering every projection with W(|f|) before back-projection equals
    filtering the reconstruction with the radial 2D filter W(|f|); so one back-projection serves every
    kernel. Zero-padding to twice the size keeps the filter from wrapping around the image edges.
    """
    ny, nx = image.shape
    spec = np.fft.rfft2(image, s=(2 * ny, 2 * nx)) * _window_2d(ny, nx, pixel_mm, kernel)
    return np.fft.irfft2(spec, s=(2 * ny, 2 * nx))[:ny, :nx]


def simulate_slice(
    hu: np.ndarray,
    pixel_mm: float,
    kernels: Sequence[str],
    protocol: ScanProtocol,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """One (y, x) HU slice → one reconstruction per kernel (float32 HU, not yet clipped or rounded)."""
    import astra

    ny, nx = hu.shape
    fp_id, bp_id = _projectors(ny, nx, protocol.views)
    mu_px = protocol.mu_water_per_mm * pixel_mm * (1.0 + np.maximum(hu, -1000.0) / 1000.0)
    sino_id, sino = astra.create_sino(mu_px.astype(np.float32), fp_id)
    astra.data2d.delete(sino_id)
    sino = sino.astype(np.float64)
    if protocol.dose is not None:
        expected = protocol.dose * np.exp(-sino)
        counts = rng.poisson(expected).astype(np.float64)
        if protocol.electronic_noise:
            counts += rng.normal(0.0, protocol.electronic_noise, counts.shape)
        sino = -np.log(np.maximum(counts, 0.5) / protocol.dose)  # <1 count: a detector floor of 0.5
    scale = 1000.0 / (protocol.mu_water_per_mm * pixel_mm)
    ramp_only = _ramp_fbp(sino, bp_id)
    return [(_apply_window(ramp_only, pixel_mm, k) * scale - 1000.0).astype(np.float32) for k in kernels]


def store_as_scanner(hu: np.ndarray) -> np.ndarray:
    """What a scanner does to stored images: clip to −1024…3071 HU and round to integers (float32)."""
    return np.rint(np.clip(hu, *STORED_HU_RANGE)).astype(np.float32)


def _simulate_one(args: tuple) -> list[np.ndarray]:
    hu, pixel_mm, kernels, protocol, seed, index = args
    rng = np.random.default_rng([seed, index])  # per slice: results do not depend on the worker count
    return simulate_slice(hu, pixel_mm, kernels, protocol, rng)


@dataclass
class SimulationResult:
    """Simulated reconstructions by kernel name, with the settings that made them."""

    volumes: dict[str, CTVolume]
    protocol: ScanProtocol
    seed: int
    thickness_mm: float | None
    provenance: dict = field(default_factory=dict)


def simulate(
    volume: CTVolume,
    kernels: Sequence[str],
    *,
    protocol: ScanProtocol | None = None,
    thickness_mm: float | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Scan ``volume`` once and reconstruct the same noisy raw data with each kernel.

    Returns volumes on the input grid (or, with ``thickness_mm``, with thick slices: consecutive
    reconstructed slices averaged in groups of thickness/spacing, as scanners derive thick slices from
    thin ones; noise falls by √group). Seeded per slice, so the result does not depend on ``workers``
    (default: all cores). ``progress(done, total)`` counts slices.
    """
    protocol = protocol or ScanProtocol()
    names = [get_kernel(k).name for k in kernels]
    if len(set(names)) != len(names) or not names:
        raise InputError(f"give one or more distinct kernels, got {list(kernels)}")
    sx, sy, sz = volume.spacing
    if abs(sx - sy) > 0.01 * sx:
        raise InputError(f"{volume.source or 'volume'}: in-plane pixels are not square ({sx} × {sy} mm)")
    group = _thickness_group(thickness_mm, sz, volume.source)
    n = volume.hu.shape[0]
    jobs = [(volume.hu[i], sx, tuple(names), protocol, seed, i) for i in range(n)]
    out = {k: np.empty(volume.hu.shape, np.float32) for k in names}
    workers = workers or min(os.cpu_count() or 1, n)
    if workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_simulate_one, jobs, chunksize=1)
            _collect(results, out, names, n, progress)
    else:
        _collect(map(_simulate_one, jobs), out, names, n, progress)
    vols = {}
    for k, hu in out.items():
        vol = volume.with_hu(hu)
        if group > 1:
            vol = _average_slabs(vol, group)
        vols[k] = vol.with_hu(store_as_scanner(vol.hu))
    prov = {"kernels": names, "dose": protocol.dose, "views": protocol.views, "seed": seed,
            "electronic_noise": protocol.electronic_noise, "thickness_mm": thickness_mm,
            "source": volume.source, "calibration": str(CALIBRATION_PATH.name)}
    return SimulationResult(vols, protocol, seed, thickness_mm, prov)


def _collect(results, out, names, n, progress) -> None:
    for i, recs in enumerate(results):
        for k, rec in zip(names, recs):
            out[k][i] = rec
        if progress is not None:
            progress(i + 1, n)


def _thickness_group(thickness_mm: float | None, sz: float, source: str) -> int:
    if thickness_mm is None:
        return 1
    group = round(thickness_mm / sz)
    if group < 1 or abs(group * sz - thickness_mm) > 0.1 * thickness_mm:
        raise InputError(
            f"{source or 'volume'}: slice thickness {thickness_mm} mm cannot be made from {sz} mm slices "
            "(it must be a whole multiple of the input spacing; simulate a phantom at a finer spacing)"
        )
    return group


def _average_slabs(vol: CTVolume, group: int) -> CTVolume:
    n = (vol.hu.shape[0] // group) * group
    if n == 0:
        raise InputError(f"{vol.source or 'volume'}: fewer slices ({vol.hu.shape[0]}) than one thick slice ({group})")
    hu = vol.hu[:n].reshape(-1, group, *vol.hu.shape[1:]).mean(axis=1)
    d = np.array(vol.direction).reshape(3, 3)
    shift = (group - 1) / 2 * vol.spacing[2] * d[:, 2]  # centre of the first group
    return CTVolume(hu=hu, spacing=(vol.spacing[0], vol.spacing[1], vol.spacing[2] * group),
                    origin=tuple(np.array(vol.origin) + shift), direction=vol.direction,
                    dicom_header=vol.dicom_header, source=vol.source)
