"""The ``ltdiffpp`` command line: headless and batch kernel standardization.

    ltdiffpp standardize INPUT OUTPUT [--target-kernel NAME] [--source-kernel NAME] [--force] [--model PATH_OR_NAME] [--device auto|cpu|cuda|mps] [--steps N] ...
    ltdiffpp batch INPUT OUTPUT --target-kernel NAME [--device ...] [--workers N] [--dry-run] [--overwrite] ...
    ltdiffpp simulate INPUT OUTDIR [--kernels B30f,B70f] [--dose N] [--thickness MM] [--seed S]
    ltdiffpp build-dataset OUTDIR [--simulate PATH ...] [--phantoms N] [--dicom-pair DIR ...] [--file-pair S=T ...]
    ltdiffpp evaluate --reference REF --candidate NAME=PATH [...] [--source SRC] [--mask LABELMAP] --out DIR
    ltdiffpp info MODEL
    ltdiffpp models
    ltdiffpp kernels [--json]
    ltdiffpp demo [--out DIR]

Errors the user can fix (bad input, bad model file, existing output, an option out of range) print one
line ``ltdiffpp: error: ...`` and exit with status 2; a cancelled run (Ctrl-C) exits with 130. Warnings
print as one line ``ltdiffpp: warning: ...`` (their categories are unchanged, so library users can
filter them as usual).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from . import __version__, limits
from .errors import InputError, LTDiffPPError, ModelFileError, OutputError
from .inference import PRECISIONS
from .io import check_output_path, read_volume, series_description, software_versions, write_volume
from .io.atomic import check_not_input, output_lock
from .io.formats import output_is_image
from .modelfile import load_model, read_metadata, registry, resolve_model, sha256_file, verify_model_file
from .models import ModelConfig

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a killed writer


def main(argv: list[str] | None = None) -> int:
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning  # restored when main returns
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = previous


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """A warning as one line ``ltdiffpp: warning: ...`` (no source path, no code line).

    Only the text is replaced (``warnings.formatwarning``), not how warnings are shown, so whoever records
    them (``warnings.catch_warnings(record=True)``, ``pytest.warns``) still gets them with their category."""
    return f"ltdiffpp: warning: {' '.join(str(message).split())}\n"


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line ``ltdiffpp: error: ...`` (exit 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f"{command}: " if command else ""
        self.exit(2, f"ltdiffpp: error: {where}{' '.join(message.split())} (see {self.prog} --help)\n")


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, printed as one line)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed stdout shows here, inside the handlers below
        return code
    except LTDiffPPError as exc:
        print(f"ltdiffpp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ltdiffpp: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`ltdiffpp info M | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ltdiffpp", description="CT reconstruction-kernel standardization with LTDiff++.")
    p.add_argument("--version", action="version", version=f"ltdiffpp {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("standardize", help="convert a CT from its reconstruction kernel to another one")
    s.add_argument("input", help="DICOM series folder, or an image file (.nrrd .nii .nii.gz .mha .mhd)")
    s.add_argument("output", help="image file (format by extension), or a folder to write a DICOM series into")
    s.add_argument("--target-kernel", metavar="NAME", help="kernel to convert to, a library name such as B70f "
                   "(`ltdiffpp kernels`; default: the model's target kernel)")
    s.add_argument("--source-kernel", metavar="NAME", help="the input's kernel when its DICOM header does not "
                   "name it (image files) or names it wrongly (then with --force)")
    s.add_argument("--force", action="store_true", help="convert despite the domain guard's objections (unknown "
                   "source kernel, non-HU values, small or oblique images); the output records what was overridden")
    s.add_argument("--model", help="model file or registered model name (default: the registered model for the "
                   "kernel pair)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    s.add_argument("--steps", type=_int_in(limits.STEPS), help="sampling steps, 1-1000 (default: the model's)")
    s.add_argument("--solver", choices=["ddim", "dpmpp2m"], help="ODE solver (default: the model's)")
    s.add_argument("--seed", type=_int_in(limits.SEED), default=0, help="seed of the shared noise field (default 0)")
    s.add_argument("--batch-size", type=_int_in(limits.BATCH_SIZE), help="slices per batch (default 2 on CPU, 16 on GPU)")
    s.add_argument("--ensemble", type=_int_in(limits.ENSEMBLE), default=1, help="average K samples, 1-64 (default 1)")
    s.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="network arithmetic (default auto: bfloat16 on CUDA, float32 elsewhere)")
    s.add_argument("--series-uid", help="SeriesInstanceUID to read when the folder holds several series")
    s.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_standardize)

    add_batch_parser(sub)

    i = sub.add_parser("info", help="print a model file's metadata and SHA-256")
    i.add_argument("model", help="model file or registered model name")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    i.set_defaults(func=_cmd_info)

    sim = sub.add_parser("simulate", help="scan a CT (or phantom) once and reconstruct it with several kernels")
    sim.add_argument("input", help="DICOM series folder or image file, in HU (the ground-truth object)")
    sim.add_argument("outdir", help="folder to write one image file per kernel into (created if missing)")
    sim.add_argument("--kernels", default="B30f,B70f", help="comma-separated kernel names (default B30f,B70f)")
    sim.add_argument("--dose", type=_float_in(limits.DOSE), default=2.0e5, help="incident photons per detector ray (default 2e5)")
    sim.add_argument("--views", type=_int_in(limits.VIEWS), default=720, help="projection angles over 180 degrees (default 720)")
    sim.add_argument("--thickness", type=_float_in(limits.THICKNESS_MM), help="slice thickness in mm (a whole multiple of the input spacing)")
    sim.add_argument("--seed", type=_int_in(limits.SEED), default=0)
    sim.add_argument("--workers", type=_int_in(limits.WORKERS), help="processes (default: all cores)")
    sim.add_argument("--format", default=".nrrd", choices=[".nrrd", ".nii.gz", ".mha"], help="output file type")
    sim.add_argument("--series-uid", help="SeriesInstanceUID when the folder holds several series")
    sim.add_argument("--overwrite", action="store_true")
    sim.add_argument("--quiet", action="store_true")
    sim.set_defaults(func=_cmd_simulate)

    b = sub.add_parser("build-dataset", help="build a paired-kernel dataset (real DICOM pairs, file pairs, simulation)")
    b.add_argument("outdir", help="dataset folder to create")
    b.add_argument("--kernels", default="B30f,B70f", help="SOURCE,TARGET kernel names (simulator kernels for "
                   "--simulate/--phantoms; labels for --file-pair)")
    b.add_argument("--simulate", nargs="+", default=[], metavar="PATH", help="CT volumes (DICOM folders or images) to scan")
    b.add_argument("--phantoms", type=_int_in(limits.PHANTOMS), default=0, help="number of digital chest phantoms to scan (seeds 0..N-1)")
    b.add_argument("--phantom-shape", default="32,256,256", help="phantom Z,Y,X voxels (default 32,256,256)")
    b.add_argument("--doses", default="2e5", help="comma-separated photons per ray; one simulated pair per dose")
    b.add_argument("--thickness", type=_float_in(limits.THICKNESS_MM), help="simulated slice thickness in mm")
    b.add_argument("--views", type=_int_in(limits.VIEWS), default=720)
    b.add_argument("--dicom-pair", nargs="+", default=[], metavar="FOLDER",
                   help="patient folders holding both series of one scan")
    b.add_argument("--dicom-kernels", help="SOURCE,TARGET substrings of ConvolutionKernel (default: --kernels)")
    b.add_argument("--file-pair", nargs="+", default=[], metavar="SRC=TGT", help="image files of one scan")
    b.add_argument("--assume-same-grid", action="store_true", help="copy the source geometry onto a file pair's "
                   "target when only its metadata differs (e.g. lost spacing)")
    b.add_argument("--val", type=_float_in((0.0, 0.9)), default=0.1, help="fraction of patients for validation (default 0.1)")
    b.add_argument("--test", type=_float_in((0.0, 0.9)), default=0.1, help="fraction of patients for testing (default 0.1)")
    b.add_argument("--seed", type=_int_in(limits.SEED), default=0)
    b.add_argument("--workers", type=_int_in(limits.WORKERS), help="simulation processes (default: all cores)")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_cmd_build_dataset)

    add_evaluate_parser(sub)

    kl = sub.add_parser("kernels", help="list the kernel library (vendors, calibration, MTF, DICOM spellings)")
    kl.add_argument("--json", action="store_true", help="print machine-readable JSON")
    kl.set_defaults(func=_cmd_kernels)

    m = sub.add_parser("models", help="list the models shipped in the registry")
    m.set_defaults(func=_cmd_models)

    d = sub.add_parser("demo", help="run the pipeline end to end on the built-in sample")
    d.add_argument("--out", default="ltdiffpp-demo", help="output folder (default ./ltdiffpp-demo)")
    d.set_defaults(func=_cmd_demo)
    return p


def _cmd_standardize(a: argparse.Namespace) -> int:
    inputs = [a.input] + ([a.model] if a.model and Path(a.model).exists() else [])
    check_not_input(a.output, inputs)  # first: overwriting an input is the worst mistake to name
    is_image = output_is_image(a.output)
    check_output_path(a.output, overwrite=a.overwrite, is_dir=not is_image, inputs=inputs)
    with output_lock(a.output):  # a second run on the same output is refused here, before the work
        check_output_path(a.output, overwrite=a.overwrite, is_dir=not is_image, inputs=inputs)
        return _standardize(a)


def _standardize(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .guard import plan_conversion
    from .inference import standardize_volume

    volume = read_volume(a.input, series_uid=a.series_uid)
    plan = plan_conversion(volume, a.target_kernel, a.source_kernel, a.model, a.force)
    model = load_model(plan.model)
    meta = model.metadata
    steps = meta["sampling"]["steps"] if a.steps is None else a.steps
    solver = a.solver or meta["sampling"]["solver"]
    if not a.quiet:
        print(f"{plan.source.kernel.name} -> {plan.target.name}: source kernel {plan.source.describe()}; "
              f"model {meta.get('name', model.path.stem)}", file=sys.stderr)
    n = volume.hu.shape[0]
    bar = tqdm(total=n, unit="slice", desc="standardize", disable=a.quiet, bar_format="{l_bar}{bar}| {n:.1f}/{total} slices [{elapsed}<{remaining}]")

    def progress(done: float, total: int) -> None:
        bar.update(done * n / total - bar.n)

    t0 = time.perf_counter()
    try:
        converted, plan = standardize_volume(volume, model=model, plan=plan, steps=steps, solver=solver, seed=a.seed,
                                             batch_size=a.batch_size, ensemble=a.ensemble, progress=progress,
                                             precision=a.precision)
    finally:
        bar.close()
    description = series_description(f"LTDiffPP {plan.source.kernel.name}->{plan.target.name}",
                                      meta.get("name", model.path.stem), solver, steps, a.seed)
    provenance = {"software": ", ".join(f"{k} {v}" for k, v in software_versions().items()),
                  "model": str(meta.get("name", model.path.stem)), "model_sha256": model.sha256,
                  "sampling": f"{solver} {steps} steps, seed {a.seed}, ensemble {a.ensemble}, precision {a.precision}",
                  **plan.provenance()}
    out = write_volume(converted, a.output, overwrite=a.overwrite, series_description=description,
                       convolution_kernel=plan.target.name, provenance=provenance)
    if not a.quiet:
        dt = time.perf_counter() - t0
        print(f"wrote {out} ({n} slices, {dt:.1f} s, {dt / n:.2f} s/slice; model sha256 {model.sha256})")
    return 0


def add_batch_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``batch``: a cohort (folder tree or list) to one kernel; the work is :mod:`LTDiffPPLib.batch`."""
    b = subparsers.add_parser(
        "batch", help="standardize every CT series below a folder (or in a CSV/JSON list) to one kernel",
        description="Index every series below INPUT from its headers, convert those whose kernel differs from "
                    "--target-kernel, mirror the tree under OUTPUT, record each series in OUTPUT/manifest.jsonl "
                    "and write OUTPUT/report.html. Rerun the same command to resume: only what is not done is "
                    "converted. Under torchrun the series are sharded across ranks.")
    b.add_argument("input", help="folder tree of DICOM series (any depth, DICOMDIR exports) and image files, or a "
                   ".csv/.json list of inputs (columns input[,source_kernel][,series_uid])")
    b.add_argument("output", help="output folder (created; mirrors INPUT; holds manifest.jsonl and report.html)")
    b.add_argument("--target-kernel", metavar="NAME", required=True, help="kernel to convert to (`ltdiffpp kernels`)")
    b.add_argument("--source-kernel", metavar="NAME", help="kernel of the inputs whose header names none, or one "
                   "without a known response (image files, anonymized DICOM, e.g. Br38f); a header naming a library "
                   "kernel wins; default: estimated from each image")
    b.add_argument("--model", help="model file or registered name (default: the registered model for each pair)")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    b.add_argument("--workers", type=_int_in(limits.WORKERS), default=1, help="worker processes on this machine "
                   "(default 1; one per GPU where there are GPUs); each loads the model once")
    b.add_argument("--dry-run", action="store_true", help="index and print what would be done; write nothing")
    b.add_argument("--overwrite", action="store_true", help="convert again series already done and replace "
                   "existing outputs")
    b.add_argument("--force", action="store_true", help="convert despite the domain guard's overridable objections")
    b.add_argument("--steps", type=_int_in(limits.STEPS), help="sampling steps, 1-1000 (default: the model's)")
    b.add_argument("--solver", choices=["ddim", "dpmpp2m"], help="ODE solver (default: the model's)")
    b.add_argument("--seed", type=_int_in(limits.SEED), default=0, help="seed of the shared noise field (default 0)")
    b.add_argument("--batch-size", type=_int_in(limits.BATCH_SIZE), help="slices per forward pass")
    b.add_argument("--precision", default="auto", choices=PRECISIONS, help="network arithmetic (default auto: "
                   "bfloat16 on CUDA, and on CPUs with native bf16 for models whose bf16 CCC was measured within "
                   "0.002 of float32; float32 otherwise)")
    b.add_argument("--prefetch", type=_int_in((1, 8)), default=1, help="series read ahead while one converts "
                   "(default 1; each holds one volume in memory)")
    b.add_argument("--no-report", action="store_true", help="no QC thumbnails and no report.html")
    b.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    b.set_defaults(func=_cmd_batch)
    return b


