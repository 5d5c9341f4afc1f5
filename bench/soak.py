"""Soak run: standardize many small volumes in one process; memory must stay flat, every output valid.

    nice -n 19 .venv/bin/python bench/soak.py [--volumes 100] [--shape 4,64,64] [--steps 2] [--format .nrrd]
                                              [--model PATH] [--json OUT.json]

Each iteration does what a batch user does: write a phantom volume as an input file, read it back
(``read_volume``), ``standardize`` it with one loaded model, write the result atomically
(``write_volume``), read the output back and check it (shape, geometry, finite HU within the model's
range). Resident memory (VmRSS from /proc/self/status) is recorded after every iteration; the summary
compares the first 10 % (warm-up) with the rest and fits a slope. Without --model, a randomly
initialised model of a small architecture is used (memory and I/O behaviour do not depend on weights).
Exits 1 when an output is invalid or memory grows by more than --max-growth-mib after warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from LTDiffPPLib import io  # noqa: E402
from LTDiffPPLib.inference import standardize  # noqa: E402
from LTDiffPPLib.modelfile import init_model, load_model  # noqa: E402
from LTDiffPPLib.models import ModelConfig  # noqa: E402
from LTDiffPPLib.phantom import qa_phantom  # noqa: E402

SMALL = ModelConfig(patch=2, ae_widths=(8, 16, 16), latent_channels=4, den_widths=(8, 16), den_blocks=1,
                    time_dim=16, groups=4)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--shape", default="4,64,64", help="Z,Y,X voxels per volume")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--format", default=".nrrd", help="input/output file type (.nrrd .mha .nii.gz) or 'dicom'")
    ap.add_argument("--model", help="model file (default: a random small model)")
    ap.add_argument("--max-growth-mib", type=float, default=20.0)
    ap.add_argument("--json", help="write the per-iteration record here")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    import torch

    with tempfile.TemporaryDirectory(prefix="ltdiffpp-soak-") as tmp:
        work = Path(tmp)
        model_path = Path(a.model) if a.model else init_model(work / "soak.safetensors", SMALL, seed=0,
                                                              name="soak") and work / "soak.safetensors"
        model = load_model(model_path)
        hu_range = (model.metadata["hu"]["min"], model.metadata["hu"]["max"])
        suffix = "" if a.format == "dicom" else a.format
        rss, times, invalid = [], [], []
        t_start = time.perf_counter()
        for i in range(a.volumes):
            t0 = time.perf_counter()
            vol = io.CTVolume(hu=qa_phantom(shape, spacing_mm=0.7 * 512 / shape[2], seed=i),
                              spacing=(0.7, 0.7, 2.5), origin=(-20.0, 10.0, 5.0 * i),
                              direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
            src = io.write_volume(vol, work / f"in{i:03d}{suffix}", convolution_kernel="B30f")
            v = io.read_volume(src)
            hu = standardize(v.hu, v.spacing, model, device="cpu", steps=a.steps, seed=i)
            out = io.write_volume(v.with_hu(hu), work / f"out{i:03d}{suffix}", convolution_kernel="B70f",
                                  provenance={"model_sha256": model.sha256})
            back = io.read_volume(out)
            ok = (back.hu.shape == shape and np.isfinite(back.hu).all()
                  and hu_range[0] - 0.5 <= back.hu.min() and back.hu.max() <= hu_range[1] + 0.5
                  and np.allclose(back.origin, v.origin, atol=1e-4) and np.allclose(back.spacing, v.spacing, atol=1e-4))
            if not ok:
                invalid.append(i)
            io.atomic._remove(src)  # keep the disk footprint constant
            io.atomic._remove(out)
            times.append(time.perf_counter() - t0)
            rss.append(rss_mib())
        total = time.perf_counter() - t_start

    warm = max(1, a.volumes // 10)
    tail = np.array(rss[warm:]) if a.volumes > warm else np.array(rss)
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) if len(tail) > 1 else 0.0
    growth = float(tail.max() - tail[0])
    summary = {
        "volumes": a.volumes, "shape": shape, "steps": a.steps, "format": a.format, "invalid_outputs": invalid,
        "rss_mib": {"after_first": rss[0], "after_warmup": rss[warm - 1], "last": rss[-1], "max": max(rss),
                    "growth_after_warmup": growth, "slope_kib_per_volume": slope * 1024},
        "seconds": {"total": total, "per_volume_median": float(np.median(times))},
        "hardware": f"{io.cpu_name()}, {__import__('os').cpu_count()} CPUs", "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    flat = growth <= a.max_growth_mib
    print(f"soak: {a.volumes} volumes {shape}, {a.steps} steps, {a.format}, {summary['hardware']}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"  RSS MiB: first {rss[0]:.1f}, after warm-up ({warm}) {rss[warm - 1]:.1f}, last {rss[-1]:.1f}, "
          f"max {max(rss):.1f}; growth after warm-up {growth:.2f} MiB, slope {slope * 1024:.1f} KiB/volume "
          f"-> {'FLAT' if flat else 'GROWING'}")
    print(f"  time: {total:.1f} s total, {np.median(times) * 1000:.0f} ms/volume median")
    print(f"  outputs: {a.volumes - len(invalid)}/{a.volumes} valid" + (f"; invalid: {invalid}" if invalid else ""))
    if a.json:
        Path(a.json).write_text(json.dumps({**summary, "rss_per_volume_mib": rss, "seconds_per_volume": times},
                                           indent=1))
    return 0 if flat and not invalid else 1


if __name__ == "__main__":
    sys.exit(main())
