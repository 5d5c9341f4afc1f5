"""CCC against sampling steps and solver: convert one source at each setting, evaluate all, plot.

    .venv/bin/python bench/ccc_vs_steps.py --source SRC --reference REF --out DIR [--model NAME_OR_PATH]
        [--dpmpp 2 4 6 8 12 20 50] [--ddim 4 8 20 50] [--bf16 4] [--seed 0] [--rois 200]
        [--baselines] [--candidate NAME=PATH ...]

For each setting the source is standardized (``LTDiffPPLib.inference.standardize``, the model's other
defaults, ``--seed``, float32; ``--bf16`` adds DPM-Solver++ runs under bfloat16 autocast, the arithmetic
of the CUDA path, so that its CCC can be compared with float32's on any machine) and timed. Every
conversion and the unconverted source then go through one ``ltdiffpp evaluate`` run against the
reference (the same ROIs for all; ``--baselines`` adds the Fourier-ratio filter fitted on this very pair
and ComBat, ``--candidate`` other images such as a peer's output or an out-of-patient filter).

Writes into DIR: the converted images (``images/``), the evaluation report (``evaluation/``:
results.json, tables, plots), the curve ``ccc_vs_steps.png`` and ``summary.md``: one row per setting
with the mean CCC over all features and per paper class, the fraction of features with CCC ≥ 0.85, the
noise SD relative to the reference and the conversion time per slice on this machine. The default
step count of a model is chosen from this.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LTDiffPPLib.evaluation import evaluate
from LTDiffPPLib.inference import standardize
from LTDiffPPLib.io import read_volume, write_image
from LTDiffPPLib.modelfile import load_model

SOLVER_NAMES = {"dpmpp2m": "DPM++(2M)", "ddim": "DDIM"}
PRECISION_NAMES = {"float32": "", "bfloat16": " bf16"}
UNCONVERTED = "source (unconverted)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="source-kernel image or DICOM folder")
    ap.add_argument("--reference", required=True, help="real (or simulated) target-kernel image on the same grid")
    ap.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    ap.add_argument("--model", default=None, help="model name or file (default: the default model)")
    ap.add_argument("--dpmpp", type=int, nargs="*", default=[2, 4, 6, 8, 12, 20, 50],
                    help="DPM-Solver++(2M) step counts")
    ap.add_argument("--ddim", type=int, nargs="*", default=[4, 8, 20, 50], help="DDIM step counts")
    ap.add_argument("--bf16", type=int, nargs="*", default=[], help="DPM-Solver++(2M) step counts in bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rois", type=int, default=200)
    ap.add_argument("--roi-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--baselines", action="store_true", help="add the in-sample Fourier-ratio filter and ComBat rows")
    ap.add_argument("--candidate", action="append", default=[], metavar="NAME=PATH", help="another image to evaluate")
    a = ap.parse_args()
    if a.out.exists():
        ap.error(f"{a.out} exists")

    model = load_model(a.model)
    src = read_volume(a.source)
    images = a.out / "images"
    images.mkdir(parents=True)
    settings = ([("dpmpp2m", s, "float32") for s in a.dpmpp] + [("ddim", s, "float32") for s in a.ddim]
                + [("dpmpp2m", s, "bfloat16") for s in a.bf16])
    candidates: dict[str, Path] = {UNCONVERTED: Path(a.source)}
    for item in a.candidate:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            ap.error(f"--candidate takes NAME=PATH, got {item!r}")
        candidates[name] = Path(path)
    seconds: dict[str, float] = {}
    standardize(src.hu[:1], src.spacing, model, steps=1)  # warm-up: the timings below are the conversions'
    for solver, steps, precision in settings:
        name = f"{SOLVER_NAMES[solver]}{PRECISION_NAMES[precision]} {steps} steps"
        t0 = time.perf_counter()
        hu = standardize(src.hu, src.spacing, model, steps=steps, solver=solver, seed=a.seed, precision=precision)
        seconds[name] = (time.perf_counter() - t0) / src.hu.shape[0]
        candidates[name] = write_image(src.with_hu(hu), images / f"{solver}_{precision}_{steps:02d}.nrrd")
        print(f"{name}: {seconds[name]:.2f} s/slice", flush=True)
    t_eval = time.perf_counter()
    evaluate(a.reference, candidates, source=a.source if a.baselines else None, rois=a.rois,
             roi_size=a.roi_size, seed=0, out_dir=a.out / "evaluation", workers=a.workers,
             baselines=a.baselines)
    t_eval = time.perf_counter() - t_eval
    results = json.loads((a.out / "evaluation" / "results.json").read_text())

    from plot_ccc_vs_steps import plot

    plot(results["methods"], a.out / "ccc_vs_steps.png")
    classes = _classes(results)
    rows = ["| setting | all features | " + " | ".join(classes) + " | CCC ≥ 0.85 | noise SD / ref | s/slice |",
            "|---" * (len(classes) + 5) + "|"]
    for name, m in results["methods"].items():
        summ, every = m["summary"], m["summary"]["all"]["all"]
        cls = " | ".join(f"{summ['paper'][c]['mean']:.3f}" for c in classes)
        sd = (m.get("image") or {}).get("noise_sd_ratio")
        sd_text = "–" if sd is None else f"{sd:.2f}"
        time_text = f"{seconds[name]:.2f}" if name in seconds else "–"
        rows.append(f"| {name} | {every['mean']:.3f} | {cls} | {every['frac_ge']:.3f} | {sd_text} | {time_text} |")
    header = (f"model {model.metadata.get('name')} (sha256 {model.sha256[:12]}…), seed {a.seed}, {a.rois} ROIs of "
              f"{a.roi_size} px; source {a.source}; reference {a.reference}; {t_eval:.0f} s of evaluation\n\n")
    (a.out / "summary.md").write_text(header + "\n".join(rows) + "\n")
    print(header + "\n".join(rows))
    return 0


def _classes(results: dict) -> list[str]:
    first = next(iter(results["methods"].values()))
    return list(first["summary"]["paper"])


if __name__ == "__main__":
    sys.exit(main())
