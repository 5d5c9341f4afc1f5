"""The Fourier kernel-ratio baseline fitted *out of patient*: on a training dataset, applied to another image.

    .venv/bin/python bench/kernel_ratio_from_dataset.py DATASET IMAGE OUT [--split train] [--kernels SRC,TGT]

Estimates √(P_target/P_source) (:func:`LTDiffPPLib.baselines.estimate_kernel_ratio`) from every pair of the
dataset's ``split`` — the same simulated pairs the model is trained on — and filters IMAGE (a source-kernel
CT) with it. This is the physics baseline the model has to beat on patients neither has seen; the in-sample
variant (fitted on the test pair itself) is what ``ltdiffpp evaluate --source`` adds.
"""

from __future__ import annotations

import argparse
import json

from LTDiffPPLib.baselines import apply_kernel_ratio, kernel_ratio_from_dataset
from LTDiffPPLib.datasets import load_dataset
from LTDiffPPLib.io import read_volume, write_volume


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("image")
    ap.add_argument("out")
    ap.add_argument("--split", default="train")
    ap.add_argument("--kernels", default=None, help="SRC,TGT: the pair of a multi-kernel dataset")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    ds = load_dataset(a.dataset)
    kernels = tuple(a.kernels.split(",")) if a.kernels else None
    ratio, (sy, sx) = kernel_ratio_from_dataset(ds, a.split, kernels)
    slices = sum(int(p["shape"][0]) for p in ds.subset(a.split))
    image = read_volume(a.image)
    if abs(image.spacing[0] - sx) > 0.05 * sx:
        print(f"note: {a.image} has {image.spacing[0]:.3f} mm pixels, the ratio was fitted at {sx:.3f} mm")
    out = image.with_hu(apply_kernel_ratio(image.hu, (image.spacing[1], image.spacing[0]), ratio))
    write_volume(out, a.out, overwrite=a.overwrite)
    print(json.dumps({"dataset": a.dataset, "split": a.split, "slices": slices,
                      "pixel_mm": [sx, sy], "ratio": ratio.to_dict()}, indent=None)[:400])


if __name__ == "__main__":
    main()