def _cmd_batch(a: argparse.Namespace) -> int:
    from .batch import BatchOptions, run_batch

    opts = BatchOptions(target_kernel=a.target_kernel, source_kernel=a.source_kernel, model=a.model, device=a.device,
                        workers=a.workers, overwrite=a.overwrite, force=a.force, steps=a.steps, solver=a.solver,
                        seed=a.seed, batch_size=a.batch_size, precision=a.precision, prefetch=a.prefetch,
                        report=not a.no_report, quiet=a.quiet)
    try:
        run_batch(a.input, a.output, opts, dry_run=a.dry_run)
    except KeyboardInterrupt:
        print("ltdiffpp: interrupted; finished series are recorded in the manifest, rerun the same command to "
              "resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0  # failed series are in the manifest (and the summary); the batch itself completed


def _cmd_kernels(a: argparse.Namespace) -> int:
    from .kernels import kernel_library

    rows = []
    for k in kernel_library().values():
        m50, m10 = k.mtf_points() if k.has_response else (None, None)
        rows.append({"name": k.name, "vendor": k.vendor, "calibration": k.calibration, "description": k.description,
                     "dicom": list(k.dicom), "equivalent_to": k.equivalent_to or None,
                     "mtf50_per_mm": m50, "mtf10_per_mm": m10,
                     "published_mtf_lp_cm": [list(m) for m in k.published_mtf], "source": k.source,
                     "caveat": k.caveat or None})
    if a.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return 0
    fmt = "{:13s} {:8s} {:24s} {:>7s} {:>7s}  {}"
    print(fmt.format("kernel", "vendor", "calibration", "MTF50", "MTF10", "description (MTF in mm^-1, simulated system)"))
    for r in rows:
        cell = ["-" if v is None else f"{v:.2f}" for v in (r["mtf50_per_mm"], r["mtf10_per_mm"])]
        if r["calibration"] != "none" and r["mtf10_per_mm"] is None:
            cell[1] = "> 1"
        print(fmt.format(r["name"], r["vendor"], r["calibration"], *cell,
                         r["description"] + (" [doubtful, see --json]" if r["caveat"] else "")))
    print("\nConvertible pairs (shipped models): " + ", ".join(f"{s}->{t}" for _, s, t in _pairs()))
    print("calibration 'none': identified from DICOM headers only, no known response; `--json` gives DICOM "
          "spellings and sources")
    return 0


def _pairs() -> list[tuple[str, str, str]]:
    from .guard import registered_pairs

    return registered_pairs()


def _cmd_simulate(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .kernels import get_kernel
    from .simulation import ScanProtocol, simulate

    kernels = [get_kernel(k.strip()).name for k in a.kernels.split(",") if k.strip()]
    protocol = ScanProtocol(dose=a.dose, views=a.views)
    outdir = Path(a.outdir)
    stem = Path(a.input).name.split(".")[0]
    thick = "" if a.thickness is None else f"_{a.thickness:g}mm"
    outputs = {k: outdir / f"{stem}_{k}{thick}{a.format}" for k in kernels}
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir} exists and is not a folder")
    for path in outputs.values():
        check_not_input(path, [a.input])
    created = [d for d in (outdir, *outdir.parents) if not d.exists()][::-1]  # made by this run, outermost first
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        with contextlib.ExitStack() as locks:
            for path in outputs.values():
                check_output_path(path, overwrite=a.overwrite, inputs=[a.input])
                locks.enter_context(output_lock(path))
            volume = read_volume(a.input, series_uid=a.series_uid)
            t0 = time.perf_counter()
            with tqdm(total=volume.hu.shape[0], unit="slice", desc="simulate", disable=a.quiet) as bar:
                result = simulate(volume, kernels, protocol=protocol, thickness_mm=a.thickness, seed=a.seed,
                                  workers=a.workers, progress=lambda done, total: bar.update(done - bar.n))
            for k, path in outputs.items():
                write_volume(result.volumes[k], path, overwrite=a.overwrite)
                written.append(path)
    except BaseException:  # leave nothing: not the outputs of this run, nor the folders it created
        for path in written:
            path.unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise
    if not a.quiet:
        print(f"wrote {', '.join(str(p) for p in outputs.values())} in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_build_dataset(a: argparse.Namespace) -> int:
    from .datasets import pair_from_dicom, pair_from_files, pairs_from_simulation, write_dataset

    src_k, tgt_k = _two(a.kernels, "--kernels")
    dcm_s, dcm_t = _two(a.dicom_kernels or a.kernels, "--dicom-kernels")
    doses = [limits.check_float("--doses", d, limits.DOSE) for d in a.doses.split(",")]
    sources = [*a.simulate, *a.dicom_pair, *(p for spec in a.file_pair for p in spec.split("=", 1))]
    check_output_path(a.outdir, overwrite=a.overwrite, is_dir=True, inputs=sources)
    with output_lock(a.outdir):  # a second run on the same output is refused here
        pairs = []
        for folder in a.dicom_pair:
            pairs.append(pair_from_dicom(folder, dcm_s, dcm_t))
            print(f"paired {folder}: {pairs[-1].source.hu.shape[0]} slices")
        for spec in a.file_pair:
            if "=" not in spec:
                raise InputError(f"--file-pair expects SRC=TGT, got {spec!r}")
            s_path, t_path = spec.split("=", 1)
            pairs.append(pair_from_files(s_path, t_path, src_k, tgt_k, assume_same_grid=a.assume_same_grid))
        sims = [(read_volume(p), Path(p).name.split(".")[0]) for p in a.simulate]
        shape = tuple(int(v) for v in a.phantom_shape.split(","))
        if a.phantoms:
            from .phantom import chest_phantom_volume

            sims += [(chest_phantom_volume(shape, seed=i), f"phantom-{i}") for i in range(a.phantoms)]
        for vol, patient in sims:
            t0 = time.perf_counter()
            pairs += pairs_from_simulation(vol, patient, src_k, tgt_k, doses=doses, thickness_mm=a.thickness,
                                           views=a.views, seed=a.seed, workers=a.workers)
            print(f"simulated {patient}: {len(doses)} dose(s), {vol.hu.shape[0]} slices, {time.perf_counter() - t0:.0f} s")
        out = write_dataset(pairs, a.outdir, val=a.val, test=a.test, seed=a.seed, overwrite=a.overwrite)
        print(f"wrote {out}: {len(pairs)} pairs")
        return 0


def _two(spec: str, flag: str) -> tuple[str, str]:
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise InputError(f"{flag} expects SOURCE,TARGET, got {spec!r}")
    return parts[0], parts[1]


def _cmd_info(a: argparse.Namespace) -> int:
    path, expected = resolve_model(a.model)
    meta = read_metadata(path)
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise ModelFileError(f"{path}: checksum mismatch — the registry expects SHA-256 {expected} but the file has "
                             f"{digest}; the file is damaged or was modified. Reinstall LTDiffPP.")
    status = verify_model_file(path, meta, file_sha256=digest, registered_sha256=expected)
    if a.json:
        print(json.dumps({"path": str(path), "sha256": digest, "checksum": status, "metadata": meta}, indent=2, sort_keys=True))
        return 0
    cfg = meta["config"]
    print(f"file           {path}")
    print(f"sha256         {digest} ({status})")
    print(f"name           {meta.get('name', '')}")
    print(f"description    {meta.get('description', '')}")
    if meta.get("kernels"):
        print(f"kernels        any two of {', '.join(meta['kernels'])} (kernel-conditioned: one model for every pair)")
    else:
        print(f"kernels        {meta['source_kernel']} -> {meta['target_kernel']}")
    print(f"HU             input = (clip(HU, {meta['hu']['min']}, {meta['hu']['max']}) - {meta['hu']['center']}) / {meta['hu']['scale']}")
    arch = ModelConfig.from_dict(cfg)
    if arch.has_diffusion:
        print(f"sampling       {meta['sampling']['solver']}, {meta['sampling']['steps']} steps, {cfg['prediction']}-prediction, {cfg['schedule']} schedule")
    else:
        print("sampling       none (direct translation)")
    print(f"architecture   {_architecture(arch)}")
    if arch.kernel_conditioned:
        from .modelcard import prior_regularization

        floor, cap = prior_regularization(meta).values()
        print(f"kernel prior   each pair's library gain W_target / W_source (W_source floored at {floor:g} x its peak, "
              f"{'no cap' if cap is None else f'G <= {cap:g}'}); the denoiser is conditioned on the pair")
    elif arch.kernel_prior:
        prior = meta["kernel_prior"]
        gain = prior["gain"]
        step = prior["frequency_step_per_mm"]
        at = ", ".join(f"{gain[min(len(gain) - 1, round(f / step))]:.2f} at {f} mm^-1" for f in (0.25, 0.5, 0.7))
        print(f"kernel prior   radial gain {at}; fitted on {prior.get('fitted_on', 'unknown data')}")
    print(f"weights        {meta.get('weights_dtype', 'float32')}")
    print(f"training       {json.dumps(meta.get('training', {}), sort_keys=True)}")
    return 0


def _architecture(cfg: ModelConfig) -> str:
    """One line on what a model is: its variant and the sizes of its parts."""
    widths = list(cfg.ae_widths)
    front = {"ltdiff++": f"UNet++ autoencoder {widths}", "unet++": f"UNet++ autoencoder {widths}",
             "single-scale-ldm": f"plain U-Net autoencoder {widths}", "pixel-ddpm": "pixel-unshuffle"}[cfg.variant]
    back = f"denoiser {list(cfg.den_widths)}" if cfg.has_diffusion else "no denoiser (direct translation)"
    return f"{cfg.variant}: {front} -> {cfg.latent_channels} ch at 1/{cfg.patch}; {back}"


def _cmd_models(a: argparse.Namespace) -> int:
    entries, default = registry()
    if not entries:
        print("no models are shipped yet; pass a model file with --model PATH")
    for e in entries:
        mark = "*" if e.name == default else " "
        pair = f"any two of {', '.join(e.kernels)}" if e.kernels else f"{e.source_kernel} -> {e.target_kernel}"
        print(f"{mark} {e.name:24s} {pair}  {e.file}  {e.description}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(a.out))
    return 0


# ------------------------------------------------------------------------- evaluate
# the parser lives here so that building it does not import pandas and PyRadiomics (~0.6 s per command)


def _candidate(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    if not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with both parts, got {text!r}")
    return name.strip(), path.strip()


def _bounded(check: Callable, bounds: tuple, what: str, name: str) -> Callable[[str], float]:
    """An argparse type: ``check("the value", text, bounds)`` (a :mod:`LTDiffPPLib.limits` check), its
    failure a one-line usage error naming ``what`` was expected; ``name`` is what argparse calls the type."""
    def parse(text: str) -> float:
        try:
            return check("the value", text, bounds)
        except InputError:
            lo, hi = (f"{b:g}" if isinstance(b, float) else str(b) for b in bounds)
            raise argparse.ArgumentTypeError(f"expected {what} from {lo} to {hi}, got {text!r}") from None
    parse.__name__ = name
    return parse


def _int_in(bounds: tuple[int, int]) -> Callable[[str], int]:
    """An argparse type: a whole number within ``bounds`` (inclusive), else a one-line usage error."""
    return _bounded(limits.check_int, bounds, "a whole number", "integer")


def _float_in(bounds: tuple[float, float]) -> Callable[[str], float]:
    """An argparse type: a finite number within ``bounds`` (inclusive), else a one-line usage error."""
    return _bounded(limits.check_float, bounds, "a number", "number")


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate`` on an argparse subparsers object; its ``func`` returns an exit code."""
    e = subparsers.add_parser(
        "evaluate", help="radiomic concordance (Lin's CCC) of converted images against a reference kernel",
        description="Compare candidate images with a real target-kernel reference on ROIs at identical "
                    "coordinates: PyRadiomics + GOH features, Lin's CCC per feature and class, HU bias, noise, "
                    "NPS, PSNR, SSIM. Writes results.json, CSV tables, table.md and PNG plots into --out.")
    e.add_argument("--reference", required=True, help="real target-kernel image (file or DICOM folder)")
    e.add_argument("--candidate", required=True, action="append", type=_candidate, metavar="NAME=PATH",
                   help="an image to evaluate, on the reference's grid (repeat for several)")
    e.add_argument("--source", help="unconverted source-kernel image: adds the Fourier-ratio and ComBat baselines")
    e.add_argument("--mask", metavar="LABELMAP",
                   help="label map (one ROI per label) instead of square ROIs; 'body' for the whole body")
    e.add_argument("--rois", type=_int_in(limits.ROIS), default=200, help="square ROIs, stratified over 4 HU ranges (default 200)")
    e.add_argument("--roi-size", type=_int_in(limits.ROI_SIZE), default=32, help="square ROI side in pixels (default 32)")
    e.add_argument("--seed", type=_int_in(limits.SEED), default=0, help="seed of the ROI sampler (default 0)")
    e.add_argument("--workers", type=_int_in(limits.WORKERS), default=2, help="feature-extraction processes (default 2)")
    e.add_argument("--out", required=True, help="output folder (written atomically)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=_cmd_evaluate)
    return e


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .evaluation import evaluate

    names = [n for n, _ in a.candidate]
    if len(set(names)) != len(names):
        raise InputError(f"--candidate names must be unique, got {names}")
    inputs = [a.reference, *(p for _, p in a.candidate), a.source, None if a.mask == "body" else a.mask]
    check_output_path(a.out, overwrite=a.overwrite, is_dir=True, inputs=inputs)
    with output_lock(a.out):  # a second run on the same output is refused here
        bar = tqdm(total=0, unit="ROI", desc="features", file=sys.stderr, disable=not sys.stderr.isatty())

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = evaluate(a.reference, dict(a.candidate), source=a.source, mask=a.mask, rois=a.rois,
                              roi_size=a.roi_size, seed=a.seed, out_dir=a.out, workers=a.workers, overwrite=a.overwrite,
                              progress=progress)
        finally:
            bar.close()
        print(result.tables_markdown)
        print(f"wrote {result.out_dir} (results.json, table.md, CSV tables, PNG plots; "
              f"{result.results['timing_s']['total']:.0f} s)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
