"""Sample data made on the user's machine: the digital chest phantom, scanned once and reconstructed with
every kernel of the shipped models (B30f, B50f, B70f), plus its tissue label map. Nothing is downloaded.

The 3D Slicer module registers it with the Sample Data module, so a new user can try the module in one
click without data of their own. Making it takes about a minute on 2 CPU cores (61 s measured for 8
slices of 512²: the CT simulator reconstructs every slice with every kernel); it runs in the worker
process (``python -m LTDiffPPLib.runner sample CACHE``) and is cached: the second load reads the files
(2.6 s). Qt-free, torch-free::

    files = generate_sample(cache_root)          # {"ChestPhantom_B30f": Path(...), ..., "ChestPhantom_tissues": ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Sample Data's name for the set, and the stem of every node it loads
SAMPLE_NAME = "LTDiffPPChestPhantom"
NODE_STEM = "ChestPhantom"
#: bump when the content changes (phantom, simulator, shape): the cache folder's name includes it
SAMPLE_VERSION = 1
#: not one of the phantoms the shipped models were trained on (seeds 0-13), like ``ltdiffpp demo``'s
SAMPLE_SEED = 1000
#: (z, y, x): 8 slices at 0.70 mm pixels (a 360 mm field of view), the shipped models' pixel size
SAMPLE_SHAPE = (8, 512, 512)
#: photons per ray: a routine-dose chest scan (the demo's dose)
SAMPLE_DOSE = 2e5


@dataclass(frozen=True)
class SampleFile:
    """One file of the sample: a CT reconstructed with ``kernel``, or the tissue label map."""

    node_name: str
    file_name: str
    kernel: str | None  # None: the label map
    description: str

    @property
    def is_labelmap(self) -> bool:
        return self.kernel is None


def sample_kernels() -> list[str]:
    """The source and target kernels of the shipped per-pair models, in registry order (no duplicates; the
    kernel-conditioned model, whose kernels are "any", adds none: the sample stays three scans)."""
    from .runner import list_models

    kernels: list[str] = []
    for entry in list_models()[0]:
        if entry["kernels"]:  # a kernel-conditioned model
            continue
        for kernel in (entry["source_kernel"], entry["target_kernel"]):
            if kernel not in kernels:
                kernels.append(kernel)
    return kernels


def sample_files(kernels: Sequence[str] | None = None) -> list[SampleFile]:
    """What the sample holds: one CT per kernel (source kernels first), then the label map."""
    kernels = list(kernels) if kernels is not None else sample_kernels()
    files = [SampleFile(f"{NODE_STEM}_{k}", f"{NODE_STEM}_{k}.nrrd", k,
                        f"digital chest phantom (seed {SAMPLE_SEED}), simulated scan reconstructed with {k}")
             for k in kernels]
    files.append(SampleFile(f"{NODE_STEM}_tissues", f"{NODE_STEM}_tissues.nrrd", None,
                            "tissue label map of the digital chest phantom (LTDiffPPLib.phantom.PHANTOM_LABELS)"))
    return files


def sample_folder(cache_root: str | os.PathLike, shape: Sequence[int] = SAMPLE_SHAPE) -> Path:
    """The cache folder of the sample of ``shape`` under ``cache_root``."""
    return Path(cache_root) / f"LTDiffPP-sample-v{SAMPLE_VERSION}-{'x'.join(str(int(n)) for n in shape)}"


def cached_sample(cache_root: str | os.PathLike, shape: Sequence[int] = SAMPLE_SHAPE,
                  kernels: Sequence[str] | None = None) -> dict[str, Path] | None:
    """node name -> file of a complete cached sample, or None when it has not been made yet."""
    folder = sample_folder(cache_root, shape)
    files = {f.node_name: folder / f.file_name for f in sample_files(kernels)}
    if (folder / "manifest.json").is_file() and all(p.is_file() for p in files.values()):
        return files
    return None


def generate_sample(cache_root: str | os.PathLike, *, shape: Sequence[int] = SAMPLE_SHAPE,
                    kernels: Sequence[str] | None = None, workers: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Path]:
    """Make the sample under ``cache_root`` (or return the cached one); node name -> file.

    CT files are int16 HU (the simulator stores them as scanners do: rounded, clipped), the label map is
    uint8; all gzip-compressed NRRD with the phantom's geometry (LPS, 0.70 mm pixels at 512², 1.25 mm
    slices). The folder appears atomically: an interrupted run leaves no half-made sample behind.
    ``progress(done, total)`` counts reconstructed slices.
    """
    from .io import atomic_output
    from .phantom import chest_phantom, chest_phantom_volume
    from .runner import write_temporary_nrrd
    from .simulation import ScanProtocol, simulate

    shape = tuple(int(n) for n in shape)
    kernels = list(kernels) if kernels is not None else sample_kernels()
    cached = cached_sample(cache_root, shape, kernels)
    if cached is not None:
        if progress is not None:
            progress(shape[0], shape[0])
        return cached
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    phantom = chest_phantom_volume(shape, seed=SAMPLE_SEED)
    _, labels = chest_phantom(shape, phantom.spacing, SAMPLE_SEED, return_labels=True)
    scans = simulate(phantom, kernels, protocol=ScanProtocol(dose=SAMPLE_DOSE), seed=SAMPLE_SEED, workers=workers,
                     progress=progress).volumes
    folder = sample_folder(cache_root, shape)
    entries = sample_files(kernels)
    with atomic_output(folder, is_dir=True, overwrite=True) as tmp:
        for entry in entries:
            if entry.is_labelmap:
                _write_labels(phantom.with_hu(labels), tmp / entry.file_name)
            else:
                write_temporary_nrrd(scans[entry.kernel], tmp / entry.file_name)
        manifest: dict[str, Any] = {
            "name": SAMPLE_NAME, "version": SAMPLE_VERSION, "seed": SAMPLE_SEED, "shape": list(shape),
            "spacing_mm": list(phantom.spacing), "dose_photons_per_ray": SAMPLE_DOSE, "kernels": kernels,
            "files": {e.node_name: {"file": e.file_name, "kernel": e.kernel, "description": e.description}
                      for e in entries}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {e.node_name: folder / e.file_name for e in entries}


def _write_labels(volume: Any, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu, dtype=np.uint8))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    sitk.WriteImage(image, str(path), True, 1)


def tissue_names() -> dict[int, str]:
    """Label value -> tissue name of the label map (``PHANTOM_LABELS`` inverted, without air)."""
    from .phantom import PHANTOM_LABELS

    return {v: k.replace("_", " ") for k, v in PHANTOM_LABELS.items() if v != 0}


def sample_data_source(cache_root: str | os.PathLike, *, shape: Sequence[int] = SAMPLE_SHAPE,
                       thumbnail: str | None = None, category: str = "LTDiffPP") -> dict[str, Any]:
    """Keyword arguments of Slicer's ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` for
    the sample (add ``customDownloader``). The URIs are ``file:`` URIs of the cached files, so Sample
    Data itself can load the set once it has been made; the module's custom downloader makes it first."""
    entries = sample_files()
    folder = sample_folder(cache_root, shape)
    return {
        "category": category, "sampleName": SAMPLE_NAME,
        "uris": [(folder / e.file_name).resolve().as_uri() for e in entries],
        "fileNames": [e.file_name for e in entries],
        "nodeNames": [e.node_name for e in entries],
        "loadFileType": ["VolumeFile"] * len(entries),
        "thumbnailFileName": thumbnail,
    }
