"""Benchmark (and figure) of the digital chest phantom.

    python bench/bench_phantom.py                      # time a 64×512×512 phantom (with labels)
    python bench/bench_phantom.py --shape 32 256 256 --repeat 3
    python bench/bench_phantom.py --figure             # also write docs/figures/phantom_axial.png

The figure shows an axial slice in lung (W 1500 / L −600) and mediastinal (W 400 / L 40) windows, its label map,
and a coronal reformat (15 mm anterior of the centre) of a 300 mm tall volume.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LTDiffPPLib.phantom import PHANTOM_LABELS, ChestPhantomOptions, chest_phantom  # noqa: E402


def _window(img: np.ndarray, width: float, level: float) -> np.ndarray:
    return np.clip((img - (level - width / 2)) / width, 0.0, 1.0)


def write_figure(path: Path, seed: int = 0) -> None:
    """Axial slice (lung and mediastinal windows, labels) and coronal reformat of phantom ``seed``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    s = 360.0 / 320
    hu_ax, lab_ax = chest_phantom((1, 320, 320), (s, s, 1.25), seed, return_labels=True)
    nz = 240  # 300 mm of z at 1.25 mm, centred 10 mm below the hila
    hu_co = chest_phantom((nz, 320, 320), (s, s, 1.25), seed, ChestPhantomOptions(z_center_mm=-10.0))
    cor = hu_co[::-1, 160 - int(round(15 / s)), :]  # coronal plane 15 mm anterior of the centre; superior up
    n_lab = max(PHANTOM_LABELS.values()) + 1
    cmap = ListedColormap(plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:n_lab])
    cmap.colors[0] = (0, 0, 0, 1)
    fig, axes = plt.subplots(1, 4, figsize=(13.0, 3.6), dpi=110, gridspec_kw={"width_ratios": [1, 1, 1, 1]})
    panels = [(_window(hu_ax[0], 1500, -600), "gray", "axial, lung window W1500/L-600"),
              (_window(hu_ax[0], 400, 40), "gray", "axial, mediastinal window W400/L40"),
              (lab_ax[0], cmap, "labels (PHANTOM_LABELS)"),
              (_window(cor, 1500, -600), "gray", "coronal reformat, lung window")]
    for ax, (img, cm, title) in zip(axes, panels):
        kw = {"vmin": 0, "vmax": n_lab - 1, "interpolation": "nearest"} if cm is cmap else {"vmin": 0, "vmax": 1}
        aspect = 1.25 / s if img is panels[3][0] else 1.0
        ax.imshow(img, cmap=cm, aspect=aspect, **kw)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"digital chest phantom, seed {seed} (patient right on image left, anterior up)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, pil_kwargs={"optimize": True})
    plt.close(fig)
    try:  # shrink: the figure is greyscale apart from the label panel, 8-bit palette PNG suffices
        from PIL import Image

        Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="mm (default: 360 mm in-plane field of view, 1.25 mm slices)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--figure", action="store_true", help="write docs/figures/phantom_axial.png")
    a = p.parse_args(argv)
    spacing = a.spacing or (360.0 / max(a.shape[1:]),) * 2 + (1.25,)
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        hu, lab = chest_phantom(tuple(a.shape), spacing, a.seed, return_labels=True)
        times.append(time.perf_counter() - t0)
    z, y, x = a.shape
    print(f"chest_phantom {z}x{y}x{x} at {spacing[0]:.3f}x{spacing[1]:.3f}x{spacing[2]:.3f} mm, seed {a.seed}: "
          f"best {min(times):.2f} s, mean {np.mean(times):.2f} s over {a.repeat} run(s) "
          f"({hu.size / min(times) / 1e6:.1f} Mvoxel/s)")
    if a.figure:
        out = ROOT / "docs" / "figures" / "phantom_axial.png"
        write_figure(out, a.seed)
        print(f"figure: {out.relative_to(ROOT)} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
