"""Random patches from a paired-kernel dataset (:mod:`LTDiffPPLib.datasets`), drawn statelessly.

Batch ``step`` of rank ``rank`` is a pure function of (seed, phase, step, rank): a resumed run draws
exactly the batches an uninterrupted run would have, and DDP ranks draw disjoint random streams (the
role a DistributedSampler plays for map-style data). Patches are normalized HU, shape (B, 1, P, P).

From a multi-kernel dataset every batch is one ordered kernel pair, drawn (like the patches) as a pure
function of (seed, phase, step, rank): :meth:`PatchSampler.pair_of` says which, so that the trainer can
condition the model on it.
"""

from __future__ import annotations

import numpy as np
import torch

from LTDiffPPLib.datasets import Dataset


class PatchSampler:
    """Paired (source, target) patches of one subset, normalized with the model's HU settings.

    ``kernel_pairs``: the ordered (source, target) kernel pairs to draw from a multi-kernel dataset
    (default: the dataset's one pair, which a multi-kernel dataset does not have)."""

    def __init__(self, dataset: Dataset, split: str, patch: int, hu: dict[str, float], seed: int,
                 kernel_pairs: list[tuple[str, str]] | None = None) -> None:
        self.pairs = dataset.subset(split)
        if not self.pairs:
            raise ValueError(f"dataset {dataset.root} has no pairs in the {split!r} subset")
        if dataset.multikernel:
            if kernel_pairs is None:
                raise ValueError(f"dataset {dataset.root} holds kernels {dataset.kernels}: name the kernel pairs to draw")
            self.kernel_pairs = [(str(a), str(b)) for a, b in kernel_pairs]
            self._keys = self.kernel_pairs
            kernels = sorted({k for kp in self.kernel_pairs for k in kp})
            # memory-mapped arrays of every entry, per kernel
            self.images = [{k: dataset.image(p, k) for k in kernels} for p in self.pairs]
        else:
            if kernel_pairs is not None and [tuple(kp) for kp in kernel_pairs] != [tuple(dataset.kernels)]:
                raise ValueError(f"dataset {dataset.root} holds the one pair {dataset.kernels}, not {kernel_pairs}")
            self.kernel_pairs = [(dataset.kernels[0], dataset.kernels[1])]
            self._keys = [("source", "target")]
            self.images = [dict(zip(("source", "target"), dataset.arrays(p))) for p in self.pairs]
        small = [p["id"] for p, im in zip(self.pairs, self.images) if min(next(iter(im.values())).shape[1:]) < patch]
        if small:
            raise ValueError(f"pairs {small[:3]} are smaller than the {patch}-pixel patch")
        self.patch, self.hu, self.seed = patch, hu, seed
        # sample pairs in proportion to their slice count, so every slice is equally likely
        sizes = np.array([next(iter(im.values())).shape[0] for im in self.images], dtype=np.float64)
        self.weights = sizes / sizes.sum()

    def pair_of(self, phase: int, step: int, rank: int = 0) -> tuple[str, str]:
        """The (source, target) kernels of batch (phase, step, rank)."""
        return self.kernel_pairs[self._pair_index(phase, step, rank)]

    def _pair_index(self, phase: int, step: int, rank: int) -> int:
        if len(self.kernel_pairs) == 1:
            return 0
        return int(np.random.default_rng([self.seed, phase, step, rank, 1]).integers(len(self.kernel_pairs)))

    def _normalize(self, a: np.ndarray) -> np.ndarray:
        a = np.clip(a.astype(np.float32), self.hu["min"], self.hu["max"])
        return (a - self.hu["center"]) / self.hu["scale"]

    def batch(self, batch_size: int, phase: int, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) float32 tensors (B, 1, P, P) for this (phase, step, rank)."""
        rng = np.random.default_rng([self.seed, phase, step, rank])
        ks, kt = self._keys[self._pair_index(phase, step, rank)]
        src, tgt = [], []
        p = self.patch
        for _ in range(batch_size):
            images = self.images[rng.choice(len(self.images), p=self.weights)]
            s_arr, t_arr = images[ks], images[kt]
            z = rng.integers(s_arr.shape[0])
            y = rng.integers(s_arr.shape[1] - p + 1)
            x = rng.integers(s_arr.shape[2] - p + 1)
            flip = rng.integers(2)
            for arr, out in ((s_arr, src), (t_arr, tgt)):
                tile = arr[z, y : y + p, x : x + p]
                out.append(tile[:, ::-1] if flip else tile)  # left-right flip: anatomy is nearly symmetric
        return (torch.from_numpy(self._normalize(np.stack(src)))[:, None],
                torch.from_numpy(self._normalize(np.stack(tgt)))[:, None])

