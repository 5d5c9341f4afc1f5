"""Benchmark: ``standardize`` per 512² slice (time per phase, FLOPs, achieved GFLOP/s) and CPU options.

    .venv/bin/python bench/bench_standardize.py [--model PATH | --config Training/configs/default.json]
        [--slices 8] [--steps N] [--batch-size B] [--device auto] [--json OUT.json]
    .venv/bin/python bench/bench_standardize.py --sweep [--model PATH] [--slices 8]   # CPU options, see below

Without ``--model``, a randomly initialised model of the architecture in ``--config``'s ``"model"`` is
timed (speed does not depend on the weights; steps default to the config's ``"sampling"``); with
``--model``, that model file (its metadata's steps and solver). Prints JSON and a Markdown table row for
BENCHMARKS.md with the hardware it ran on.

Also measured:

* FLOPs per slice of the encoder, one denoiser step and the decoder (``torch.utils.flop_counter``,
  multiply-add = 2 FLOPs) and the achieved GFLOP/s of the whole run;
* the practical peak of this device in the arithmetic ``standardize`` uses there: the best GFLOP/s of a
  4096² × 4096² float32 ``torch.matmul`` on the CPU, of an 8192² bf16 one on CUDA (where ``standardize``
  runs under bf16 autocast), and the fraction of it each phase reaches (``sample`` is the denoiser);
  on the CPU also the nominal peak (cores × FLOP/cycle × clock from /proc/cpuinfo; 32 FLOP/cycle for
  two 256-bit FMA pipes, i.e. AVX2+FMA; 64 with AVX-512).

``--sweep`` times the same volume under each CPU option (batch size, threads, oneDNN on/off,
channels_last, no_grad instead of inference_mode) and reports, for each, s/slice and the largest
difference from the reference output (default settings) in HU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from LTDiffPPLib import inference
from LTDiffPPLib.inference import default_batch_size, pick_device, standardize
from LTDiffPPLib.io import cpu_name
from LTDiffPPLib.modelfile import LoadedModel, init_model, load_model
from LTDiffPPLib.phantom import qa_phantom

DEFAULT_CONFIG = ROOT / "Training" / "configs" / "default.json"


# ------------------------------------------------------------------------------ shared with bench_volume


def get_model(model: str | None, config: str | os.PathLike = DEFAULT_CONFIG) -> tuple[LoadedModel, str]:
    """(loaded model, description): the model file, or random weights of the config's architecture.

    A random model gets the config's ``"sampling"`` defaults written into its metadata, so that
    ``standardize`` with ``steps=None`` runs the shipped default steps either way.
    """
    if model:
        m = load_model(model)
        return m, f"model file {model} (sha256 {m.sha256[:12]}…)"
    cfg = json.loads(Path(config).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.safetensors"
        init_model(path, cfg["model"], seed=0)
        m = load_model(path)
    if "sampling" in cfg:
        m.metadata["sampling"] = dict(cfg["sampling"])
    return m, f"random weights, architecture of {Path(config).relative_to(ROOT) if Path(config).is_relative_to(ROOT) else config}"


def flops_per_slice(net: torch.nn.Module, size: int = 512) -> dict[str, float]:
    """GFLOP of one size² slice through the encoder, one denoiser step, and the decoder (FlopCounterMode)."""
    dev = next(net.parameters()).device
    x = torch.zeros(1, 1, size, size, device=dev)
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            z = net.encode(x)
        out["encode"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            net.predict(z, torch.full((1,), 0.5, device=dev), z)
        out["denoise_step"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            net.decode(z)
        out["decode"] = fc.get_total_flops() / 1e9
    return out


def hardware(dev: torch.device) -> str:
    desc = f"{cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
    if dev.type == "cuda":
        desc += f"; GPU {torch.cuda.get_device_name(dev)}"
    return desc


def software() -> str:
    return f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dev: torch.device, n: int = 4096, repeat: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of an n×n by n×n matmul: the practical peak of this device for dense float math."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeat):
        sync(dev)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def nominal_cpu_peak() -> dict[str, Any]:
    """cores × FLOP/cycle × clock: float32 FMA throughput implied by the ISA flags and /proc/cpuinfo's MHz."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    mhz = [float(ln.split(":", 1)[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")]
    per_cycle = 64 if "avx512f" in flags else 32 if ("avx2" in flags and "fma" in flags) else 16 if "avx" in flags else 8
    cores = len(os.sched_getaffinity(0))
    ghz = max(mhz) / 1000 if mhz else float("nan")
    return {"flop_per_cycle_per_core": per_cycle, "cores": cores, "ghz": ghz, "gflops": cores * per_cycle * ghz}


# ------------------------------------------------------------------------------------------- the run


def timed_standardize(vol: np.ndarray, model: LoadedModel, dev: torch.device, **kw: Any) -> tuple[np.ndarray, float, dict]:
    timings: dict[str, float] = {}
    sync(dev)
    t0 = time.perf_counter()
    out = standardize(vol, None, model, device=dev, timings=timings, **kw)
    sync(dev)
    return out, time.perf_counter() - t0, timings


