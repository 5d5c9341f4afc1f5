"""How the library gain's regularization limits a conversion from a very smooth kernel (B10f → B70f).

    .venv/bin/python bench/prior_regularization.py --dataset ../runs/ds-multi --out DIR [--pair B10f:B70f]
        [--model ltdiffpp-kernel-conditioned] [--rois 200] [--workers 2] [--data ../shared/data/paired_kernels]

The kernel-conditioned model's prior is the library gain G = W_target / W_source of the pair, with W_source
floored at ``floor`` × its peak and G capped at ``max_gain`` (:func:`LTDiffPPLib.kernels.pair_gain`). From B10f
(W = 0.12 at 0.5 mm⁻¹, 0.016 at 0.7) to B70f the cap of 50 binds above 0.56 mm⁻¹. For the pair, on the
multi-kernel dataset's held-out simulated volume (the selection data) and on the real test1 slice (validation),
this converts the source with

- the library gain alone (no network) at (floor 0.05, cap 50) — the model's trained prior —, (0.05, no cap) and
  (0.02, no cap);
- the kernel-conditioned model ``--model`` with its prior capped at 50 (as trained) and uncapped;

and scores each against the target image (``LTDiffPPLib.evaluation.evaluate``: the same ROIs for every method,
PyRadiomics features, CCC). Writes DIR/<set>/ (images, evaluation/) and DIR/summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from kernel_pairs import held_out, test1  # noqa: E402

from LTDiffPPLib.baselines import apply_kernel_ratio  # noqa: E402
from LTDiffPPLib.datasets import load_dataset  # noqa: E402
from LTDiffPPLib.evaluation import evaluate  # noqa: E402
from LTDiffPPLib.inference import standardize_volume  # noqa: E402
from LTDiffPPLib.io import CTVolume, write_image  # noqa: E402
from LTDiffPPLib.kernels import get_kernel, pair_gain  # noqa: E402
from LTDiffPPLib.modelfile import load_model  # noqa: E402
from LTDiffPPLib.simulation import store_as_scanner  # noqa: E402

GAINS = {"library gain alone, floor 0.05, cap 50 (the trained prior)": (0.05, 50.0),
         "library gain alone, floor 0.05, no cap": (0.05, None),
         "library gain alone, floor 0.02, no cap": (0.02, None)}
MODELS = {"kernel-conditioned model, prior capped at 50 (as trained)": 50.0,
          "kernel-conditioned model, prior uncapped": None}


def filtered(vol: CTVolume, source: str, target: str, floor: float, max_gain: float | None) -> CTVolume:
    """Each slice filtered by the library gain (:func:`LTDiffPPLib.baselines.apply_kernel_ratio`), stored as a
    scanner stores HU (clipped, rounded)."""
    ks, kt = get_kernel(source), get_kernel(target)
    hu = apply_kernel_ratio(vol.hu, (vol.spacing[1], vol.spacing[0]),
                            lambda f: pair_gain(ks, kt, f, floor=floor, max_gain=max_gain))
    return vol.with_hu(store_as_scanner(hu))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, type=Path, help="multi-kernel dataset (its held-out test volume)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--pair", default="B10f:B70f")
    ap.add_argument("--model", default="ltdiffpp-kernel-conditioned")
    ap.add_argument("--rois", type=int, default=200)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paired_kernels")
    a = ap.parse_args()
    s, t = a.pair.split(":")
    ds = load_dataset(a.dataset)
    model = load_model(a.model)
    trained = dict(model.net.prior_regularization)
    rows = {}
    for label, (src, ref) in (("held-out simulated volume", (held_out(ds, s), held_out(ds, t))),
                              ("real test1", (test1(a.data, s), test1(a.data, t)))):
        folder = a.out / label.replace(" ", "_")
        (folder / "images").mkdir(parents=True, exist_ok=True)
        cands = {"unconverted": write_image(src, folder / "images" / "source.nrrd", overwrite=True)}
        for i, (name, (floor, cap)) in enumerate(GAINS.items()):
            cands[name] = write_image(filtered(src, s, t, floor, cap), folder / "images" / f"gain{i}.nrrd", overwrite=True)
        for i, (name, cap) in enumerate(MODELS.items()):
            model.net.prior_regularization.update(floor=0.05, max_gain=cap)
            out, _ = standardize_volume(src, t, source_kernel=s, model=model, seed=0)
            cands[name] = write_image(out, folder / "images" / f"model{i}.nrrd", overwrite=True)
        model.net.prior_regularization.update(trained)
        ref_path = write_image(ref, folder / "images" / "reference.nrrd", overwrite=True)
        evaluate(ref_path, cands, rois=a.rois, roi_size=32, seed=0, out_dir=folder / "evaluation", workers=a.workers,
                 overwrite=True)
        res = json.loads((folder / "evaluation" / "results.json").read_text())["methods"]
        rows[label] = {n: (m["summary"]["all"]["all"]["mean"], min(v["mean"] for v in m["summary"]["paper"].values()))
                       for n, m in res.items()}
        print(label, {n: round(v[0], 3) for n, v in rows[label].items()}, flush=True)
    sets = list(rows)
    lines = [f"{s}→{t}, model {model.metadata.get('name')} (sha256 {model.sha256[:12]}…): mean CCC (worst class)", "",
             "| method | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for name in rows[sets[0]]:
        lines.append(f"| {name} | " + " | ".join(f"{rows[k][name][0]:.3f} ({rows[k][name][1]:.3f})" for k in sets) + " |")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
