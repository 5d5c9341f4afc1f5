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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


LIBRARY_PATH = Path(__file__).resolve().parent / "resources" / "kernel_library.json"
CONVERTIBLE = ("reference", "real-pair", "equivalent", "equivalent-interpolated", "published-mtf")
"""Calibrations that give a kernel a frequency response (``"none"`` does not)."""


def parametric_mtf(f_mm: np.ndarray, mtf50: float, mtf10: float) -> np.ndarray:
    """exp(−ln2 · (f/f50)^p) with p such that the curve passes 0.1 at f10 (f, f50, f10 in mm⁻¹): the
    monotone MTF through a published MTF50 and MTF10 (no mid-frequency overshoot)."""
    p = math.log(math.log(10.0) / math.log(2.0)) / math.log(mtf10 / mtf50)
    return np.exp(-math.log(2.0) * (np.abs(f_mm) / mtf50) ** p)


def mtf_points(f: np.ndarray, mtf: np.ndarray, start: int = 0) -> tuple[float | None, float | None]:
    """(MTF50, MTF10): the first frequency of ``f`` (mm⁻¹) from index ``start`` on where ``mtf`` falls
    below 0.5 / 0.1, None where it never does."""
    out = []
    for level in (0.5, 0.1):
        below = np.nonzero(mtf[start:] < level)[0]
        out.append(None if below.size == 0 else float(f[start + below[0]]))
    return out[0], out[1]


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel of the library: FBP window W(f) = reference_window(f) · exp(log_ratio(f)).

    ``calibration`` says where the response comes from (``resources/kernel_library.json`` defines each:
    ``"reference"``, ``"real-pair"``, ``"equivalent"``, ``"equivalent-interpolated"``, ``"published-mtf"``,
    or ``"none"`` — identified from DICOM headers but with no response, so never converted). For a
    real-pair kernel the log ratio to B30f is interpolated (monotone cubic, PCHIP) through ``(0, 0)`` and
    the calibration points ``(freqs_mm, log(ratios))`` and continued with the last slope beyond them.
    """

    name: str
    description: str
    freqs_mm: tuple[float, ...] = ()
    ratios: tuple[float, ...] = ()
    vendor: str = "Siemens"
    calibration: str = "reference"
    source: str = ""
    dicom: tuple[str, ...] = ()
    equivalent_to: str = ""
    published_mtf: tuple[tuple[float, float], ...] = ()  # (MTF50, MTF10) in lp/cm
    caveat: str = ""
    log_ratio_fn: Callable[[np.ndarray], np.ndarray] | None = field(default=None, compare=False, repr=False)

    @property
    def has_response(self) -> bool:
        return self.calibration != "none"

    @property
    def doubtful(self) -> bool:
        """Its response is contradicted by measurements on real data (the ``caveat`` says which): the guard
        converts from or to it only with ``force``."""
        return self.caveat.startswith("doubtful")

    def window(self, f_mm: np.ndarray) -> np.ndarray:
        """W(|f|), f in mm⁻¹ (any shape). Raises :class:`InputError` for a kernel without a response."""
        f = np.abs(np.asarray(f_mm, dtype=np.float64))
        if not self.has_response:
            raise InputError(f"kernel {self.name} ({self.vendor}) has no known frequency response; "
                             "it can be identified but not converted from or to")
        if self.log_ratio_fn is not None:
            return reference_window(f) * np.exp(self.log_ratio_fn(f))
        if not self.freqs_mm:
            return reference_window(f)
        x = np.array((0.0, *self.freqs_mm))
        y = np.log(np.array((1.0, *self.ratios)))
        inside = PchipInterpolator(x, y, extrapolate=False)(np.minimum(f, x[-1]))
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        log_ratio = np.where(f > x[-1], y[-1] + slope * (f - x[-1]), inside)
        return reference_window(f) * np.exp(log_ratio)

    def system_mtf(self, f_mm: np.ndarray) -> np.ndarray:
        """The MTF of a scan reconstructed with this kernel: W(f) × the system blur (projector and pixel
        aperture) of the library's reference, whose B30f MTF50/MTF10 the library file states."""
        ref = _library_file()["reference_system_mtf"]
        f = np.abs(np.asarray(f_mm, dtype=np.float64))
        blur = parametric_mtf(f, ref["mtf50_per_mm"], ref["mtf10_per_mm"]) / np.maximum(reference_window(f), 1e-300)
        return self.window(f) * blur

    def mtf_points(self, f_max: float = 1.0) -> tuple[float | None, float | None]:
        """(MTF50, MTF10) of :meth:`system_mtf` in mm⁻¹: the first frequency above the peak where it falls
        below 0.5 / 0.1; None where that lies beyond ``f_max``."""
        f = np.linspace(0.0, f_max, 2001)
        m = self.system_mtf(f)
        return mtf_points(f, m, start=int(np.argmax(m)))


