"""All ordered pairs of the real test1 kernels (B10f, B30f, B50f, B70f): CCC of radiomic features.

    .venv/bin/python bench/kernel_pairs.py --dataset ../runs/ds-multi --out DIR
        [--model ltdiffpp-kernel-conditioned] [--pairs B10f:B70f,...] [--steps 4] [--seed 0]
        [--rois 200] [--workers 2] [--data ../shared/data/paired_kernels] [--held-out]

For each pair (source S, target T) the real test1 slice reconstructed with S is converted to T and compared
with the real T slice by ``LTDiffPPLib.evaluation.evaluate`` (the same 200 ROIs of 32 px for every method
of a pair, PyRadiomics features, CCC per feature and per paper class), beside:

- the unconverted S slice;
- the Fourier kernel-ratio filter fitted *out of patient*, on the training split of the multi-kernel
  dataset ``--dataset`` for that pair (``kernel_ratio_from_dataset``), the physics baseline;
- the peer CNN's output (Choe et al. 2019, trained on real pairs) where the shared data has it
  (B10f→B70f, B30f→B50f, B50f→B30f);
- the shipped per-pair LTDiff++ model where one exists (B30f→B70f, B30f→B50f, B70f→B30f);
- the kernel-conditioned model ``--model`` (through ``standardize_volume``, source kernel given: the test
  images carry no header).

test1_B10.mha and test1_B70.mha lost their pixel spacing (they say 1.0 mm); their pixels are put on
test1_B30's grid (the four are one reconstruction grid). ``--held-out``: instead of test1, the dataset's
held-out test volume (simulated, the Siemens Br38f patient) with S as source and T as reference (no peer
output exists for it). Writes DIR/<S>-<T>/ (images, evaluation/) and
DIR/summary.md + DIR/summary.json: per pair and method the mean CCC, the fraction of features with
CCC ≥ 0.85 and the mean per class.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LTDiffPPLib.baselines import apply_kernel_ratio, kernel_ratio_from_dataset
from LTDiffPPLib.datasets import load_dataset
from LTDiffPPLib.evaluation import evaluate
from LTDiffPPLib.guard import ANY_KERNEL, registered_pairs
from LTDiffPPLib.inference import standardize_volume
from LTDiffPPLib.io import CTVolume, read_volume, write_image
from LTDiffPPLib.kernels import ordered_pairs
from LTDiffPPLib.modelcard import registry
from LTDiffPPLib.modelfile import load_model

KERNELS = ("B10f", "B30f", "B50f", "B70f")
PEER = {("B10f", "B70f"): "test1_B70_fromB10.mha", ("B30f", "B50f"): "test1_B50_G_fromB30.mha",
        ("B50f", "B30f"): "test1_B30_G_fromB50.mha"}
UNCONVERTED, FILTER, PEER_NAME, PER_PAIR, CONDITIONED = (
    "unconverted", "Fourier ratio fitted out of patient", "peer CNN (Choe 2019)", "LTDiff++ per-pair model",
    "LTDiff++ kernel-conditioned")


def test1(data: Path, kernel: str) -> CTVolume:
    """The real test1 slice of ``kernel`` on test1_B30's grid (B10 and B70 lost their spacing)."""
    grid = read_volume(data / "test1_B30.mha")
    vol = read_volume(data / f"test1_{kernel[:3]}.mha")
    if vol.hu.size != grid.hu.size:
        raise SystemExit(f"test1_{kernel[:3]}.mha has {vol.hu.shape}, test1_B30.mha {grid.hu.shape}")
    return grid.with_hu(vol.hu.reshape(grid.hu.shape).astype("float32"))


def held_out(ds, kernel: str) -> CTVolume:
    """The ``kernel`` image of the dataset's (one) test-split scan, with its geometry."""
    (entry,) = ds.subset("test")
    return CTVolume(hu=np.asarray(ds.image(entry, kernel), np.float32), spacing=tuple(entry["spacing_mm"]),
                    origin=tuple(entry["origin_mm"]), direction=tuple(entry["direction"]), source=f"{entry['id']} {kernel}")


