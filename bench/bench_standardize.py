"""Benchmark: time and memory of ``standardize`` per 512² slice, with FLOPs per slice of each network.

    .venv/bin/python bench/bench_standardize.py [--slices 8] [--steps 10] [--batch-size 4] [--device auto]
                                                [--dtype float32|bfloat16] [--json OUT.json]

Speed does not depend on the weights, so a randomly initialised model of the default architecture is
timed (the trained default model has the same architecture). Prints a Markdown table row for
BENCHMARKS.md and the hardware it ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from LTDiffPPLib.inference import pick_device, standardize  # noqa: E402
from LTDiffPPLib.modelfile import init_model, load_model  # noqa: E402
from LTDiffPPLib.phantom import qa_phantom  # noqa: E402


def flops_per_slice(net: torch.nn.Module, size: int) -> dict[str, float]:
    """GFLOP of one 512² slice through the encoder, one denoiser step, and the decoder (FlopCounterMode)."""
    x = torch.zeros(1, 1, size, size)
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            z = net.encode(x)
        out["encode"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            net.predict(z, torch.full((1,), 0.5), z)
        out["denoise_step"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            net.decode(z)
        out["decode"] = fc.get_total_flops() / 1e9
    return out


def hardware(dev: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {torch.get_num_threads()} threads"
    if dev.type == "cuda":
        desc += f"; GPU {torch.cuda.get_device_name(dev)}"
    return desc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--solver", default="dpmpp2m")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results as JSON here")
    a = p.parse_args()

    dev = pick_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.safetensors"
        init_model(path, seed=0)
        model = load_model(path)
    vol = qa_phantom((a.slices, a.size, a.size), spacing_mm=0.8 * 512 / a.size, seed=0)
    flops = flops_per_slice(model.net, a.size)
    gflop_slice = flops["encode"] + a.steps * flops["denoise_step"] + flops["decode"]

    standardize(vol[:1], None, model, device=dev, steps=1)  # warm-up (allocator, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    standardize(vol, None, model, device=dev, steps=a.steps, solver=a.solver, batch_size=a.batch_size)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {
        "device": dev.type,
        "hardware": hardware(dev),
        "torch": torch.__version__,
        "slices": a.slices,
        "size": a.size,
        "steps": a.steps,
        "solver": a.solver,
        "batch_size": a.batch_size,
        "seconds_per_slice": dt / a.slices,
        "gflop_per_slice": gflop_slice,
        "gflop_breakdown": flops,
        "achieved_gflops": gflop_slice * a.slices / dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }
    print(json.dumps(res, indent=2))
    print(
        f"\n| {res['device']} | {a.size}² × {a.slices} | {a.solver} {a.steps} | {res['batch_size'] or 'default'} | "
        f"{res['seconds_per_slice']:.2f} | {gflop_slice:.1f} | {res['achieved_gflops']:.0f} | {res['peak_rss_mb']:.0f} |"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
