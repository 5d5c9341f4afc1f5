"""Measure the real kernel ratios on the paired Siemens slice and write the simulator's calibration.

    .venv/bin/python bench/calibrate_kernels.py [--data ../shared/data/paired_kernels] [--check]

Writes LTDiffPPLib/resources/kernel_calibration.json (with --check: only compares against it).
The B10/B70 files lost their pixel spacing (they say 1.0 mm); all four share the B30 grid (0.693 mm).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from LTDiffPPLib.io import read_image  # noqa: E402
from LTDiffPPLib.kernels import CALIBRATION_PATH, REFERENCE_KERNEL, kernel_ratio  # noqa: E402

FREQS = [0.075, 0.175, 0.275, 0.375, 0.475, 0.575, 0.675]
MAX_USED = 0.575  # B10f's 0.675 band sits on a noise floor (it rises again); see docs/SIMULATION.md
DESCRIPTIONS = {
    "B30f": "smooth body kernel (Siemens B30f-like); the reference: absolute window chosen, others relative to it",
    "B10f": "very smooth kernel (Siemens B10f-like), calibrated on the real test1 pair",
    "B50f": "sharp kernel (Siemens B50f-like), calibrated on the real test1 pair",
    "B70f": "very sharp kernel (Siemens B70f-like, lung/bone), calibrated on the real test1 pair",
}


def homogeneous_noise(b30: np.ndarray, b70: np.ndarray, window: int = 15, count: int = 5) -> dict:
    """Noise SD of both kernels in the ``count`` most homogeneous soft-tissue windows of B30f (distinct
    windows, mean 0…100 HU), and the median ratio B70f/B30f."""
    m = ndimage.uniform_filter(b30, window)
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(b30 * b30, window) - m * m, 0.0))
    score = np.where((m > 0) & (m < 100), sd, np.inf)
    h = window // 2
    score[:h], score[-h:], score[:, :h], score[:, -h:] = np.inf, np.inf, np.inf, np.inf
    rows = []
    for _ in range(count):
        y, x = np.unravel_index(np.argmin(score), score.shape)
        w = np.s_[y - h : y + h + 1, x - h : x + h + 1]
        rows.append((float(b30[w].std()), float(b70[w].std())))
        score[max(0, y - window) : y + window, max(0, x - window) : x + window] = np.inf  # next window elsewhere
    sd30, sd70 = np.median([r[0] for r in rows]), np.median([r[1] for r in rows])
    return {"window_px": window, "windows": count, "sd_hu": {"B30f": round(float(sd30), 2), "B70f": round(float(sd70), 2)},
            "sd_ratio_B70f_B30f": round(float(np.median([r[1] / r[0] for r in rows])), 3)}


def measure(data: Path) -> dict:
    ref = read_image(data / "test1_B30.mha")
    pixel = ref.spacing[0]
    ratios = {}
    for k in ("B10", "B50", "B70"):
        img = read_image(data / f"test1_{k}.mha").hu[0]
        ratios[f"{k}f"] = [round(float(r), 4) for r in kernel_ratio(img, ref.hu[0], pixel, FREQS)]
    noise = homogeneous_noise(ref.hu[0].astype(np.float64), read_image(data / "test1_B70.mha").hu[0].astype(np.float64))
    return {
        "source": "test1 chest slice (leegaeun/CT_Kernel_Conversion data/noncontrast), Siemens B10f/B30f/B50f/B70f "
                  "reconstructions of the same projections",
        "estimator": "sqrt(P_kernel / P_B30f), power summed over Hann-windowed 128x128 crops entirely inside the "
                     "body (half-crop stride), bands f +/- 0.05 mm^-1 (LTDiffPPLib.kernels.kernel_ratio)",
        "pixel_mm": pixel,
        "reference": REFERENCE_KERNEL,
        "frequencies_mm": FREQS,
        "max_frequency_used_mm": MAX_USED,
        "ratios_to_reference": ratios,
        "noise": noise,
        "descriptions": DESCRIPTIONS,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paired_kernels")
    p.add_argument("--check", action="store_true", help="compare with the stored calibration, write nothing")
    a = p.parse_args()
    cal = measure(a.data)
    if a.check:
        stored = json.loads(CALIBRATION_PATH.read_text())
        for k, r in cal["ratios_to_reference"].items():
            diff = np.max(np.abs(np.array(r) - stored["ratios_to_reference"][k]))
            print(f"{k}: max |measured - stored| = {diff:.4g}")
        print(f"noise: measured {cal['noise']}, stored {stored.get('noise')}")
        return 0
    CALIBRATION_PATH.write_text(json.dumps(cal, indent=2) + "\n")
    for k, r in cal["ratios_to_reference"].items():
        print(f"{k}/{REFERENCE_KERNEL}: " + " ".join(f"{f}:{x:.2f}" for f, x in zip(FREQS, r)))
    print(f"noise in homogeneous soft tissue: {cal['noise']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
