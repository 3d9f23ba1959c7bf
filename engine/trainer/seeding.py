"""Per-sample seeding: augmentation as a pure function of (seed, epoch, sample index).

With several DataLoader workers, which worker draws which sample depends on where
the epoch started; a run resumed mid-epoch would therefore see other random crops
than the uninterrupted run. Seeding every sample from (seed, epoch, index) makes the
augmentation independent of workers and of the resume point, so a resumed run
reproduces the original exactly.
"""
from __future__ import annotations

import random
from typing import Iterator, Tuple

import numpy as np
import torch


class SeededSampler(torch.utils.data.Sampler):
    """Wraps an index sampler; yields ``(index, sample_seed)``."""

    def __init__(self, sampler, seed: int, epoch: int):
        self.sampler = sampler
        self.seed = seed
        self.epoch = epoch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for idx in self.sampler:
            # A fixed mixing of the three numbers (no Python hash(): it is salted per process).
            yield idx, (self.seed * 1_000_003 + self.epoch * 10_007 + int(idx) * 7 + 12345) % (2**31 - 1)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(torch.utils.data.Dataset):
    """Reads ``(index, seed)`` keys: seeds python/numpy/torch for this sample, then restores the caller's RNG."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        idx, seed = key
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                return self.dataset[idx]
            finally:
                random.setstate(py)
                np.random.set_state(npy)
