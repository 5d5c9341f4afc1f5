"""Peer speed baseline: a small residual image-to-image CNN of the Choe et al. 2019 kind, per 512² slice.

    .venv/bin/python bench/bench_peer_cnn.py [--slices 8] [--batch-size 1 4] [--device auto] [--json OUT.json]

Choe et al. (Radiology 2019) converted reconstruction kernels with a plain CNN trained on paired images
that predicts the *difference* to the target kernel (a residual added to the input). The network timed
here is that kind, sized as the Performance issue asks: 6 convolution layers of 3×3 kernels, 64 channels,
ReLU after all but the last, input 1×512×512, output = input + CNN(input), float32. It is not a
reproduction of their trained network: its weights are random (Kaiming-initialised, seeded), which does
not change its speed, and its output is meaningless. Timed the way ``standardize`` is timed (batches of
slices under ``torch.inference_mode``, HU normalization and clipping included, after a warm-up), on the
same machine, so the two are comparable. FLOPs counted by ``torch.utils.flop_counter`` (multiply-add = 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_standardize import hardware, peak_rss_mb, software, sync

from LTDiffPPLib.inference import pick_device
from LTDiffPPLib.phantom import qa_phantom


class PeerCNN(nn.Module):
    """x + f(x), f = conv3×3(1→C) ReLU, (layers − 2) × [conv3×3(C→C) ReLU], conv3×3(C→1)."""

    def __init__(self, channels: int = 64, layers: int = 6) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(layers - 2):
            mods += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        mods.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.body = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def convert(net: nn.Module, vol: np.ndarray, dev: torch.device, batch_size: int) -> np.ndarray:
    out = np.empty_like(vol)
    with torch.inference_mode():
        for b0 in range(0, len(vol), batch_size):
            x = torch.from_numpy(vol[b0:b0 + batch_size]).to(dev)[:, None]
            x = (x.clamp(-1024, 3071) + 300.0) / 1000.0
            y = net(x)[:, 0] * 1000.0 - 300.0
            out[b0:b0 + batch_size] = y.clamp(-1024, 3071).cpu().numpy()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 4])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per batch size (best is reported)")
    p.add_argument("--json", help="also write the results as JSON here")
    a = p.parse_args()

    dev = pick_device(a.device)
    torch.manual_seed(0)
    net = PeerCNN(a.channels, a.layers).eval().to(dev)
    vol = qa_phantom((a.slices, a.size, a.size), spacing_mm=0.7 * 512 / a.size, noise_hu=15.0, seed=0)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, 1, a.size, a.size, device=dev))
    gflop = fc.get_total_flops() / 1e9
    rows = []
    for bs in a.batch_size:
        convert(net, vol[:bs], dev, bs)  # warm-up for this shape
        best = float("inf")
        for _ in range(a.repeat):
            sync(dev)
            t0 = time.perf_counter()
            convert(net, vol, dev, bs)
            sync(dev)
            best = min(best, time.perf_counter() - t0)
        rows.append({"batch_size": bs, "seconds_per_slice": best / a.slices, "achieved_gflops": gflop * a.slices / best})
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "hardware": hardware(dev), "software": software(), "device": dev.type,
        "network": f"residual CNN, {a.layers} conv 3×3 layers, {a.channels} channels, ReLU, random weights",
        "parameters": sum(p.numel() for p in net.parameters()),
        "size": a.size, "slices": a.slices, "gflop_per_slice": gflop, "runs": rows, "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(res, indent=2))
    for r in rows:
        print(f"| {res['hardware']} | {a.size}² × {a.slices} | {r['batch_size']} | {r['seconds_per_slice']:.3f} | "
              f"{gflop:.1f} | {r['achieved_gflops']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
