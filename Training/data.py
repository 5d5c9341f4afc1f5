"""Random patches from a paired-kernel dataset (:mod:`LTDiffPPLib.datasets`), drawn statelessly.

Batch ``step`` of rank ``rank`` is a pure function of (seed, phase, step, rank): a resumed run draws
exactly the batches an uninterrupted run would have, and DDP ranks draw disjoint random streams (the
role a DistributedSampler plays for map-style data). Patches are normalized HU, shape (B, 1, P, P).
"""

from __future__ import annotations

import numpy as np
import torch

from LTDiffPPLib.datasets import Dataset


class PatchSampler:
    """Paired (source, target) patches of one subset, normalized with the model's HU settings."""

    def __init__(self, dataset: Dataset, split: str, patch: int, hu: dict[str, float], seed: int) -> None:
        self.pairs = dataset.subset(split)
        if not self.pairs:
            raise ValueError(f"dataset {dataset.root} has no pairs in the {split!r} subset")
        self.arrays = [dataset.arrays(p) for p in self.pairs]
        small = [p["id"] for p, (s, _) in zip(self.pairs, self.arrays) if min(s.shape[1:]) < patch]
        if small:
            raise ValueError(f"pairs {small[:3]} are smaller than the {patch}-pixel patch")
        self.patch, self.hu, self.seed = patch, hu, seed
        # sample pairs in proportion to their slice count, so every slice is equally likely
        sizes = np.array([s.shape[0] for s, _ in self.arrays], dtype=np.float64)
        self.weights = sizes / sizes.sum()

    def _normalize(self, a: np.ndarray) -> np.ndarray:
        a = np.clip(a.astype(np.float32), self.hu["min"], self.hu["max"])
        return (a - self.hu["center"]) / self.hu["scale"]

    def batch(self, batch_size: int, phase: int, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) float32 tensors (B, 1, P, P) for this (phase, step, rank)."""
        rng = np.random.default_rng([self.seed, phase, step, rank])
        src, tgt = [], []
        p = self.patch
        for _ in range(batch_size):
            s_arr, t_arr = self.arrays[rng.choice(len(self.arrays), p=self.weights)]
            z = rng.integers(s_arr.shape[0])
            y = rng.integers(s_arr.shape[1] - p + 1)
            x = rng.integers(s_arr.shape[2] - p + 1)
            flip = rng.integers(2)
            for arr, out in ((s_arr, src), (t_arr, tgt)):
                tile = arr[z, y : y + p, x : x + p]
                out.append(tile[:, ::-1] if flip else tile)  # left-right flip: anatomy is nearly symmetric
        return (torch.from_numpy(self._normalize(np.stack(src)))[:, None],
                torch.from_numpy(self._normalize(np.stack(tgt)))[:, None])