def per_pair_models() -> dict[tuple[str, str], str]:
    """The registered models of one fixed pair."""
    fixed = {e.name for e in registry()[0] if e.source_kernel != ANY_KERNEL}
    return {(s, t): name for name, s, t in registered_pairs() if name in fixed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, type=Path, help="multi-kernel dataset (the filter is fitted on its train split)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="ltdiffpp-kernel-conditioned", help="kernel-conditioned model (name or file)")
    ap.add_argument("--pairs", default=None, help="S:T,S:T,... (default: all 12)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rois", type=int, default=200)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paired_kernels")
    ap.add_argument("--held-out", action="store_true", help="the dataset's test volume instead of test1")
    a = ap.parse_args()
    pairs = ([tuple(p.split(":")) for p in a.pairs.split(",")] if a.pairs else ordered_pairs(KERNELS))
    ds = load_dataset(a.dataset)
    model = load_model(a.model)
    fixed = per_pair_models()
    a.out.mkdir(parents=True, exist_ok=True)
    from dataclasses import replace

    warm = test1(a.data, "B30f")  # warm-up of both kinds of model: the timings below are the conversions'
    warm = replace(warm, hu=warm.hu[:, 192:320, 192:320])
    standardize_volume(warm, "B70f", source_kernel="B30f", model=model, steps=1)
    for (s, t), name in fixed.items():
        standardize_volume(warm, t, source_kernel=s, model=name, steps=1, force=True)
        break
    summary: dict[str, dict] = json.loads((a.out / "summary.json").read_text()) if (a.out / "summary.json").exists() else {}
    for s, t in pairs:
        key = f"{s}-{t}"
        if key in summary:
            print(f"{key}: done already", flush=True)
            continue
        t0 = time.perf_counter()
        folder = a.out / key
        (folder / "images").mkdir(parents=True, exist_ok=True)
        src, ref = (held_out(ds, s), held_out(ds, t)) if a.held_out else (test1(a.data, s), test1(a.data, t))
        ref_path = write_image(ref, folder / "images" / f"reference_{t}.nrrd", overwrite=True)
        cands = {UNCONVERTED: write_image(src, folder / "images" / f"source_{s}.nrrd", overwrite=True)}
        ratio, _ = kernel_ratio_from_dataset(ds, "train", (s, t))
        filtered = src.with_hu(apply_kernel_ratio(src.hu, (src.spacing[1], src.spacing[0]), ratio))
        cands[FILTER] = write_image(filtered, folder / "images" / "filter_out_of_patient.nrrd", overwrite=True)
        if not a.held_out and (s, t) in PEER and (a.data / PEER[(s, t)]).is_file():
            peer = ref.with_hu(read_volume(a.data / PEER[(s, t)]).hu.reshape(ref.hu.shape).astype("float32"))
            cands[PEER_NAME] = write_image(peer, folder / "images" / "peer.nrrd", overwrite=True)
        seconds = {}
        if (s, t) in fixed:
            c0 = time.perf_counter()
            out, _ = standardize_volume(src, t, source_kernel=s, model=fixed[(s, t)], steps=a.steps, seed=a.seed)
            seconds[PER_PAIR] = time.perf_counter() - c0
            cands[PER_PAIR] = write_image(out, folder / "images" / "per_pair.nrrd", overwrite=True)
        c0 = time.perf_counter()
        out, _ = standardize_volume(src, t, source_kernel=s, model=model, steps=a.steps, seed=a.seed)
        seconds[CONDITIONED] = time.perf_counter() - c0
        cands[CONDITIONED] = write_image(out, folder / "images" / "conditioned.nrrd", overwrite=True)
        evaluate(ref_path, cands, rois=a.rois, roi_size=32, seed=0, out_dir=folder / "evaluation",
                 workers=a.workers, overwrite=True)
        res = json.loads((folder / "evaluation" / "results.json").read_text())
        summary[key] = {"source": s, "target": t, "seconds_per_slice": seconds, "methods": {
            name: {"mean": m["summary"]["all"]["all"]["mean"], "frac_ge_085": m["summary"]["all"]["all"]["frac_ge"],
                   "classes": {c: v["mean"] for c, v in m["summary"]["paper"].items()}}
            for name, m in res["methods"].items()}}
        (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"{key}: " + ", ".join(f"{n} {v['mean']:.3f}" for n, v in summary[key]["methods"].items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    (a.out / "summary.md").write_text(markdown(summary, model))
    print(markdown(summary, model))
    return 0


def markdown(summary: dict, model) -> str:
    methods = [UNCONVERTED, FILTER, PEER_NAME, PER_PAIR, CONDITIONED]
    head = ("| pair | " + " | ".join(methods) + " | conditioned: worst class | CCC ≥ 0.85 (conditioned) |\n"
            + "|---" * (len(methods) + 3) + "|\n")
    rows = []
    for key, r in summary.items():
        m = r["methods"]
        cells = [f"{m[n]['mean']:.3f}" if n in m else "–" for n in methods]
        best_other = max((m[n]["mean"] for n in (FILTER, PEER_NAME, PER_PAIR) if n in m), default=0.0)
        if CONDITIONED in m and m[CONDITIONED]["mean"] >= best_other:
            cells[-1] = f"**{cells[-1]}**"
        c = m.get(CONDITIONED, {})
        worst = min(c.get("classes", {}).items(), key=lambda kv: kv[1], default=("–", float("nan")))
        rows.append(f"| {r['source']}→{r['target']} | " + " | ".join(cells)
                    + f" | {worst[0]} {worst[1]:.3f} | {c.get('frac_ge_085', float('nan')):.2f} |")
    return (f"model {model.metadata.get('name')} (sha256 {model.sha256[:12]}…)\n\n" + head + "\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