@lru_cache(maxsize=1)
def _library_file() -> dict:
    return json.loads(LIBRARY_PATH.read_text(encoding="utf-8"))


def _kernel_number(name: str) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    if not digits:
        raise ValueError(f"no kernel number in {name!r}")
    return int(digits)


def load_kernels(path: str | os.PathLike = CALIBRATION_PATH,
                 library_path: str | os.PathLike | None = LIBRARY_PATH) -> dict[str, Kernel]:
    """The kernel library by name: the kernels calibrated on the real pair (``path``) and, with
    ``library_path``, every other kernel of the library file with its response built from its calibration."""
    cal = json.loads(Path(path).read_text())
    use = [i for i, f in enumerate(cal["frequencies_mm"]) if f <= cal["max_frequency_used_mm"]]
    freqs = tuple(cal["frequencies_mm"][i] for i in use)
    measured = {REFERENCE_KERNEL: ((), ())}
    for name, ratios in cal["ratios_to_reference"].items():
        measured[name] = (freqs, tuple(ratios[i] for i in use))
    if library_path is None:
        return {name: Kernel(name, cal["descriptions"][name], *fr) for name, fr in measured.items()}
    lib = json.loads(Path(library_path).read_text(encoding="utf-8"))
    kernels: dict[str, Kernel] = {}
    for e in lib["kernels"]:
        common = dict(vendor=e["vendor"], calibration=e["calibration"], source=e["source"], dicom=tuple(e["dicom"]),
                      equivalent_to=e.get("equivalent_to", ""), caveat=e.get("caveat", ""),
                      published_mtf=tuple((m["mtf50_lp_cm"], m["mtf10_lp_cm"]) for m in e.get("published_mtf", ())))
        if e["calibration"] in ("reference", "real-pair"):
            if e["name"] not in measured:
                raise ValueError(f"{library_path}: {e['name']} is marked {e['calibration']} but {path} has no ratio for it")
            kernels[e["name"]] = Kernel(e["name"], e["description"], *measured[e["name"]], **common)
            continue
        fn: Callable[[np.ndarray], np.ndarray] | None = None
        if e["calibration"] == "equivalent":
            fn = _equivalent_log_ratio(kernels[e["equivalent_to"]])
        elif e["calibration"] == "equivalent-interpolated":
            fn = _interpolated_log_ratio(kernels, _kernel_number(e["equivalent_to"]))
        elif e["calibration"] == "published-mtf":
            ref50, ref10 = kernels[REFERENCE_KERNEL].published_mtf[0]
            fn = _published_log_ratio(e["mtf50_lp_cm"], e["mtf10_lp_cm"], ref50, ref10)
            common["published_mtf"] = ((e["mtf50_lp_cm"], e["mtf10_lp_cm"]),)
        elif e["calibration"] != "none":
            raise ValueError(f"{library_path}: {e['name']} has unknown calibration {e['calibration']!r}")
        kernels[e["name"]] = Kernel(e["name"], e["description"], log_ratio_fn=fn, **common)
    return kernels


def _equivalent_log_ratio(other: Kernel) -> Callable[[np.ndarray], np.ndarray]:
    return lambda f: np.log(other.window(f) / reference_window(f))