def sweep(vol: np.ndarray, model: LoadedModel, dev: torch.device, steps: int | None, reps: int) -> list[dict]:
    """Each CPU option against the reference settings: s/slice (best of reps) and max |Δ| in HU."""
    n = vol.shape[0]
    default_bs = default_batch_size(dev)
    base_threads = torch.get_num_threads()

    @contextlib.contextmanager
    def option(name: str):
        net = model.net
        if name == "threads 1":
            torch.set_num_threads(1)
        elif name == "oneDNN off":
            torch.backends.mkldnn.enabled = False
        elif name == "channels_last":
            net.to(memory_format=torch.channels_last)
        elif name == "no_grad":
            inference.torch.inference_mode, saved = (lambda: torch.no_grad()), inference.torch.inference_mode  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.set_num_threads(base_threads)
            torch.backends.mkldnn.enabled = True
            net.to(memory_format=torch.contiguous_format)
            if name == "no_grad":
                inference.torch.inference_mode = saved  # type: ignore[assignment]

    cases: list[tuple[str, int]] = [("reference", default_bs)]
    cases += [(f"batch {b}", b) for b in (1, 2, 8, 16) if b != default_bs and b <= max(n, 1)]
    cases += [("threads 1", default_bs), ("oneDNN off", default_bs), ("channels_last", default_bs), ("no_grad", default_bs)]
    ref = None
    rows = []
    for name, bs in cases:
        with option(name):
            standardize(vol[:bs], None, model, device=dev, steps=1, batch_size=bs)  # warm-up for this shape
            best, out = float("inf"), None
            for _ in range(reps):
                out, dt, _ = timed_standardize(vol, model, dev, steps=steps, batch_size=bs)
                best = min(best, dt)
        if ref is None:
            ref = out
        row = {"option": name, "batch_size": bs, "seconds_per_slice": best / n,
               "max_abs_diff_hu": float(np.abs(out - ref).max()), "bit_identical": bool(np.array_equal(out, ref))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model file (default: random weights of --config's architecture)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config whose \"model\" is timed")
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="default: the model's sampling steps")
    p.add_argument("--solver", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=1, help="timed runs (best is reported)")
    p.add_argument("--sweep", action="store_true", help="time CPU options (batch, threads, oneDNN, channels_last, no_grad)")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--json", help="also write the results as JSON here")
    a = p.parse_args()

    dev = pick_device(a.device)
    model, what = get_model(a.model, a.config)
    model.net.to(dev)
    steps = int(a.steps or model.metadata["sampling"]["steps"])
    solver = a.solver or model.metadata["sampling"]["solver"]
    vol = qa_phantom((a.slices, a.size, a.size), spacing_mm=0.7 * 512 / a.size, noise_hu=15.0, seed=0)

    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": dev.type, "hardware": hardware(dev), "software": software(), "model": what,
        "config": model.config.to_dict(), "slices": a.slices, "size": a.size, "steps": steps, "solver": solver,
    }
    if a.sweep:
        res["sweep"] = sweep(vol, model, dev, steps, max(1, a.repeat))
    else:
        flops = flops_per_slice(model.net, a.size)
        gflop_slice = flops["encode"] + steps * flops["denoise_step"] + flops["decode"]
        standardize(vol[:1], None, model, device=dev, steps=1, batch_size=a.batch_size)  # warm-up
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        best = None
        for _ in range(max(1, a.repeat)):
            _, dt, tm = timed_standardize(vol, model, dev, steps=steps, solver=solver, batch_size=a.batch_size)
            if best is None or dt < best[0]:
                best = (dt, tm)
        dt, tm = best
        n = a.slices
        res.update({
            "batch_size": a.batch_size or default_batch_size(dev),
            "seconds_per_slice": dt / n,
            "phase_seconds_per_slice": {k: v / n for k, v in tm.items()},
            "gflop_per_slice": gflop_slice,
            "gflop_breakdown": flops,
            "achieved_gflops": gflop_slice * n / dt,
            "achieved_gflops_per_phase": {
                "encode": flops["encode"] * n / tm["encode"],
                "sample": steps * flops["denoise_step"] * n / tm["sample"],
                "decode": flops["decode"] * n / tm["decode"],
            },
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        })
        if not a.no_peak:
            # the peak of the arithmetic standardize runs in: bf16 under CUDA autocast, float32 elsewhere
            peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            res["matmul_peak_dtype"] = str(peak_dtype).removeprefix("torch.")
            res["matmul_peak_gflops"] = matmul_peak(dev, n=8192 if dev.type == "cuda" else 4096, dtype=peak_dtype)
            res["fraction_of_matmul_peak"] = res["achieved_gflops"] / res["matmul_peak_gflops"]
            res["fraction_of_matmul_peak_per_phase"] = {
                k: v / res["matmul_peak_gflops"] for k, v in res["achieved_gflops_per_phase"].items()}
            if dev.type == "cpu":
                res["nominal_cpu_peak"] = nominal_cpu_peak()
    print(json.dumps(res, indent=2))
    if not a.sweep:
        print(
            f"\n| {res['hardware']} | {a.size}² × {a.slices} | {solver} {steps} | {res['batch_size']} | "
            f"{res['seconds_per_slice']:.2f} | {res['gflop_per_slice']:.1f} | {res['achieved_gflops']:.0f} | {res['peak_rss_mb']:.0f} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
