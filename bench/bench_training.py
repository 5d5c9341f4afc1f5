"""Benchmark: training throughput of each phase (patches/s per device) and the projected training time.

    .venv/bin/python bench/bench_training.py [--config Training/configs/default.json] [--steps 10]
        [--warmup 5] [--batch-size B] [--device auto] [--dataset DIR] [--json OUT.json]
    torchrun --nproc_per_node 4 bench/bench_training.py ...   # DDP: patches/s of all processes together

Each phase of the configuration's model variant runs alone, from random weights, in the real
:class:`Training.trainer.Trainer` (the same loss, optimizer, EMA, gradient clipping, bf16 autocast on
CUDA, DDP under torchrun) for ``warmup`` + ``steps`` steps; the trainer's own throughput records
(``step_seconds`` in ``metrics.jsonl``: data sampling, forward, backward, optimizer and EMA, without
validation and checkpoints) of the windows after the warm-up give seconds per step and patches per
second. Speed does not depend on the weights or the image content, so a phase that normally starts
from the previous phase's weights is timed on random ones.

Without ``--dataset``, a small dataset is simulated first (a 512² digital chest phantom, 2 slices,
B30f/B70f at 1.5e5 photons/ray, ~20 s on 2 cores; without astra-toolbox, image-space kernel filtering
instead); patches are drawn from it as from any dataset.

Reported per phase: batch size, s/step, patches/s, and the same in 512²-slice equivalents
(patch² / 512² of a slice per patch); and the compute time the configuration's full step counts would
take at these rates (the projected training time, to compare with a model card's ``wall_time_s``,
which includes validation, checkpoints and the latent statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_CONFIG = ROOT / "Training" / "configs" / "default.json"


def small_dataset(folder: Path) -> Path:
    """A 2-slice 512² B30f → B70f dataset (train split only) in ``folder``: simulated (projection, Poisson
    noise, FBP per kernel) where astra-toolbox is installed; else — on a GPU machine that lacks it — the
    phantom with white noise filtered by each kernel's FBP window in image space (no projection), which
    has the same shape and value range, all a throughput measurement needs."""
    import numpy as np

    from LTDiffPPLib.datasets import Pair, pairs_from_simulation, write_dataset
    from LTDiffPPLib.phantom import chest_phantom_volume

    vol = chest_phantom_volume((2, 512, 512), (0.7, 0.7, 2.0), seed=0)
    try:
        import astra  # noqa: F401
    except ImportError:
        from LTDiffPPLib.kernels import get_kernel

        f = np.hypot(*np.meshgrid(np.fft.fftfreq(512, 0.7), np.fft.rfftfreq(512, 0.7), indexing="ij"))
        noisy = np.fft.rfft2(vol.hu + np.random.default_rng(0).normal(0.0, 60.0, vol.hu.shape))
        src, tgt = (vol.with_hu(np.fft.irfft2(noisy * get_kernel(k).window(f), s=(512, 512)).astype(np.float32))
                    for k in ("B30f", "B70f"))
        pairs = [Pair("bench-phantom", src, tgt, "files", "B30f", "B70f",
                      provenance={"how": "image-space kernel windows"})]
    else:
        pairs = pairs_from_simulation(vol, "bench-phantom", "B30f", "B70f", doses=(1.5e5,), seed=0)
    return write_dataset(pairs, folder / "ds", splits={"bench-phantom": "train"})


def time_phase(base: dict[str, Any], phase: int, dataset: Path, run_dir: Path, *, steps: int, warmup: int,
               batch_size: int | None, device: str) -> dict[str, Any] | None:
    """Train ``phase`` alone for warmup + steps steps; its throughput after the warm-up (rank 0), else None."""
    from Training.config import TrainConfig
    from Training.trainer import Trainer

    d = json.loads(json.dumps(base))
    d.update(dataset=str(dataset), autoencoder_from="", tensorboard=False, log_every=warmup,
             val_every=10**9, checkpoint_every=10**9)
    for p in (1, 2, 3):
        pc = d.setdefault(f"phase{p}", {})
        pc["steps"] = warmup + steps if p == phase else 0
        if p == phase:
            pc["warmup"] = 1  # the LR warm-up does not change the cost of a step
            if batch_size:
                pc["batch_size"] = batch_size
    cfg = TrainConfig.from_dict(d)
    trainer = Trainer(cfg, run_dir, device=device, log=lambda s: None)
    trainer.run()
    if trainer.rank != 0:
        return None
    timed = [r for r in trainer.history if r.get("phase") == phase and "step_seconds" in r and r["step"] > warmup]
    step_s = sum(r["step_seconds"] for r in timed) / len(timed)
    pc = cfg.phase(phase)
    patches = pc.batch_size * trainer.world / step_s
    return {"phase": phase, "batch_size": pc.batch_size, "world_size": trainer.world, "steps_timed": steps,
            "step_seconds": step_s, "patches_per_s": patches,
            "slices_512_per_s": patches * (cfg.patch / 512) ** 2, "device": trainer.device.type}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="training configuration (JSON)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per phase (a multiple of --warmup)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per phase before the timed ones")
    ap.add_argument("--batch-size", type=int, default=None, help="every phase's batch size (default: the config's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dataset", help="a dataset folder (default: simulate a small one)")
    ap.add_argument("--json", help="also write the results as JSON here")
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 1 or a.steps % a.warmup:
        ap.error("--steps and --warmup must be >= 1 and --steps a multiple of --warmup (one log window each)")

    import torch

    from bench_standardize import hardware, software
    from Training.config import TrainConfig

    base = json.loads(Path(a.config).read_text())
    cfg = TrainConfig.from_dict({**base, "dataset": ""})
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if a.dataset:
            dataset = Path(a.dataset)
        else:
            # under torchrun every process simulates the same seeded data into its own folder
            t0 = time.perf_counter()
            dataset = small_dataset(tmp_path)
            if rank == 0:
                print(f"simulated the benchmark dataset in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)
        rows = []
        for phase in cfg.phases:
            row = time_phase(base, phase, dataset, tmp_path / f"run-p{phase}", steps=a.steps, warmup=a.warmup,
                             batch_size=a.batch_size, device=a.device)
            if row is not None:
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if rank != 0:
        return 0
    dev = torch.device(rows[0]["device"])
    projected = sum(cfg.phase(r["phase"]).steps * r["step_seconds"] for r in rows if a.batch_size is None)
    config = Path(a.config).resolve()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hardware": hardware(dev),
           "software": software(),
           "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else a.config,
           "patch": cfg.patch, "phases": rows,
           "projected_training_compute_s": projected if a.batch_size is None else None,
           "steps_per_phase": {str(p): cfg.phase(p).steps for p in cfg.phases}}
    print(json.dumps(res, indent=2))
    for r in rows:
        print(f"| {res['hardware']} | {res['config']} | {r['phase']} | {r['batch_size']} × {r['world_size']} | "
              f"{r['step_seconds']:.3f} | {r['patches_per_s']:.1f} | {r['slices_512_per_s']:.2f} |")
    if projected:
        print(f"projected compute time of the configuration's {res['steps_per_phase']} steps: {projected / 60:.1f} min")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
