"""Create LTDiffPP model files in the library's format (:mod:`LTDiffPPLib.modelfile`).

    python -m Training init OUT.safetensors [--config CONFIG.json] [--seed S]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from LTDiffPPLib.modelfile import init_model


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m Training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("init", help="write a randomly initialised (untrained) model file")
    pi.add_argument("output", help="model file to write (.safetensors)")
    pi.add_argument("--config", help="JSON file with ModelConfig fields (default: the library's defaults)")
    pi.add_argument("--seed", type=int, default=0)
    pi.add_argument("--source-kernel", default="B30f")
    pi.add_argument("--target-kernel", default="B70f")
    pi.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    cfg = json.loads(Path(a.config).read_text()) if a.config else None
    digest = init_model(a.output, cfg, seed=a.seed, source_kernel=a.source_kernel, target_kernel=a.target_kernel,
                        overwrite=a.overwrite)
    print(f"{a.output}  sha256 {digest}")
    return 0