def _interpolated_log_ratio(kernels: dict[str, Kernel], number: int) -> Callable[[np.ndarray], np.ndarray]:
    """log W interpolated linearly in the Siemens kernel number between the calibrated B-kernels around it."""
    calibrated = sorted((_kernel_number(k.name), k) for k in kernels.values()
                        if k.vendor == "Siemens" and k.calibration in ("reference", "real-pair"))
    below = [c for c in calibrated if c[0] <= number]
    above = [c for c in calibrated if c[0] >= number]
    if not below or not above:
        raise ValueError(f"kernel number {number} lies outside the calibrated Siemens kernels")
    (n0, k0), (n1, k1) = below[-1], above[0]
    t = 0.0 if n1 == n0 else (number - n0) / (n1 - n0)
    return lambda f: ((1 - t) * np.log(k0.window(f)) + t * np.log(k1.window(f))) - np.log(reference_window(f))


def _published_log_ratio(mtf50: float, mtf10: float, ref50: float, ref10: float) -> Callable[[np.ndarray], np.ndarray]:
    """log of the ratio of two published MTFs (lp/cm → mm⁻¹), each as :func:`parametric_mtf`."""
    def fn(f: np.ndarray) -> np.ndarray:
        p = -math.log(2.0)  # log of parametric_mtf, computed in the log domain (no underflow at high f)
        a = math.log(math.log(10.0) / math.log(2.0))
        lk = p * (f / (mtf50 / 10)) ** (a / math.log(mtf10 / mtf50))
        lr = p * (f / (ref50 / 10)) ** (a / math.log(ref10 / ref50))
        return lk - lr
    return fn


@lru_cache(maxsize=1)
def kernel_library() -> dict[str, Kernel]:
    """Every kernel of the library (``resources/kernel_library.json`` + the real-pair calibration), by name."""
    return load_kernels()


def _key(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch.isalnum())


def find_kernel(name: str) -> Kernel | None:
    """The library kernel called ``name`` (case, spaces, '-' and '_' ignored; a vendor prefix may be left
    out where the rest is unique, e.g. ``standard`` → GE-STANDARD), or None."""
    lib = kernel_library()
    key = _key(name)
    exact = [k for k in lib.values() if _key(k.name) == key]
    if exact:
        return exact[0]
    bare = [k for k in lib.values() if _key(k.name.split("-", 1)[-1]) == key]
    return bare[0] if len(bare) == 1 else None


def get_kernel(name: str | Kernel) -> Kernel:
    """The library kernel called ``name`` (see :func:`find_kernel`; a :class:`Kernel` is returned as it is);
    :class:`InputError` naming the library's kernels otherwise."""
    if isinstance(name, Kernel):
        return name
    k = find_kernel(name)
    if k is None:
        raise InputError(f"unknown kernel {name!r}; the kernel library knows {', '.join(kernel_library())} "
                         "(`ltdiffpp kernels` lists them)")
    return k


def simulator_kernels() -> list[str]:
    """Names of the kernels the simulator can reconstruct with (those with a frequency response)."""
    return [k.name for k in kernel_library().values() if k.has_response]


# ------------------------------------------------------------------------------ DICOM identification


def vendor_of(manufacturer: str) -> str | None:
    """The library's vendor name for a DICOM Manufacturer (0008,0070) value, or None."""
    text = (manufacturer or "").strip().upper()
    for vendor, patterns in _library_file()["vendors"].items():
        if any(re.search(p, text) for p in patterns):
            return vendor
    return None


def kernel_values(convolution_kernel: object) -> list[str]:
    """ConvolutionKernel (0018,1210) as a list of stripped strings; a multi-valued tag (Siemens ADMIRE
    ``Br40d\\3``: kernel then iterative strength) keeps its order, a joined ``a\\b`` string is split."""
    if convolution_kernel is None:
        return []
    values = [convolution_kernel] if isinstance(convolution_kernel, str) else list(convolution_kernel)
    out: list[str] = []
    for v in values:
        out.extend(part.strip() for part in str(v).split("\\"))
    return [v for v in out if v]


@dataclass(frozen=True)
class KernelEvidence:
    """What is known of an image's kernel: ``kernel`` (None: unidentified), ``how`` it was found
    (``"DICOM header"``, ``"given"``, ``"estimated from the image"``), the raw text ``found``, a one-line
    ``note``, and whether a header naming another kernel ``contradicted`` a given one."""

    kernel: Kernel | None
    how: str
    found: str = ""
    note: str = ""
    contradicted: bool = False

    def describe(self) -> str:
        if self.kernel is None:
            return f"unidentified ({self.note})" if self.note else "unidentified"
        found = f": {self.found}" if self.found and self.found != self.kernel.name else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.kernel.name} ({self.how}{found}{note})"


