"""Write one pair of a dataset (``ltdiffpp build-dataset`` / ``Training.default_dataset``) as two image files.

    .venv/bin/python bench/export_dataset_pair.py DATASET OUTDIR [--split test]

For each pair of the subset: ``OUTDIR/<id>_source.nrrd`` and ``OUTDIR/<id>_target.nrrd`` with the
pair's geometry, so held-out simulated volumes can go through ``ltdiffpp standardize`` and
``ltdiffpp evaluate`` like any scan.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from LTDiffPPLib.datasets import load_dataset
from LTDiffPPLib.io import CTVolume, write_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    ds = load_dataset(a.dataset)
    a.outdir.mkdir(parents=True, exist_ok=True)
    for p in ds.subset(a.split):
        for role, arr in zip(("source", "target"), ds.arrays(p)):
            vol = CTVolume(hu=np.asarray(arr, np.float32), spacing=p["spacing_mm"], origin=p["origin_mm"],
                           direction=p["direction"], source=f"{p['id']} {role}")
            print(write_image(vol, a.outdir / f"{p['id']}_{role}.nrrd", overwrite=a.overwrite))


if __name__ == "__main__":
    main()
