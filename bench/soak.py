"""Soak run: many conversions in one process, good and bad inputs mixed; memory, file handles and
temporaries must stay flat, every good output valid, every bad one refused cleanly.

    nice -n 19 .venv/bin/python bench/soak.py [--volumes 100] [--shape 4,64,64] [--steps 2] [--format .nrrd]
                                              [--mix] [--model PATH] [--json OUT.json]

Each good iteration does what a batch user does through the library API: write a phantom volume as an
input file, check and lock the output (``check_output_path``, ``output_lock``), read the input
(``read_volume``), ``standardize`` it with one loaded model, write the result atomically
(``write_volume``), read the output back and check it (shape, geometry, finite HU within the model's
range). With ``--mix`` every other iteration is a bad case instead, in turn: the output is the input,
a truncated DICOM slice, an empty file, NaN voxels, padding without PixelPaddingValue, a ``.png``
output, a model file with a flipped weight byte. A bad case must raise an ``LTDiffPPError`` and leave
the folder as it was (no output, no temporary, the input byte-identical).

After every iteration: resident memory (VmRSS), the number of open file descriptors, and the hidden
entries left in the work folder (temporaries, lock files) are recorded. The summary compares the
warm-up (the first 10 %, and with --mix at least one round of every bad case) with the rest. Without --model, a randomly initialised model of a small architecture is
used (memory and I/O behaviour do not depend on weights). Exits 1 when an output is invalid, a bad case
is not refused cleanly, memory grows by more than --max-growth-mib or file descriptors grow after
warm-up, or a temporary is left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from LTDiffPPLib import io  # noqa: E402
from LTDiffPPLib.errors import LTDiffPPError  # noqa: E402
from LTDiffPPLib.inference import standardize  # noqa: E402
from LTDiffPPLib.io import output_lock  # noqa: E402
from LTDiffPPLib.io.atomic import _remove  # noqa: E402
from LTDiffPPLib.modelfile import LoadedModel, init_model, load_model  # noqa: E402
from LTDiffPPLib.models import ModelConfig  # noqa: E402
from LTDiffPPLib.phantom import qa_phantom  # noqa: E402

SMALL = ModelConfig(patch=2, ae_widths=(8, 16, 16), latent_channels=4, den_widths=(8, 16), den_blocks=1,
                    time_dim=16, groups=4)
IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def convert(src: Path, out: Path, model: LoadedModel | str | Path, steps: int, seed: int) -> io.CTVolume:
    """One conversion as the CLI does it, through the library API: check and lock the output, read,
    standardize, write atomically."""
    check = {"overwrite": False, "is_dir": not io.output_is_image(out), "inputs": [src]}
    io.check_output_path(out, **check)
    with output_lock(out):
        io.check_output_path(out, **check)
        model = model if isinstance(model, LoadedModel) else load_model(model)
        v = io.read_volume(src)
        hu = standardize(v.hu, v.spacing, model, device="cpu", steps=steps, seed=seed)
        io.write_volume(v.with_hu(hu), out, convolution_kernel="B70f", provenance={"model_sha256": model.sha256})
        return v


def _phantom(shape: tuple[int, int, int], i: int) -> io.CTVolume:
    return io.CTVolume(hu=qa_phantom(shape, spacing_mm=0.7 * 512 / shape[2], seed=i), spacing=(0.7, 0.7, 2.5),
                       origin=(-20.0, 10.0, 5.0 * i), direction=IDENTITY)


def _bad_cases(work: Path, shape: tuple[int, int, int], model_path: Path) -> list[tuple[str, Callable[[int], tuple[Path, Path, object]]]]:
    """Bad cases: each makes (input, output, model) in ``work`` for iteration i; converting must be refused."""
    def same_output(i: int):
        src = io.write_image(_phantom(shape, i), work / f"bad{i:03d}.nrrd")
        return src, src, None

    def truncated_dicom(i: int):
        src = io.write_dicom_series(_phantom((2, *shape[1:]), i), work / f"bad{i:03d}", series_description="soak",
                                    convolution_kernel="B30f")
        last = sorted(src.iterdir())[-1]
        last.write_bytes(last.read_bytes()[:-100])
        return src, work / f"out{i:03d}.nrrd", None

    def empty_file(i: int):
        src = work / f"bad{i:03d}.mha"
        src.touch()
        return src, work / f"out{i:03d}.nrrd", None

    def nan_voxels(i: int):
        v = _phantom(shape, i)
        hu = v.hu.copy()
        hu[0, 0, 0] = np.nan
        import SimpleITK as sitk

        src = work / f"bad{i:03d}.nrrd"
        image = sitk.GetImageFromArray(hu)
        sitk.WriteImage(image, str(src))
        return src, work / f"out{i:03d}.nrrd", None

    def padding_without_tag(i: int):
        src = io.write_dicom_series(_phantom((2, *shape[1:]), i), work / f"bad{i:03d}", series_description="soak",
                                    convolution_kernel="B30f")
        for f in src.iterdir():
            ds = pydicom.dcmread(f)
            raw = (ds.pixel_array.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
            raw[0, :] = 63536
            ds.PixelRepresentation, ds.RescaleIntercept, ds.PixelData = 0, "-1024", raw.astype("<u2").tobytes()
            ds.save_as(f)
        return src, work / f"out{i:03d}.nrrd", None

    def png_output(i: int):
        src = io.write_image(_phantom(shape, i), work / f"bad{i:03d}.nrrd")
        return src, work / f"out{i:03d}.png", None

    def damaged_model(i: int):
        src = io.write_image(_phantom(shape, i), work / f"bad{i:03d}.nrrd")
        bad = work / f"bad{i:03d}.safetensors"
        data = bytearray(model_path.read_bytes())
        data[-(i % 97) - 5] ^= 0x10
        bad.write_bytes(bytes(data))
        return src, work / f"out{i:03d}.nrrd", bad

    return [("output is the input", same_output), ("truncated DICOM slice", truncated_dicom),
            ("empty file", empty_file), ("NaN voxels", nan_voxels), ("padding without PixelPaddingValue", padding_without_tag),
            (".png output", png_output), ("damaged model file", damaged_model)]


def _snapshot(work: Path) -> dict[str, str]:
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(work.rglob("*"))}


def run_soak(work: Path, *, volumes: int = 100, shape: tuple[int, int, int] = (4, 64, 64), steps: int = 2,
             fmt: str = ".nrrd", mix: bool = False, model_path: Path | None = None) -> dict:
    """Run the soak in folder ``work`` (emptied as it goes); the record (see the module docstring)."""
    if model_path is None:
        model_path = work / "soak.safetensors"
        init_model(model_path, SMALL, seed=0, name="soak")
    model = load_model(model_path)
    hu_range = (model.metadata["hu"]["min"], model.metadata["hu"]["max"])
    suffix = "" if fmt == "dicom" else fmt
    bad_cases = _bad_cases(work, shape, model_path)
    rss, fds, times, invalid, not_refused, leftovers, outcomes = [], [], [], [], [], [], {}
    t_start = time.perf_counter()
    for i in range(volumes):
        t0 = time.perf_counter()
        if mix and i % 2 == 1:
            name, make = bad_cases[(i // 2) % len(bad_cases)]
            src, out, bad_model = make(i)
            before = _snapshot(work)
            try:
                convert(src, out, bad_model or model, steps, i)
                not_refused.append((i, name, "converted"))
            except LTDiffPPError as exc:
                outcomes.setdefault(name, str(exc).replace(str(work), "WORK"))
                if "\n" in str(exc) or _snapshot(work) != before:
                    not_refused.append((i, name, "multi-line message or the folder changed"))
            _remove(src)
            if bad_model is not None:
                _remove(bad_model)
        else:
            src = io.write_volume(_phantom(shape, i), work / f"in{i:03d}{suffix}", convolution_kernel="B30f")
            out = work / f"out{i:03d}{suffix}"
            v = convert(src, out, model, steps, i)
            back = io.read_volume(out)
            ok = (back.hu.shape == shape and np.isfinite(back.hu).all()
                  and hu_range[0] - 0.5 <= back.hu.min() and back.hu.max() <= hu_range[1] + 0.5
                  and np.allclose(back.origin, v.origin, atol=1e-4) and np.allclose(back.spacing, v.spacing, atol=1e-4))
            if not ok:
                invalid.append(i)
            _remove(src)  # keep the disk footprint constant
            _remove(out)
        hidden = [p.name for p in work.iterdir() if p.name.startswith(".")]
        if hidden:
            leftovers.append((i, hidden))
        times.append(time.perf_counter() - t0)
        rss.append(rss_mib())
        fds.append(open_fds())
    total = time.perf_counter() - t_start
    warm = min(volumes, max(1, volumes // 10, 2 * len(bad_cases) if mix else 1))  # every path taken once
    tail = np.array(rss[warm:]) if volumes > warm else np.array(rss)
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) if len(tail) > 1 else 0.0
    return {
        "volumes": volumes, "good": sum(1 for i in range(volumes) if not (mix and i % 2 == 1)),
        "bad": sum(1 for i in range(volumes) if mix and i % 2 == 1), "shape": shape, "steps": steps, "format": fmt,
        "invalid_outputs": invalid, "not_refused_cleanly": not_refused, "leftover_hidden_entries": leftovers,
        "bad_case_messages": outcomes,
        "rss_mib": {"after_first": rss[0], "after_warmup": rss[warm - 1], "last": rss[-1], "max": max(rss),
                    "growth_after_warmup": float(tail.max() - tail[0]), "slope_kib_per_volume": slope * 1024},
        "open_fds": {"after_first": fds[0], "after_warmup": fds[warm - 1], "last": fds[-1], "max": max(fds),
                     "growth_after_warmup": max(fds[warm - 1:]) - fds[warm - 1]},
        "seconds": {"total": total, "per_volume_median": float(np.median(times))},
        "rss_per_volume_mib": rss, "open_fds_per_volume": fds, "seconds_per_volume": times,
    }


def verdict(summary: dict, max_growth_mib: float) -> list[str]:
    """What is wrong with a soak record (empty: it passed)."""
    problems = []
    if summary["rss_mib"]["growth_after_warmup"] > max_growth_mib:
        problems.append(f"memory grew {summary['rss_mib']['growth_after_warmup']:.1f} MiB after warm-up")
    if summary["open_fds"]["growth_after_warmup"] > 0:
        problems.append(f"{summary['open_fds']['growth_after_warmup']} file descriptors leaked after warm-up")
    for key in ("invalid_outputs", "not_refused_cleanly", "leftover_hidden_entries"):
        if summary[key]:
            problems.append(f"{key}: {summary[key][:5]}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--shape", default="4,64,64", help="Z,Y,X voxels per volume")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--format", default=".nrrd", help="input/output file type (.nrrd .mha .nii.gz) or 'dicom'")
    ap.add_argument("--mix", action="store_true", help="every other iteration a bad input (see the docstring)")
    ap.add_argument("--model", help="model file (default: a random small model)")
    ap.add_argument("--max-growth-mib", type=float, default=20.0)
    ap.add_argument("--json", help="write the per-iteration record here")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    import torch

    with tempfile.TemporaryDirectory(prefix="ltdiffpp-soak-") as tmp:
        s = run_soak(Path(tmp), volumes=a.volumes, shape=shape, steps=a.steps, fmt=a.format, mix=a.mix,
                     model_path=Path(a.model) if a.model else None)
    s.update({"hardware": f"{io.cpu_name()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "python": platform.python_version()})
    problems = verdict(s, a.max_growth_mib)
    r, f = s["rss_mib"], s["open_fds"]
    print(f"soak: {a.volumes} conversions ({s['good']} good, {s['bad']} bad) {shape}, {a.steps} steps, {a.format}, "
          f"{s['hardware']}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"  RSS MiB: first {r['after_first']:.1f}, after warm-up {r['after_warmup']:.1f}, last {r['last']:.1f}, "
          f"max {r['max']:.1f}; growth after warm-up {r['growth_after_warmup']:.2f} MiB, "
          f"slope {r['slope_kib_per_volume']:.1f} KiB/volume")
    print(f"  open file descriptors: first {f['after_first']}, after warm-up {f['after_warmup']}, last {f['last']}, "
          f"max {f['max']}")
    print(f"  time: {s['seconds']['total']:.1f} s total, {s['seconds']['per_volume_median'] * 1000:.0f} ms/volume median")
    print(f"  good outputs valid: {s['good'] - len(s['invalid_outputs'])}/{s['good']}; bad inputs refused cleanly: "
          f"{s['bad'] - len(s['not_refused_cleanly'])}/{s['bad']}; temporaries left: {len(s['leftover_hidden_entries'])}")
    for name, message in s["bad_case_messages"].items():
        print(f"    {name}: {message[:150]}")
    print("  -> " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1, default=str))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