def kernel_from_dicom(manufacturer: object, convolution_kernel: object) -> KernelEvidence:
    """Identify a kernel from DICOM Manufacturer and ConvolutionKernel values.

    The first ConvolutionKernel value is matched (case-insensitively, in full) against the ``dicom``
    patterns of the library's kernels of that vendor (GE's ``BODY FILTER/`` prefix is dropped); with an
    unknown Manufacturer, against every vendor's, accepted only when one kernel matches.
    """
    values = kernel_values(convolution_kernel)
    maker = str(manufacturer or "").strip()
    found = "\\".join(values)
    if not values:
        return KernelEvidence(None, "DICOM header", "", "the header has no ConvolutionKernel")
    text = re.sub(r"^BODY FILTER\s*/\s*", "", values[0], flags=re.IGNORECASE).strip()
    vendor = vendor_of(maker)
    cands = [k for k in kernel_library().values() if vendor is None or k.vendor == vendor]
    hits = [k for k in cands if any(re.fullmatch(p, text, flags=re.IGNORECASE) for p in k.dicom)]
    who = f"{maker or 'unknown manufacturer'} kernel {found!r}"
    if len(hits) == 1:
        return KernelEvidence(hits[0], "DICOM header", f"{maker} {found}".strip())
    if not hits:
        return KernelEvidence(None, "DICOM header", found, f"{who} is not in the kernel library")
    return KernelEvidence(None, "DICOM header", found,
                          f"{who} matches several library kernels ({', '.join(k.name for k in hits)}); give the source kernel")


def same_response(a: Kernel, b: Kernel) -> bool:
    """The same kernel, or one declared equivalent to the other (e.g. B31f and B30f)."""
    return a.name == b.name or a.equivalent_to == b.name or b.equivalent_to == a.name


