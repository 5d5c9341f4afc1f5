"""The recipe of the default model's training data: ``python -m Training.default_dataset OUT [--kernels B30f,B70f]``.

Simulated B30f → B70f pairs (:mod:`LTDiffPPLib.simulation`, kernels calibrated on the real test1 pair;
``--kernels B30f,B50f`` makes the same scans with another target kernel; three or more kernels make a
multi-kernel dataset, every scan reconstructed with each of them, for the kernel-conditioned model),
all at 0.7 mm pixels, the pixel size of the real validation pair (0.693 mm) — kernel texture is
measured in cycles/mm, so the model is trained at the pixel size it is meant for:

- train: the real Philips chest CT (``chest_ct/itkelastix_philips_C``, 141 slices, 2 mm), resampled
  in-plane to 0.7 mm and cropped to 512², every third slice at each of three doses (so every slice
  is used once and the doses interleave); and digital chest phantoms at several levels and doses;
- val: two more phantoms;
- test (held out, never trained on): the Siemens Br38f series (another patient, another scanner,
  upper abdomen and lung bases) at 1.5e5 photons/ray.

Doses span 1e5–4e5 photons per ray: test1's B30f noise (13.6 HU) sits near 1.5e5. The whole build
takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from LTDiffPPLib.datasets import Pair, Scan, pairs_from_simulation, scans_from_simulation, write_dataset, write_multikernel_dataset
from LTDiffPPLib.io import CTVolume, read_dicom_series, resample_inplane
from LTDiffPPLib.phantom import ChestPhantomOptions, chest_phantom_volume

KERNELS = ("B30f", "B70f")
PIXEL_MM = 0.7
SIZE = 512
CHEST_DOSES = (1.0e5, 1.5e5, 2.5e5)
PHANTOM_DOSES = (1.0e5, 1.5e5, 2.5e5, 4.0e5)
PHANTOM_LEVELS_MM = (-80.0, -40.0, 0.0, 40.0, 70.0)  # liver dome … upper lobes (see docs/PHANTOM.md)
TRAIN_PHANTOMS, VAL_PHANTOMS = 12, 2
TEST_DOSE = 1.5e5


def _every(volume: CTVolume, step: int, start: int) -> CTVolume:
    """Slices start, start + step, … of ``volume``, with their geometry."""
    normal = np.asarray(volume.direction).reshape(3, 3)[:, 2]
    sx, sy, sz = volume.spacing
    return replace(volume, hu=volume.hu[start::step], spacing=(sx, sy, sz * step),
                   origin=tuple(np.asarray(volume.origin) + start * sz * normal))


def build(shared_data: Path, out: Path, *, kernels: tuple[str, ...] = KERNELS, test_only: bool = False,
          workers: int | None = None, overwrite: bool = False) -> Path:
    """Simulate every (source, target) = ``kernels`` pair and write the dataset folder ``out``; returns its path.
    With three or more ``kernels``, each scan is reconstructed with all of them (a multi-kernel dataset).
    ``test_only``: only the held-out test pair (about a minute), e.g. for evaluations of a trained model.

    The seeds do not depend on the kernels: datasets of different target kernels hold the same noisy
    scans, so their source images are identical."""
    multi = len(kernels) > 2

    def scan(vol: CTVolume, patient: str, dose: float, seed: int) -> list[Pair | Scan]:
        if multi:
            return scans_from_simulation(vol, patient, kernels, doses=(dose,), seed=seed, workers=workers)
        return pairs_from_simulation(vol, patient, *kernels, doses=(dose,), seed=seed, workers=workers)

    pairs: list[Pair | Scan] = []
    splits: dict[str, str] = {}
    if not test_only:  # the train and val splits
        chest = resample_inplane(read_dicom_series(shared_data / "chest_ct" / "itkelastix_philips_C"), PIXEL_MM, SIZE)
        for j, dose in enumerate(CHEST_DOSES):
            part = _every(chest, len(CHEST_DOSES), j)
            print(f"chest CT: {part.hu.shape[0]} slices at {dose:.3g} photons/ray", flush=True)
            pairs += scan(part, "philips-chest", dose, 100 + j)
        splits["philips-chest"] = "train"
        for i in range(TRAIN_PHANTOMS + VAL_PHANTOMS):
            level = PHANTOM_LEVELS_MM[i % len(PHANTOM_LEVELS_MM)]
            vol = chest_phantom_volume((4, SIZE, SIZE), (PIXEL_MM, PIXEL_MM, 2.0), seed=i,
                                       options=ChestPhantomOptions(z_center_mm=level))
            dose = PHANTOM_DOSES[i % len(PHANTOM_DOSES)]
            print(f"phantom {i}: level {level:+.0f} mm at {dose:.3g} photons/ray", flush=True)
            pairs += scan(vol, f"phantom-{i}", dose, 200 + i)
            splits[f"phantom-{i}"] = "train" if i < TRAIN_PHANTOMS else "val"
    abdomen = resample_inplane(read_dicom_series(shared_data / "chest_ct" / "totalsegmentator_siemens_Br38f"), PIXEL_MM, SIZE)
    print(f"held-out test: Siemens Br38f, {abdomen.hu.shape[0]} slices at {TEST_DOSE:.3g} photons/ray", flush=True)
    pairs += scan(abdomen, "siemens-br38f", TEST_DOSE, 300)
    splits["siemens-br38f"] = "test"
    if multi:
        return write_multikernel_dataset(pairs, out, splits=splits, overwrite=overwrite)  # type: ignore[arg-type]
    return write_dataset(pairs, out, splits=splits, overwrite=overwrite)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m Training.default_dataset", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="dataset folder to create")
    ap.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                    help="the folder holding chest_ct/ (default: ../shared/data beside the repository)")
    ap.add_argument("--kernels", default=",".join(KERNELS),
                    help="source,target (default: %(default)s), or three or more kernels for a multi-kernel dataset")
    ap.add_argument("--test-only", action="store_true", help="only the held-out test split (the Siemens volume)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    if not (a.shared_data / "chest_ct").is_dir():
        print(f"error: {a.shared_data / 'chest_ct'} not found; pass --shared-data", file=sys.stderr)
        return 2
    kernels = tuple(k.strip() for k in a.kernels.split(","))
    if len(kernels) < 2 or len(set(kernels)) != len(kernels):
        ap.error(f"--kernels takes two or more distinct names (got {a.kernels!r})")
    print(build(a.shared_data, a.out, kernels=kernels, test_only=a.test_only, workers=a.workers, overwrite=a.overwrite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
