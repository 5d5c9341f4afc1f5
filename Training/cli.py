"""``python -m Training`` / ``ltdiffpp-train``: train, resume, export, or create an untrained model file.

    python -m Training train --config CONFIG.json --run-dir RUN [--dataset DIR] [--autoencoder-from CKPT]
                             [--resume auto] [--device auto]
    torchrun --nproc_per_node N -m Training train --config CONFIG.json --run-dir RUN     (DDP)
    python -m Training export --run-dir RUN --out MODEL.safetensors [--evaluation RESULTS.json]
    python -m Training init OUT.safetensors [--config MODEL_CONFIG.json] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from LTDiffPPLib.errors import LTDiffPPError
from LTDiffPPLib.modelfile import init_model

from .config import TrainConfig


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m Training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run (or resume) the three training phases")
    t.add_argument("--config", required=True, help="training configuration (JSON)")
    t.add_argument("--run-dir", required=True, help="folder for checkpoints, metrics and the exported model")
    t.add_argument("--dataset", help="dataset folder (overrides the config's \"dataset\")")
    t.add_argument("--autoencoder-from", help="skip phase 1: reuse the autoencoder of this checkpoint (.pt) or "
                   "model file (overrides the config's \"autoencoder_from\")")
    t.add_argument("--resume", help="'auto' (latest checkpoint in the run folder) or a checkpoint path")
    t.add_argument("--device", default="auto")
    t.add_argument("--export", default="model.safetensors", help="model file written into the run folder at the end")
    e = sub.add_parser("export", help="export the latest checkpoint of a run as a model file")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--evaluation", help="JSON file of measured results to put in the model card")
    e.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("init", help="write a randomly initialised (untrained) model file")
    i.add_argument("output", help="model file to write (.safetensors)")
    i.add_argument("--config", help="JSON file with ModelConfig fields (default: the library's defaults)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--source-kernel", default="B30f")
    i.add_argument("--target-kernel", default="B70f")
    i.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.cmd == "init":
            cfg = json.loads(Path(a.config).read_text()) if a.config else None
            digest = init_model(a.output, cfg, seed=a.seed, source_kernel=a.source_kernel,
                                target_kernel=a.target_kernel, overwrite=a.overwrite)
            print(f"{a.output}  sha256 {digest}")
            return 0
        from .trainer import Trainer

        if a.cmd == "train":
            cfg = TrainConfig.load(a.config)
            if a.dataset:
                cfg.dataset = a.dataset
            if a.autoencoder_from:
                cfg.autoencoder_from = a.autoencoder_from
            trainer = Trainer(cfg, a.run_dir, device=a.device, resume=a.resume)
            trainer.run()
            if trainer.rank == 0:
                digest = trainer.export(Path(a.run_dir) / a.export, overwrite=True)
                print(f"exported {Path(a.run_dir) / a.export}  sha256 {digest}")
            return 0
        trainer = Trainer(TrainConfig.load(Path(a.run_dir) / "config.json"), a.run_dir, device="cpu", resume="auto")
        evaluation = json.loads(Path(a.evaluation).read_text()) if a.evaluation else None
        digest = trainer.export(a.out, overwrite=a.overwrite, evaluation=evaluation)
        print(f"exported {a.out}  sha256 {digest}")
        return 0
    except (LTDiffPPError, ValueError, FileNotFoundError) as exc:
        print(f"ltdiffpp-train: error: {exc}", file=sys.stderr)
        return 2