def ordered_pairs(kernels: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered (source, target) pair of the named kernels whose responses differ."""
    ks = [get_kernel(k) for k in kernels]
    return [(a.name, b.name) for a in ks for b in ks if not same_response(a, b)]


#: The library gain's default regularization (:func:`pair_gain`): what the kernel-conditioned model was trained with.
PAIR_GAIN_FLOOR = 0.05
PAIR_GAIN_MAX = 50.0


def pair_gain(source: Kernel, target: Kernel, f_mm: np.ndarray, floor: float = PAIR_GAIN_FLOOR,
              max_gain: float | None = PAIR_GAIN_MAX) -> np.ndarray:
    """The linear kernel conversion G(f) = W_target(f) / W_source(f) (f in mm⁻¹), regularized where the
    source passes little: W_source is floored at ``floor`` × its peak (a Wiener-like guard against
    amplifying what the source kernel removed) and G is capped at ``max_gain`` (None: no cap, the floor alone
    bounds G by max W_target / ``floor``)."""
    ws, wt = source.window(f_mm), target.window(f_mm)
    peak = float(np.max(source.window(np.linspace(0.0, 1.0, 201))))
    gain = wt / np.maximum(ws, floor * peak)
    return gain if max_gain is None else np.minimum(gain, max_gain)

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


# ------------------------------------------------------------------------------ identification from the image


@dataclass(frozen=True)
class EdgeMTF:
    """An MTF measured on the air–body edge of a CT: ``f`` (mm⁻¹) and ``mtf`` (1 at f = 0), from
    ``edge_samples`` pixels within ±8 px of the edge on ``slices`` slices."""

    f: np.ndarray
    mtf: np.ndarray
    edge_samples: int
    slices: int

    def points(self) -> tuple[float | None, float | None]:
        """(MTF50, MTF10) in mm⁻¹: the first frequency where the MTF falls below 0.5 / 0.1."""
        return mtf_points(self.f, self.mtf)


def edge_mtf(hu: np.ndarray, pixel_mm: float, *, max_slices: int = 5, level: float = -500.0,
             half_px: float = 8.0, bin_px: float = 0.1, contour_sigma_px: float = 1.0) -> EdgeMTF | None:
    """The MTF of a CT measured on its skin edge (the body's boundary against outside air).

    The boundary is the ``level`` (HU) iso-contour of the slightly smoothed body (sub-pixel, marching
    squares); every pixel within ``half_px`` of it is binned by its signed distance (``bin_px`` bins, the
    oversampled edge-spread function of the slanted-edge method, here along a curved edge), the ESF is
    differentiated to the line-spread function, windowed (Hann) and Fourier-transformed. Up to
    ``max_slices`` slices of a (z, y, x) volume spread evenly are pooled. Square pixels of ``pixel_mm`` mm.
    Returns None when there is no air–body edge long enough (a crop inside the body, no air).
    """
    import contourpy
    from scipy.spatial import cKDTree

    from .radiomics import body_mask  # here, not at import: it loads pandas

    hu = np.asarray(hu, dtype=np.float32)
    hu = hu[None] if hu.ndim == 2 else hu
    picks = np.unique(np.linspace(0, hu.shape[0] - 1, min(max_slices, hu.shape[0])).round().astype(int))
    dist_all, val_all = [], []
    for z in picks:
        s = hu[z]
        body = body_mask(s[None], level)[0]
        if body.sum() < 100 or body.all():
            continue
        smooth = ndimage.gaussian_filter(np.where(body, s, np.minimum(s, level)).astype(np.float64), contour_sigma_px)
        lines = [ln for ln in contourpy.contour_generator(z=smooth).lines(level) if len(ln) > 50]
        if not lines:
            continue
        dense = []
        for ln in lines:  # the contour resampled every 0.05 px for nearest-point distances
            seg = np.diff(ln, axis=0)
            n = np.maximum(1, (np.hypot(seg[:, 0], seg[:, 1]) / 0.05).astype(int))
            t = np.concatenate([np.arange(k) / k for k in n])
            dense.append(np.repeat(ln[:-1], n, axis=0) + t[:, None] * np.repeat(seg, n, axis=0))
        tree = cKDTree(np.concatenate(dense))
        near = (ndimage.distance_transform_edt(~body) < half_px + 2) & (ndimage.distance_transform_edt(body) < half_px + 2)
        yy, xx = np.nonzero(near)
        d, _ = tree.query(np.stack([xx, yy], axis=1))
        signed = np.where(smooth[yy, xx] > level, d, -d)
        keep = np.abs(signed) < half_px
        dist_all.append(signed[keep])
        val_all.append(s[yy, xx][keep].astype(np.float64))
    if not dist_all:
        return None
    dist, val = np.concatenate(dist_all), np.concatenate(val_all)
    if dist.size < 2000:
        return None
    bins = np.round(dist / bin_px).astype(int)
    lo = bins.min()
    count = np.bincount(bins - lo)
    esf = np.bincount(bins - lo, weights=val) / np.maximum(count, 1)
    x = np.arange(esf.size)
    esf = np.interp(x, x[count > 0], esf[count > 0])
    lsf = np.gradient(esf, bin_px) * np.hanning(esf.size)
    n_fft = 4096  # zero-padded: a fine frequency grid (the ESF spans only 2 × half_px)
    spectrum = np.abs(np.fft.rfft(lsf, n=n_fft))
    if not spectrum[0] > 0:
        return None
    return EdgeMTF(np.fft.rfftfreq(n_fft, d=bin_px) / pixel_mm, spectrum / spectrum[0], int(dist.size), len(dist_all))


@dataclass(frozen=True)
class ImageKernelEstimate:
    """The kernel an image looks like: ``kernel`` (None: not identifiable), ``confidence`` (0–1, the
    posterior weight of its group among all library responses), ``alternatives`` (kernels whose responses
    are indistinguishable from it), ``rms`` (MTF misfit), the measured ``mtf`` and a one-line ``note``."""

    kernel: Kernel | None
    confidence: float
    alternatives: tuple[str, ...] = ()
    rms: float = float("nan")
    mtf: EdgeMTF | None = None
    note: str = ""

    def describe(self) -> str:
        if self.kernel is None:
            return self.note
        alt = f", indistinguishable from {', '.join(self.alternatives)}" if self.alternatives else ""
        return f"looks like {self.kernel.name} (confidence {self.confidence:.2f}{alt})"


#: Misfit scale (RMS of MTF, unitless) of the posterior weights: the spread of single-slice edge MTFs
#: around their mean within one real series (median 0.036 on the Philips C series, 0.019 on the Siemens
#: Br38f one, 10 slices each; not tuned on test1). An estimate is accepted when its group is more likely
#: than all others together (confidence > :data:`MIN_CONFIDENCE`) and fits within 3 scales (:data:`MAX_RMS`).
RMS_SCALE = 0.05
MIN_CONFIDENCE = 0.5
MAX_RMS = 3 * RMS_SCALE
#: Library responses closer than this (RMS of system MTF) cannot be told apart by an edge: two misfit scales (a
#: likelihood ratio under e² for one measurement). The mid-sharp kernels (B40f, GE CHEST/STANDARD, Philips D, and
#: GE SOFT next to B30f) lie 0.03–0.07 apart, so an estimate names them as one group.
SAME_RESPONSE_RMS = 2 * RMS_SCALE
_PREFERENCE = {"real-pair": 0, "reference": 0, "published-mtf": 1, "equivalent": 2, "equivalent-interpolated": 3}


def identify_kernel_from_image(hu: np.ndarray, spacing_yx: tuple[float, float]) -> ImageKernelEstimate:
    """Estimate the reconstruction kernel of a CT in HU ((y, x) or (z, y, x), pixels ``spacing_yx`` mm) by
    comparing its skin-edge MTF (:func:`edge_mtf`) with every library kernel's system MTF over
    0.05 mm⁻¹ … 0.8 × Nyquist (at most 0.8 mm⁻¹). Kernels whose responses lie within :data:`SAME_RESPONSE_RMS`
    of the best-fitting one are its group (the best-calibrated member is named, the others are ``alternatives``);
    the confidence is the group's weight exp(−½ (rms/RMS_SCALE)²), normalized over all groups. The system MTF is a
    scanner's, the same at every pixel size (docs/KERNELS.md: the simulator's is not, away from 0.69 mm).
    """
    dy, dx = (float(v) for v in spacing_yx)
    if not math.isclose(dy, dx, rel_tol=0.02):
        return ImageKernelEstimate(None, 0.0, note=f"pixels are not square ({dy:g} x {dx:g} mm)")
    m = edge_mtf(hu, dx)
    if m is None:
        return ImageKernelEstimate(None, 0.0, note="no air-body edge to measure the kernel's sharpness on")
    band = (m.f > 0.05) & (m.f < min(0.8 * 0.5 / dx, 0.8))
    f = m.f[band]
    curves = {k.name: k.system_mtf(f) for k in kernel_library().values() if k.has_response}
    rms = {n: float(np.sqrt(np.mean((m.mtf[band] - c) ** 2))) for n, c in curves.items()}
    order = sorted(rms, key=lambda n: (round(rms[n], 4), _PREFERENCE[get_kernel(n).calibration]))
    groups: list[list[str]] = []
    for n in order:
        for g in groups:
            if float(np.sqrt(np.mean((curves[g[0]] - curves[n]) ** 2))) < SAME_RESPONSE_RMS:
                g.append(n)
                break
        else:
            groups.append([n])
    for g in groups:  # name each group by its best-calibrated member
        g.sort(key=lambda n: (_PREFERENCE[get_kernel(n).calibration], rms[n]))
    weight = np.array([math.exp(-0.5 * (min(rms[n] for n in g) / RMS_SCALE) ** 2) for g in groups])
    best = int(np.argmin([min(rms[n] for n in g) for g in groups]))
    confidence = float(weight[best] / weight.sum()) if weight.sum() > 0 else 0.0
    name, fit = groups[best][0], min(rms[n] for n in groups[best])
    estimate = ImageKernelEstimate(get_kernel(name), confidence, tuple(groups[best][1:]), fit, m)
    if confidence <= MIN_CONFIDENCE or fit > MAX_RMS:
        second = groups[1 - best if best == 0 else 0][0] if len(groups) > 1 else "-"
        return ImageKernelEstimate(None, confidence, estimate.alternatives, fit, m,
                                   f"the image's edge sharpness fits no library kernel well (closest {name}, "
                                   f"confidence {confidence:.2f}, misfit {fit:.2f}; next {second})")
    return estimate
