"""Physics check of conversions without paired data: the noise-power spectrum of converted real series.

    .venv/bin/python bench/nps_check.py --out DIR [--model ltdiffpp-kernel-conditioned] [--slices 6]
        [--targets B10f,B30f,B50f,B70f] [--data ../shared/data] [--no-phantom]

For each real series of ``chest_ct/`` (GE LightSpeed STANDARD, Philips Brilliance C, Siemens Biograph Br38f)
and each target kernel, the middle ``--slices`` slices are converted with ``standardize_volume`` (the source
kernel from the header where the library has its response — GE STANDARD —, else given as B30f, which the
skin-edge MTF of the Philips C and Br38f series measures, see docs/kernel_identification.md; with ``force``, as
the guard refuses the GE kernels' doubtful responses otherwise — they are what this checks). In homogeneous
soft-tissue ROIs of the source (32 px, mean −50…100 HU, the half with the lowest detrended SD) the radial NPS
is measured (``concordance.radial_nps``) on the source and on the converted image, and compared, normalised
to unit area over the common band 0.05 mm⁻¹ … min(Nyquist, 0.7 mm⁻¹), with what the target kernel should give:

- **real target**: the nNPS of the real test1 slice of that kernel (Siemens, B10f/B30f/B50f/B70f, same ROI
  recipe), where the target is one of them;
- **library**: the source's measured NPS × G(f)², G = W_target / W_source of the kernel library (what a
  perfect linear conversion of this series' noise would give).

Reported per (series, target): noise SD (HU), nNPS peak and mean frequency (mm⁻¹) of source, converted, real
target and library expectation, and the root-mean-square log difference of the converted nNPS from each
reference. Writes DIR/nps.json, DIR/nps.md and one plot per series (DIR/nps_<series>.png).

Edge MTF on the phantom (unless ``--no-phantom``): a digital chest phantom the models never saw (seed 99, two
512² slices at 0.7 mm) is scanned once by the simulator and reconstructed with each target kernel; every
ordered pair is converted and the skin-edge MTF50 (``kernels.edge_mtf``) of the converted image is compared
with that of the same scan reconstructed with the target kernel. DIR/edge_mtf.md, DIR/edge_mtf.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LTDiffPPLib.concordance import noise_sd, radial_nps
from LTDiffPPLib.inference import standardize_volume
from LTDiffPPLib.io import CTVolume, read_dicom_series
from LTDiffPPLib.kernels import get_kernel, pair_gain
from LTDiffPPLib.modelfile import load_model
from LTDiffPPLib.radiomics import square_rois

SERIES = {"GE STANDARD": ("dcmqi_ge_standard", None), "Philips C": ("itkelastix_philips_C", "B30f"),
          "Siemens Br38f": ("totalsegmentator_siemens_Br38f", "B30f")}
F_LO, F_HI = 0.05, 0.7


def homogeneous_rois(vol: CTVolume, size: int = 32, n: int = 60):
    """The calmer half of ``n`` soft-tissue ROIs (mean −50…100 HU) of ``vol``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rois = square_rois(vol, n, size, seed=0, strata=[(-50.0, 100.0)], counts=[n])
    sds = noise_sd([vol.hu[r.slices][0] for r in rois])
    return [rois[i] for i in np.argsort(sds, kind="stable")[: max(1, len(rois) // 2)]]


def nps(vol: CTVolume, rois) -> tuple[np.ndarray, np.ndarray, float]:
    """(f mm⁻¹, NPS HU²mm², noise SD HU) of ``vol`` in ``rois``."""
    patches = [np.asarray(vol.hu[r.slices][0], np.float64) for r in rois]
    f, p = radial_nps(patches, (vol.spacing[1], vol.spacing[0]))
    return f, p, float(np.median(noise_sd(patches)))


def normalised(f: np.ndarray, p: np.ndarray, band: tuple[float, float], grid: np.ndarray) -> np.ndarray:
    """NPS resampled on ``grid`` and scaled to unit area over it (``band`` = its limits)."""
    q = np.interp(grid, f, p)
    return q / np.trapezoid(q, grid)


def describe(grid: np.ndarray, q: np.ndarray) -> dict[str, float]:
    return {"peak_mm-1": round(float(grid[int(np.argmax(q))]), 3),
            "mean_mm-1": round(float(np.trapezoid(grid * q, grid) / np.trapezoid(q, grid)), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="ltdiffpp-kernel-conditioned")
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--targets", default="B10f,B30f,B50f,B70f")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-phantom", action="store_true", help="skip the edge MTF on the phantom")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = load_model(a.model)
    from kernel_pairs import KERNELS, test1 as test1_slice  # the same test1 loader (B10/B70 on B30's grid)

    test1 = {k: test1_slice(a.data / "paired_kernels", k) for k in KERNELS}
    results = []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for label, (folder, given) in SERIES.items():
        full = read_dicom_series(a.data / "chest_ct" / folder)
        n = full.hu.shape[0]
        lo = max(0, n // 2 - a.slices // 2)
        vol = _slab(full, lo, min(n, lo + a.slices))
        rois = homogeneous_rois(vol)
        f_s, p_s, sd_s = nps(vol, rois)
        nyq = 0.5 / max(vol.spacing[0], vol.spacing[1])
        grid = np.linspace(F_LO, min(F_HI, nyq), 60)
        q_src = normalised(f_s, p_s, (F_LO, grid[-1]), grid)
        fig, axes = plt.subplots(1, len(a.targets.split(",")), figsize=(4 * len(a.targets.split(",")), 3.4), sharey=True)
        for ax, target in zip(np.atleast_1d(axes), a.targets.split(",")):
            try:
                # force: the GE kernels' doubtful responses are what this check examines
                out, plan = standardize_volume(vol, target, source_kernel=given, model=model, seed=a.seed, force=True)
            except Exception as exc:  # e.g. nothing to convert: say so in the table
                results.append({"series": label, "target": target, "skipped": str(exc).split(" — ")[0][-160:]})
                ax.set_title(f"{label} → {target}: skipped", fontsize=8)
                continue
            f_c, p_c, sd_c = nps(out, rois)
            q_conv = normalised(f_c, p_c, (F_LO, grid[-1]), grid)
            src_k = plan.source.kernel
            gain = pair_gain(src_k, get_kernel(target), f_s)
            q_lib = normalised(f_s, p_s * gain**2, (F_LO, grid[-1]), grid)
            row = {"series": label, "target": target, "source_kernel": plan.source.describe(), "model": plan.model,
                   "adapted": plan.notes, "rois": len(rois), "pixel_mm": round(vol.spacing[0], 3),
                   "noise_sd_hu": {"source": round(sd_s, 1), "converted": round(sd_c, 1)},
                   "source": describe(grid, q_src), "converted": describe(grid, q_conv),
                   "library": describe(grid, q_lib),
                   "rms_log_vs_library": round(float(np.sqrt(np.mean(np.log(q_conv / q_lib) ** 2))), 3)}
            ax.plot(grid, q_src, color="0.6", label=f"source ({src_k.name})")
            ax.plot(grid, q_lib, "k--", label="library: source × G²")
            ax.plot(grid, q_conv, "C0", lw=2, label="converted")
            if target in test1:
                t1 = test1[target]
                t_rois = homogeneous_rois(t1)
                f_t, p_t, sd_t = nps(t1, t_rois)
                q_t = normalised(f_t, p_t, (F_LO, grid[-1]), grid)
                row.update(real_target=describe(grid, q_t), real_target_noise_sd_hu=round(sd_t, 1),
                           rms_log_vs_real_target=round(float(np.sqrt(np.mean(np.log(q_conv / q_t) ** 2))), 3))
                ax.plot(grid, q_t, "C3", label=f"real {target} (test1)")
            ax.set_title(f"{label} → {target}", fontsize=9)
            ax.set_xlabel("f (mm⁻¹)")
            results.append(row)
            print(json.dumps(row), flush=True)
        np.atleast_1d(axes)[0].set_ylabel("normalised NPS (mm)")
        np.atleast_1d(axes)[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.out / f"nps_{folder}.png", dpi=110)
        plt.close(fig)
    (a.out / "nps.json").write_text(json.dumps({"model": model.metadata.get("name"), "sha256": model.sha256,
                                                "results": results}, indent=1))
    lines = ["| series → target | source kernel | noise SD source → converted (HU) | nNPS peak / mean (mm⁻¹): source | converted | library | real target | RMS log diff vs library / real |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['series']} → {r['target']} | skipped: {r['skipped']} | | | | | | |")
            continue
        rt = r.get("real_target")
        fmt = lambda d: f"{d['peak_mm-1']:.2f} / {d['mean_mm-1']:.2f}"  # noqa: E731
        lines.append(f"| {r['series']} → {r['target']} | {r['source_kernel']} | {r['noise_sd_hu']['source']} → "
                     f"{r['noise_sd_hu']['converted']} | {fmt(r['source'])} | {fmt(r['converted'])} | {fmt(r['library'])} | "
                     f"{fmt(rt) if rt else '–'} | {r['rms_log_vs_library']:.2f} / "
                     f"{r.get('rms_log_vs_real_target', float('nan')):.2f} |")
    (a.out / "nps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not a.no_phantom:
        phantom_edges(model, a.targets.split(","), a.out, a.seed)
    return 0


def phantom_edges(model, kernels: list[str], out: Path, seed: int) -> None:
    """Skin-edge MTF50 of every ordered pair's conversion of a simulated phantom against the same scan's
    reconstruction with the target kernel."""
    from LTDiffPPLib.kernels import edge_mtf, ordered_pairs
    from LTDiffPPLib.phantom import ChestPhantomOptions, chest_phantom_volume
    from LTDiffPPLib.simulation import ScanProtocol, simulate

    vol = chest_phantom_volume((2, 512, 512), (0.7, 0.7, 2.0), seed=99, options=ChestPhantomOptions(z_center_mm=0.0))
    scans = simulate(vol, kernels, protocol=ScanProtocol(dose=1.5e5), seed=99).volumes
    mtf50 = {k: edge_mtf(v.hu, 0.7).points()[0] for k, v in scans.items()}
    rows = []
    for s_k, t_k in ordered_pairs(kernels):
        conv, _ = standardize_volume(scans[s_k], t_k, source_kernel=s_k, model=model, seed=seed)
        m = edge_mtf(conv.hu, 0.7).points()[0]
        rows.append({"source": s_k, "target": t_k, "source_mtf50": mtf50[s_k], "converted_mtf50": m,
                     "target_mtf50": mtf50[t_k], "library_mtf50": get_kernel(t_k).mtf_points()[0]})
        print(json.dumps(rows[-1]), flush=True)
    (out / "edge_mtf.json").write_text(json.dumps(rows, indent=1))
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| pair | source MTF50 | converted MTF50 | target-kernel scan MTF50 | error |", "|---|---|---|---|---|"]
    for r in rows:
        err = ("–" if None in (r["converted_mtf50"], r["target_mtf50"])
               else f"{100 * (r['converted_mtf50'] / r['target_mtf50'] - 1):+.0f} %")
        lines.append(f"| {r['source']}→{r['target']} | {fmt(r['source_mtf50'])} | {fmt(r['converted_mtf50'])} | "
                     f"{fmt(r['target_mtf50'])} | {err} |")
    (out / "edge_mtf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _slab(v: CTVolume, lo: int, hi: int) -> CTVolume:
    """Slices lo…hi−1 of ``v`` with their geometry."""
    from dataclasses import replace

    normal = np.asarray(v.direction).reshape(3, 3)[:, 2]
    return replace(v, hu=v.hu[lo:hi], origin=tuple(np.asarray(v.origin) + lo * v.spacing[2] * normal))


if __name__ == "__main__":
    sys.exit(main())
