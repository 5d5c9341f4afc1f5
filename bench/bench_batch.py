"""Throughput of `ltdiffpp batch` on a small cohort, against one `ltdiffpp standardize` process per series.

Cohort: ``--series`` DICOM series (Siemens B30f headers, int16) of ``--slices`` 512² slices each: the digital
chest phantom (``chest_phantom_volume``, 0.70 mm pixels, 1.0 mm slices) with a different seeded 15 HU noise
field per series, written by the project's own DICOM writer into ``WORKDIR/cohort/patientNN/ct``. Target
B70f with the shipped ``ltdiffpp-b30f-b70f`` model (its default 4 DPM-Solver++ steps).

Modes, each in a fresh process (so that its peak RSS is its own):

- ``batch`` — ``run_batch`` with ``--precision auto`` (bf16 on a CPU with native bf16 for this model);
- ``batch-float32`` — the same in float32;
- ``loop`` / ``loop-bf16`` — what users did before: one ``ltdiffpp standardize`` process per series (model
  loaded each time, no overlap of reading, converting and writing), float32 / bfloat16.

Reports wall time, series/hour, slices/s, peak RSS, for the batch modes the share of worker time in I/O
(reading + writing, from the manifest's per-series timings), and the seconds spent converting and the wall
time that was not converting (process starts, imports, model loading, reading and writing not overlapped):
the latter is what the batch removes, and unlike the totals it barely depends on other load on the machine. Usage::

    nice -n 19 .venv/bin/python bench/bench_batch.py --workdir /tmp/bench-batch [--series 10] [--slices 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_cohort(workdir: Path, series: int, slices: int) -> Path:
    import numpy as np
    from pydicom.dataset import Dataset

    from LTDiffPPLib.io import CTVolume, write_dicom_series
    from LTDiffPPLib.phantom import chest_phantom_volume

    root = workdir / f"cohort-{series}x{slices}"
    if root.is_dir():
        return root
    t0 = time.perf_counter()
    base = chest_phantom_volume((slices, 512, 512), (0.703125, 0.703125, 1.0), seed=0)
    for i in range(series):
        noise = np.random.default_rng(100 + i).standard_normal(base.hu.shape, dtype=np.float32) * 15.0
        header = Dataset()
        header.Manufacturer, header.PatientID, header.Modality = "SIEMENS", f"BENCH{i:02d}", "CT"
        vol = CTVolume(hu=np.clip(np.rint(base.hu + noise), -1024, 3071), spacing=base.spacing, origin=base.origin,
                       direction=base.direction, dicom_header=header)
        folder = root / f"patient{i:02d}" / "ct"
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_dicom_series(vol, folder, series_description=f"bench {i}", convolution_kernel="B30f")
    print(f"made {series} series x {slices} slices in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return root


def worker(mode: str, cohort: Path, out: Path, model: str) -> dict:
    """One mode, in this process; returns its numbers."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    precision = "bfloat16" if mode.endswith("bf16") else "float32"
    if mode.startswith("loop"):
        out.mkdir(parents=True)
        exe = str(Path(sys.executable).parent / "ltdiffpp")
        n, convert = 0, 0.0
        for folder in sorted(cohort.glob("patient*/ct")):
            dest = out / folder.parent.name
            r = subprocess.run([exe, "standardize", str(folder), str(dest), "--target-kernel", "B70f", "--model",
                                model, "--precision", precision], check=True, capture_output=True, text=True)
            # "wrote OUT (8 slices, 19.3 s, ...)": the conversion's own seconds (after reading and model loading)
            convert += float(re.search(r"slices, ([0-9.]+) s,", r.stdout).group(1))
            n += 1
        wall = time.perf_counter() - t0
        slices = sum(len(list(f.iterdir())) for f in cohort.glob("patient*/ct"))
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return {"mode": mode, "series": n, "slices": slices, "wall_s": wall, "peak_rss_mb": rss,
                "precision": [precision], "convert_s": convert, "not_converting_s": wall - convert}
    from LTDiffPPLib.batch import BatchOptions, read_manifest, run_batch

    precision = "float32" if mode == "batch-float32" else "auto"
    res = run_batch(cohort, out, BatchOptions(target_kernel="B70f", model=model, precision=precision, quiet=True))
    wall = time.perf_counter() - t0
    recs = [r for r in read_manifest(out / "manifest.jsonl") if r["status"] == "done"]
    stage = {k: sum(r["timing"].get(k, 0.0) for r in recs) for k in ("read", "plan", "convert", "write", "qc")}
    busy = sum(stage.values())
    return {"mode": mode, "series": res.converted, "slices": res.slices, "wall_s": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "precision": sorted({r["precision"] for r in recs}), "stage_s": stage,
            "io_share": (stage["read"] + stage["write"]) / busy if busy else None,
            "convert_s": stage["convert"], "not_converting_s": wall - stage["convert"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-batch"))
    p.add_argument("--series", type=int, default=10)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--model", default="ltdiffpp-b30f-b70f")
    p.add_argument("--modes", default="batch,batch-float32,loop")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    cohort = make_cohort(a.workdir, a.series, a.slices)
    if a.worker:
        print(json.dumps(worker(a.worker, cohort, a.workdir / f"out-{a.worker}", a.model)))
        return 0
    from LTDiffPPLib.io import cpu_name

    rows = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "--workdir", str(a.workdir), "--series", str(a.series), "--slices",
               str(a.slices), "--model", a.model, "--worker", mode]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\n{cpu_name()}, {os.cpu_count()} cores; {a.series} series x {a.slices} slices of 512², model {a.model}\n")
    print("| mode | precision | wall (s) | series/hour | slices/s | peak RSS (MB) | I/O share of worker time | "
          "converting (s) | wall not converting (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        io = f"{100 * r['io_share']:.1f} %" if r.get("io_share") is not None else "–"
        print(f"| {r['mode']} | {','.join(r['precision'])} | {r['wall_s']:.1f} | {r['series'] / r['wall_s'] * 3600:.0f} | "
              f"{r['slices'] / r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} | {io} | {r['convert_s']:.1f} | "
              f"{r['not_converting_s']:.1f} |")
    (a.workdir / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
