"""Benchmark: end-to-end standardization of 512×512×N volumes, file in → file out, per phase and peak memory.

    .venv/bin/python bench/bench_volume.py [--slices 50 150 300] [--model PATH] [--device auto]
        [--batch-size B] [--steps N] [--precision auto|float32|bfloat16] [--workdir DIR] [--json OUT.json]

Input: a digital chest phantom (``LTDiffPPLib.phantom.chest_phantom_volume``, 512², 0.70 mm pixels,
1.0 mm slices) with seeded Gaussian noise (σ 15 HU, a smooth-kernel-like noise level) rounded to int16
HU and written as a compressed NRRD, as a scanner export converted to NRRD would be. The N-slice inputs
are the first N slices of one 300-slice phantom, made once and cached in ``--workdir``.

Each N runs in a fresh worker process (so that its peak RSS is its own, not the phantom maker's):
``read_volume`` → ``standardize`` (with ``timings=``: copy, encode, sample, decode) → ``write_volume``
(float32 NRRD, compressed, as ``ltdiffpp standardize`` writes it). Reported per N: seconds per phase,
total (read → written), slices/second, peak RSS of the worker (VmHWM, everything the process ever held:
interpreter, torch, model, input, output, write buffers), and on CUDA the peak GPU memory. Model loading
and a one-slice warm-up are timed separately (once per process; a CLI run pays them once per call).

Without ``--model`` a randomly initialised model of ``Training/configs/default.json``'s architecture is
used (timing does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PHASES = ("read", "copy", "encode", "sample", "decode", "write")


def make_input(workdir: Path, n: int, n_max: int, seed: int = 0) -> Path:
    """The first ``n`` slices of the cached ``n_max``-slice noisy phantom, as an int16 compressed NRRD."""
    import SimpleITK as sitk

    from LTDiffPPLib.phantom import chest_phantom_volume

    path = workdir / f"phantom_{n}x512x512_seed{seed}.nrrd"
    if path.is_file():
        return path
    full = workdir / f"phantom_{n_max}x512x512_seed{seed}.npy"
    if not full.is_file():
        t0 = time.perf_counter()
        vol = chest_phantom_volume((n_max, 512, 512), (0.703125, 0.703125, 1.0), seed=seed)
        noise = np.random.default_rng(seed).standard_normal(vol.hu.shape, dtype=np.float32) * 15.0
        hu = np.clip(np.rint(vol.hu + noise), -1024, 3071).astype(np.int16)
        np.save(full, hu)
        meta = {"spacing": vol.spacing, "origin": vol.origin, "direction": vol.direction}
        (workdir / f"phantom_{n_max}_geometry.json").write_text(json.dumps(meta))
        print(f"made a {n_max}×512² phantom in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    hu = np.load(full, mmap_mode="r")[:n]
    meta = json.loads((workdir / f"phantom_{n_max}_geometry.json").read_text())
    img = sitk.GetImageFromArray(np.ascontiguousarray(hu))
    img.SetSpacing(meta["spacing"])
    img.SetOrigin(meta["origin"])
    img.SetDirection(meta["direction"])
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One file in → file out run in this process; returns the measurements."""
    import torch
    from bench_standardize import get_model, peak_rss_mb, sync

    from LTDiffPPLib.inference import default_batch_size, pick_device, standardize
    from LTDiffPPLib.io import read_volume, write_volume

    dev = pick_device(a.device)
    t0 = time.perf_counter()
    model, what = get_model(a.model)
    model.net.to(dev)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    standardize(np.full((1, 512, 512), -1000, np.float32), None, model, device=dev, steps=1, batch_size=a.batch_size,
                precision=a.precision)
    sync(dev)
    t_warm = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    volume = read_volume(a.input)
    timings["read"] = time.perf_counter() - t_start
    hu = standardize(volume.hu, volume.spacing, model, device=dev, steps=a.steps, batch_size=a.batch_size,
                     timings=timings, precision=a.precision)
    t0 = time.perf_counter()
    write_volume(volume.with_hu(hu), a.output, overwrite=True)
    timings["write"] = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    n = volume.hu.shape[0]
    return {
        "slices": n,
        "model": what,
        "steps": int(a.steps or model.metadata["sampling"]["steps"]),
        "solver": model.metadata["sampling"]["solver"],
        "batch_size": a.batch_size or default_batch_size(dev),
        "precision": a.precision,
        "device": dev.type,
        "torch_threads": torch.get_num_threads(),
        "model_load_s": t_load,
        "warmup_s": t_warm,
        "phase_s": {k: timings.get(k, 0.0) for k in PHASES},
        "total_s": total,
        "seconds_per_slice": total / n,
        "slices_per_second": n / total,
        "input_mb": Path(a.input).stat().st_size / 2**20,
        "output_mb": Path(a.output).stat().st_size / 2**20,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }


def main() -> int:
    from LTDiffPPLib.inference import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, nargs="+", default=[50, 150, 300])
    p.add_argument("--model", help="model file (default: random weights of the default architecture)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="default: the model's sampling steps")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="standardize's precision (default auto: bf16 on CUDA, float32 elsewhere)")
    p.add_argument("--workdir", help="where inputs are cached and outputs written (default: a temporary folder)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--worker", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        a.input, a.output = a.worker
        print(json.dumps(worker(a)))
        return 0

    import torch
    from bench_standardize import hardware, software

    from LTDiffPPLib.inference import pick_device

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        n_max = max(a.slices)
        results = []
        for n in a.slices:
            inp = make_input(workdir, n, n_max)
            out = workdir / f"out_{n}.nrrd"
            cmd = [sys.executable, __file__, "--worker", str(inp), str(out), "--device", a.device,
                   "--precision", a.precision]
            for flag, val in (("--model", a.model), ("--batch-size", a.batch_size), ("--steps", a.steps)):
                if val is not None:
                    cmd += [flag, str(val)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            results.append(r)
            print(json.dumps(r), flush=True)
            out.unlink(missing_ok=True)

    dev = pick_device(a.device)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hardware": hardware(dev),
               "software": software(), "torch_threads": torch.get_num_threads(), "runs": results}
    print("\n| slices | read | copy | encode | sample | decode | write | total | s/slice | slices/s | peak RSS MB | peak GPU MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ph = r["phase_s"]
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "–"
        print(f"| {r['slices']} | " + " | ".join(f"{ph[k]:.1f}" for k in PHASES)
              + f" | {r['total_s']:.1f} | {r['seconds_per_slice']:.2f} | {r['slices_per_second']:.2f} | {r['peak_rss_mb']:.0f} | {gpu} |")
    print(f"\n{summary['hardware']}; {summary['software']}; {results[0]['model']}; "
          f"{results[0]['solver']} {results[0]['steps']} steps, batch {results[0]['batch_size']}, "
          f"precision {results[0]['precision']}")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
