"""Time radiomic feature extraction: N square ROIs × all features of the shipped parameter file.

    .venv/bin/python bench/bench_radiomics.py [--image PATH] [--rois 200] [--roi-size 32] [--workers 2]
                                              [--repeat 1] [--breakdown 20]

Default image: the real test1 B70f slice from ../shared/data (falls back to a synthetic slice when absent,
and says so). ``--breakdown N`` also times each image type alone on N ROIs in one worker (seconds per
ROI), to show what each costs. The load average is printed before and after: other processes on the
machine make the numbers slower, never faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from LTDiffPPLib.io import CTVolume, cpu_name, read_volume
from LTDiffPPLib.radiomics import extract_features, load_params, square_rois

DEFAULT_IMAGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paired_kernels" / "test1_B70.mha"


def _image(path: str | None) -> tuple[CTVolume, str]:
    p = Path(path) if path else DEFAULT_IMAGE
    if p.is_file():
        v = read_volume(p)
        if np.allclose(v.spacing, 1.0):  # test1_B10/B70 lost their spacing: the pair's pixels are 0.693 mm
            v = CTVolume(v.hu, (0.693359, 0.693359, 1.0), v.origin, v.direction, source=v.source)
        return v, str(p)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512] / 512
    hu = np.full((512, 512), -1000.0)
    hu[((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1] = 40.0
    for cx in (0.33, 0.67):
        hu[((xx - cx) / 0.12) ** 2 + ((yy - 0.45) / 0.18) ** 2 <= 1] = -850.0
    hu[(xx - 0.5) ** 2 + (yy - 0.68) ** 2 <= 0.06**2] = 400.0
    hu = hu + rng.normal(0, 80, hu.shape)
    volume = CTVolume(hu[None], (0.7, 0.7, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return volume, "synthetic slice (shared data absent)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", help="image file (default: shared test1_B70.mha)")
    ap.add_argument("--rois", type=int, default=200)
    ap.add_argument("--roi-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--breakdown", type=int, default=0, help="also time each image type alone on this many ROIs")
    a = ap.parse_args()

    volume, label = _image(a.image)
    params = load_params()
    print(f"machine  {cpu_name()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}")
    print(f"image    {label} {volume.hu.shape}, spacing {volume.spacing[:2]} mm")
    print(f"load     {os.getloadavg()[0]:.2f} (1-min average before)")
    t0 = time.perf_counter()
    rois = square_rois(volume, a.rois, a.roi_size, seed=0)
    t_rois = time.perf_counter() - t0
    print(f"ROIs     {len(rois)} of {a.roi_size}x{a.roi_size} px sampled in {t_rois:.2f} s")
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        table = extract_features(volume, rois, params, workers=a.workers)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"extract  {len(rois)} ROIs x {table.shape[1]} features, {a.workers} workers: "
          f"{best:.1f} s (best of {len(times)}: {', '.join(f'{t:.1f}' for t in times)}), "
          f"{best / len(rois) * a.workers:.3f} core-s per ROI, load after {os.getloadavg()[0]:.2f}")
    if a.breakdown:
        subset = rois[:: max(1, len(rois) // a.breakdown)][: a.breakdown]
        print(f"breakdown: each image type alone, {len(subset)} ROIs, 1 worker (includes ~1 s process start)")
        for image_type, custom in params.image_types.items():
            p = params.with_image_types({image_type: custom})
            t0 = time.perf_counter()
            t = extract_features(volume, subset, p, workers=1)
            dt = time.perf_counter() - t0
            print(f"  {image_type:<9} {t.shape[1]:>5} features  {dt:6.1f} s  {dt / len(subset):.3f} s/ROI")


if __name__ == "__main__":
    main()
