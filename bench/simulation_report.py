"""Measure every simulated kernel's MTF (edge method) and NPS, and write docs/SIMULATION.md with figures.

    .venv/bin/python bench/simulation_report.py [--dose 2e5] [--out docs]

MTF: noise-free scan of a 200 mm water cylinder with a 60 mm-radius +1000 HU insert (anti-aliased edge);
the edge-spread function is sampled radially around the insert's circular edge (oversampled in
distance bins of 0.1 pixel), differentiated to the line-spread function, Hann-windowed (±10 mm) and
Fourier transformed. NPS: the same cylinder without insert scanned at ``dose``; noise = noisy minus
noise-free reconstruction (float HU, before storage rounding); 2D NPS averaged over 64² ROIs within
60 mm of the centre, radially binned. Pixel 0.693 mm, 512², 720 views (the calibration slice's grid).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from LTDiffPPLib.io import CTVolume, read_volume  # noqa: E402
from LTDiffPPLib.kernels import REFERENCE_F50_MM  # noqa: E402
from LTDiffPPLib.simulation import ScanProtocol, simulate, simulate_slice  # noqa: E402

PX, N = 0.693, 512
XCIST_HEADING = "## Independent simulator (XCIST)"
KERNELS = ["B10f", "B30f", "B50f", "B70f"]


def _disk(radius_mm: float, n: int = N, px: float = PX, sub: int = 4) -> np.ndarray:
    """Fraction of each pixel inside a centred disk (anti-aliased by sub×sub supersampling)."""
    c = (np.arange(n * sub) + 0.5) / sub - n / 2
    yy, xx = np.meshgrid(c * px, c * px, indexing="ij")
    inside = (np.hypot(xx, yy) <= radius_mm).astype(np.float32)
    return inside.reshape(n, sub, n, sub).mean(axis=(1, 3))


def mtf(img: np.ndarray, radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(N) - (N - 1) / 2) * PX
    r = np.hypot(*np.meshgrid(c, c, indexing="ij"))
    d = (r - radius_mm) / PX  # signed distance to the edge, pixels
    sel = np.abs(d) < 15
    bins = np.round(d[sel] / 0.1).astype(int)
    esf = np.bincount(bins - bins.min(), weights=img[sel]) / np.maximum(np.bincount(bins - bins.min()), 1)
    lsf = -np.gradient(esf)  # insert is brighter inside: ESF falls with distance
    x = (np.arange(len(lsf)) + bins.min()) * 0.1 * PX
    lsf *= np.where(np.abs(x) < 10, 0.5 + 0.5 * np.cos(np.pi * x / 10), 0.0)
    spec = np.abs(np.fft.rfft(lsf, n=8192))
    f = np.fft.rfftfreq(8192, d=0.1 * PX)
    keep = f <= 0.5 / PX
    return f[keep], spec[keep] / spec[0]


def crossing(f: np.ndarray, m: np.ndarray, level: float) -> float:
    """First frequency where the MTF falls to ``level`` (linear interpolation); NaN if it never does."""
    below = np.flatnonzero(m < level)
    if not len(below) or below[0] == 0:
        return float("nan")
    i = below[0]
    return float(f[i - 1] + (level - m[i - 1]) * (f[i] - f[i - 1]) / (m[i] - m[i - 1]))


def nps(noise: np.ndarray, roi: int = 64, px: float = PX, radius_mm: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged 2D NPS (HU² mm²) of a square (n, n) ``noise`` image with pixels of ``px`` mm, over
    half-overlapping roi² tiles lying within ``radius_mm`` of the centre: (bin centres in mm⁻¹, NPS)."""
    n = noise.shape[0]
    c = (np.arange(n) - (n - 1) / 2) * px
    r = np.hypot(*np.meshgrid(c, c, indexing="ij"))
    acc, count = np.zeros((roi, roi)), 0
    for y0 in range(0, n - roi + 1, roi // 2):
        for x0 in range(0, n - roi + 1, roi // 2):
            if r[y0 : y0 + roi, x0 : x0 + roi].max() < radius_mm:
                t = noise[y0 : y0 + roi, x0 : x0 + roi]
                acc += np.abs(np.fft.fft2(t - t.mean())) ** 2
                count += 1
    p2d = acc / count * px * px / (roi * roi)  # HU² mm²
    f = np.fft.fftfreq(roi, d=px)
    fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    edges = np.arange(0, 0.5 / px + 1e-9, 1 / (roi * px))
    idx = np.digitize(fr.ravel(), edges) - 1
    prof = np.bincount(idx, weights=p2d.ravel(), minlength=len(edges)) / np.maximum(np.bincount(idx, minlength=len(edges)), 1)
    centers = edges + 0.5 / (roi * px)
    return centers[: len(edges) - 1], prof[: len(edges) - 1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dose", type=float, default=2.0e5)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    a = p.parse_args()
    figs = a.out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    water = 1000.0 * _disk(100.0) - 1000.0
    insert = water + 1000.0 * _disk(60.0)
    mtf_rec = simulate_slice(insert, PX, KERNELS, ScanProtocol(dose=None), rng)
    clean = simulate_slice(water, PX, KERNELS, ScanProtocol(dose=None), rng)
    noisy = simulate_slice(water, PX, KERNELS, ScanProtocol(dose=a.dose), rng)
    c = (np.arange(N) - (N - 1) / 2) * PX
    centre = np.hypot(*np.meshgrid(c, c, indexing="ij")) < 60

    rows, fig, (ax1, ax2) = [], *plt.subplots(1, 2, figsize=(10, 4))
    for k, m_img, cl, no in zip(KERNELS, mtf_rec, clean, noisy):
        f, m = mtf(m_img, 60.0)
        fn, pn = nps(no - cl)
        sd = float((no - cl)[centre].std())
        rows.append((k, crossing(f, m, 0.5), crossing(f, m, 0.1), float(m.max()), float(fn[np.argmax(pn)]), sd))
        ax1.plot(f, m, label=k)
        ax2.plot(fn, pn / pn.max(), label=f"{k} (SD {sd:.0f} HU)")
    ax1.set(xlabel="spatial frequency (mm⁻¹)", ylabel="MTF", title="MTF (edge method, noise-free)")
    ax2.set(xlabel="spatial frequency (mm⁻¹)", ylabel="NPS / peak", title=f"NPS (water, {a.dose:.0e} photons/ray)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(figs / "sim_mtf_nps.png", dpi=90)
    plt.close(fig)

    panel = _panel(figs / "sim_panel.png", a.dose)
    lines = [
        "# The CT physics simulator",
        "",
        "Produced by `.venv/bin/python bench/simulation_report.py` (this file and the figures are its output;",
        "do not edit by hand). Method: `LTDiffPPLib/simulation.py`; calibration: `bench/calibrate_kernels.py`.",
        "",
        "Parallel-beam scan (720 views over 180°, detector pitch = pixel), Poisson noise, the same noisy",
        "sinogram filtered with each kernel's window and back-projected, then clipped to −1024…3071 HU and",
        "rounded. Kernel windows relative to B30f are the ratios measured on the real test1 pair",
        "(√ of the power-spectrum ratio in 128² body crops, bands ±0.05 mm⁻¹, used up to 0.575 mm⁻¹;",
        "the B10f band at 0.675 mm⁻¹ sits on a noise floor), interpolated monotonically and continued",
        "with the last slope. B30f's own window is exp(−ln2·(f/f50)^2.2) with f50 = "
        f"{REFERENCE_F50_MM} mm⁻¹, the width at which a simulated water scan reproduces the real pair's",
        "noise-SD ratio B70f/B30f (6.8 in its most homogeneous soft-tissue windows; B30f 13.6 HU, B70f 90.6 HU).",
        "",
        "Slice thickness variants (0.625, 1.25, 3.75, 5 mm) average whole groups of reconstructed thin",
        "slices *after* reconstruction (a boxcar slice profile, as scanners derive thick slices from thin",
        "ones); the input's slice spacing must divide the thickness.",
        "",
        f"## MTF and NPS (pixel {PX} mm, 512², dose {a.dose:.0e} photons/ray)",
        "",
        "| kernel | MTF50 (mm⁻¹) | MTF10 (mm⁻¹) | MTF peak | NPS peak (mm⁻¹) | noise SD in water (HU) |",
        "|---|---|---|---|---|---|",
    ]
    for k, m50, m10, mx, fpk, sd in rows:
        f10 = "> Nyquist" if np.isnan(m10) else f"{m10:.3f}"
        f50 = "> Nyquist" if np.isnan(m50) else f"{m50:.3f}"
        lines.append(f"| {k} | {f50} | {f10} | {mx:.2f} | {fpk:.3f} | {sd:.1f} |")
    lines += [
        "",
        "Within 0.1–0.5 mm⁻¹ a simulated scan (QA phantom, 384² at 0.693 mm) reproduces the real kernel",
        "ratios within 7 % (B10f 6.4 %, B50f 2.8 %, B70f 4.4 %; `tests/test_simulation.py` asserts 15 %).",
        "Above ~0.5 mm⁻¹ the estimates part: B70f/B30f is 23.7 simulated against 25.9 real at 0.675 mm⁻¹, and",
        "the real B10f's ratio rises again there (0.24; simulated 0.13) on the noise floor of its stored values.",
        "",
        "MTF above 1 (B50f, B70f) is the edge enhancement of sharp kernels (as in the real B70f: its",
        "spectrum exceeds B30f's ×25 at 0.675 mm⁻¹). The MTF includes the pixel and projector blur of",
        "a 0.693 mm grid; Nyquist is 0.72 mm⁻¹.",
        "",
        "![MTF and NPS](figures/sim_mtf_nps.png)",
        "",
        "## Before / after",
        "",
        panel,
        "",
        "![panel](figures/sim_panel.png)",
        "",
    ]
    target = a.out / "SIMULATION.md"
    kept = ""  # sections written by other benches (bench/xcist_check.py): kept as they are
    if target.exists() and XCIST_HEADING in target.read_text():
        kept = "\n" + XCIST_HEADING + target.read_text().split(XCIST_HEADING, 1)[1]
    target.write_text("\n".join(lines) + kept)
    print("\n".join(lines[lines.index("| kernel | MTF50 (mm⁻¹) | MTF10 (mm⁻¹) | MTF peak | NPS peak (mm⁻¹) | noise SD in water (HU) |"):][:6]))
    return 0


def _panel(path: Path, dose: float) -> str:
    """A real chest CT slice and its simulated B30f/B70f scans (lung window). The real test1 pair is not
    shown: it is licensed for internal evaluation only, so no image of it enters the repository."""
    chest = ROOT.parent / "shared" / "data" / "chest_ct" / "itkelastix_philips_C"
    if not chest.is_dir():
        return "(panel skipped: ../shared/data is absent)"
    vol = read_volume(chest)
    mid = vol.hu.shape[0] // 2
    sl = CTVolume(hu=vol.hu[mid : mid + 1], spacing=vol.spacing, origin=vol.origin, direction=vol.direction)
    sim = simulate(sl, ["B30f", "B70f"], protocol=ScanProtocol(dose=dose), seed=0, workers=1).volumes
    crop = np.s_[150:314, 60:224]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    for ax, (img, title) in zip(axes, [(vol.hu[mid], "original (Philips, kernel C)"), (sim["B30f"].hu[0], "simulated B30f"),
                                       (sim["B70f"].hu[0], "simulated B70f (same scan)")]):
        ax.imshow(img[crop], cmap="gray", vmin=-1200, vmax=300)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return (f"Lung-window crops (−1200…300 HU) of a slice of the real Philips chest CT and of its simulated scans "
            f"with both kernels at {dose:.0e} photons/ray. The original already carries its own kernel and noise; "
            "the simulation's noise dominates at this dose.")


if __name__ == "__main__":
    sys.exit(main())
