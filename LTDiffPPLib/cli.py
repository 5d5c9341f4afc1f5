"""The ``ltdiffpp`` command line: headless and batch kernel standardization.

    ltdiffpp standardize INPUT OUTPUT [--model PATH_OR_NAME] [--device auto|cpu|cuda|mps] [--steps N] ...
    ltdiffpp info MODEL
    ltdiffpp models
    ltdiffpp demo [--out DIR]

Errors the user can fix (bad input, bad model file, existing output) print one line
``ltdiffpp: error: ...`` and exit with status 2; a cancelled run (Ctrl-C) exits with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .errors import LTDiffPPError
from .io import check_output_path, is_image_path, read_volume, write_volume
from .modelfile import load_model, read_metadata, registry, resolve_model, sha256_file

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LTDiffPPError as exc:
        print(f"ltdiffpp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ltdiffpp: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltdiffpp", description="CT reconstruction-kernel standardization with LTDiff++.")
    p.add_argument("--version", action="version", version=f"ltdiffpp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("standardize", help="convert a CT from the model's source kernel to its target kernel")
    s.add_argument("input", help="DICOM series folder, or an image file (.nrrd .nii .nii.gz .mha .mhd)")
    s.add_argument("output", help="image file (format by extension), or a folder to write a DICOM series into")
    s.add_argument("--model", help="model file or registered model name (default: the registry's default)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    s.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    s.add_argument("--solver", choices=["ddim", "dpmpp2m"], help="ODE solver (default: the model's)")
    s.add_argument("--seed", type=int, default=0, help="seed of the shared noise field (default 0)")
    s.add_argument("--batch-size", type=int, help="slices per batch (default 4 on CPU, 16 on GPU)")
    s.add_argument("--ensemble", type=int, default=1, help="average K samples (default 1)")
    s.add_argument("--series-uid", help="SeriesInstanceUID to read when the folder holds several series")
    s.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_standardize)

    i = sub.add_parser("info", help="print a model file's metadata and SHA-256")
    i.add_argument("model", help="model file or registered model name")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    i.set_defaults(func=_cmd_info)

    m = sub.add_parser("models", help="list the models shipped in the registry")
    m.set_defaults(func=_cmd_models)

    d = sub.add_parser("demo", help="run the pipeline end to end on the built-in sample")
    d.add_argument("--out", default="ltdiffpp-demo", help="output folder (default ./ltdiffpp-demo)")
    d.set_defaults(func=_cmd_demo)
    return p


def _cmd_standardize(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .inference import standardize

    check_output_path(a.output, overwrite=a.overwrite, is_dir=not is_image_path(a.output))
    model = load_model(a.model if a.model else None)
    volume = read_volume(a.input, series_uid=a.series_uid)
    meta = model.metadata
    steps = meta["sampling"]["steps"] if a.steps is None else a.steps
    solver = a.solver or meta["sampling"]["solver"]
    n = volume.hu.shape[0]
    bar = tqdm(total=n, unit="slice", desc="standardize", disable=a.quiet, bar_format="{l_bar}{bar}| {n:.1f}/{total} slices [{elapsed}<{remaining}]")

    def progress(done: float, total: int) -> None:
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    try:
        hu = standardize(volume.hu, volume.spacing, model, device=a.device, steps=steps, solver=solver, seed=a.seed,
                         batch_size=a.batch_size, ensemble=a.ensemble, progress=progress)
    finally:
        bar.close()
    description = (f"LTDiffPP {meta['source_kernel']}->{meta['target_kernel']} ({meta.get('name', model.path.stem)}, "
                   f"{solver} {steps} steps, seed {a.seed})")
    out = write_volume(volume.with_hu(hu), a.output, overwrite=a.overwrite, series_description=description,
                       convolution_kernel=meta["target_kernel"])
    if not a.quiet:
        dt = time.perf_counter() - t0
        print(f"wrote {out} ({n} slices, {dt:.1f} s, {dt / n:.2f} s/slice)")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    path, expected = resolve_model(a.model)
    meta = read_metadata(path)
    digest = sha256_file(path)
    status = "no registry entry" if expected is None else ("matches registry" if digest == expected else "MISMATCH with registry")
    if a.json:
        print(json.dumps({"path": str(path), "sha256": digest, "checksum": status, "metadata": meta}, indent=2, sort_keys=True))
        return 0
    cfg = meta["config"]
    print(f"file           {path}")
    print(f"sha256         {digest} ({status})")
    print(f"name           {meta.get('name', '')}")
    print(f"description    {meta.get('description', '')}")
    print(f"kernels        {meta['source_kernel']} -> {meta['target_kernel']}")
    print(f"HU             input = (clip(HU, {meta['hu']['min']}, {meta['hu']['max']}) - {meta['hu']['center']}) / {meta['hu']['scale']}")
    print(f"sampling       {meta['sampling']['solver']}, {meta['sampling']['steps']} steps, {cfg['prediction']}-prediction, {cfg['schedule']} schedule")
    print(f"architecture   UNet++ autoencoder {cfg['ae_widths']} -> latent {cfg['latent_channels']} ch at 1/{cfg['patch']}; denoiser {cfg['den_widths']}")
    print(f"weights        {meta.get('weights_dtype', 'float32')}")
    print(f"training       {json.dumps(meta.get('training', {}), sort_keys=True)}")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    entries, default = registry()
    if not entries:
        print("no models are shipped yet; pass a model file with --model PATH")
    for e in entries:
        mark = "*" if e.name == default else " "
        print(f"{mark} {e.name:24s} {e.source_kernel} -> {e.target_kernel}  {e.file}  {e.description}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
