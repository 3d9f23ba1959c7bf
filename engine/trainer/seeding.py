"""Per-sample seeding: augmentation as a pure function of (seed, epoch, sample index, copy).

With several DataLoader workers, which worker draws which sample depends on where
the epoch started; a run resumed mid-epoch would therefore see other random crops
than the uninterrupted run. Seeding every sample from (seed, epoch, index) makes the
augmentation independent of workers and of the resume point, so a resumed run
reproduces the original exactly. ``copy`` counts the repeats of a sample within an
epoch (a dataset oversampled by ``run.train_dataset_ratios``), so each repeat gets
its own augmentation; it is 0 otherwise.
"""
from __future__ import annotations

import hashlib
import random
from typing import Iterator, Tuple

import numpy as np
import torch

from engine.data.errors import ImageReadError


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    """A fixed mixing of the numbers (no Python hash(): it is salted per process)."""
    return (seed * 1_000_003 + epoch * 10_007 + int(index) * 7 + int(copy) * 104_729 + 12345) % (2**31 - 1)


def micro_batch_seed(seed: int, epoch: int, chunk: int) -> int:
    """The seed of the random numbers the model draws (dropout) for one micro-batch: a function of where the
    micro-batch is in the run, not of the rank or the process, so a resumed run (on any number of ranks:
    micro-batch ``k`` of rank ``r`` is chunk ``k R + r`` of the epoch, engine/data/sampler.py) draws the same
    dropout masks as the uninterrupted one. A hash, so neighbouring chunks and epochs get unrelated seeds."""
    digest = hashlib.blake2b(f"dropout:{seed}:{epoch}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_model_rng(seed: int, device: torch.device) -> None:
    """Seed the generators the forward pass draws from: the CPU one, and the current accelerator's (only that
    device: seeding every CUDA device would cost more than a small step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    elif device.type != "cpu":
        from deepspeed.accelerator import get_accelerator  # here: only non-CUDA accelerators need it

        get_accelerator().manual_seed(seed)


class SeededSampler(torch.utils.data.Sampler):
    """Wraps an index sampler; yields ``(index, sample_seed)``."""

    def __init__(self, sampler, seed: int, epoch: int):
        self.sampler = sampler
        self.seed = seed
        self.epoch = epoch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        with_copies = getattr(self.sampler, "iter_with_copies", None)
        pairs = with_copies() if with_copies is not None else ((idx, 0) for idx in self.sampler)
        for idx, copy in pairs:
            yield idx, sample_seed(self.seed, self.epoch, idx, copy)

    def __len__(self) -> int:
        return len(self.sampler)


_MAX_REPLACEMENTS = 64  # consecutive unreadable images before a batch gives up


class SeededDataset(torch.utils.data.Dataset):
    """Reads ``(index, seed)`` keys: seeds python/numpy/torch for this sample, then restores the caller's RNG.

    Only the CPU generators are seeded (augmentation runs on the CPU): ``torch.manual_seed`` would also
    re-seed every CUDA device, which costs more than the rest of this together and is not ours to touch.
    In a DataLoader worker the generators serve nothing but the samples, so they are not restored there;
    in the main process (``num_workers: 0``) they are, once per batch, so training draws the same numbers
    either way.
    """

    def __init__(self, dataset, replace_unreadable: bool = False):
        self.dataset = dataset
        # Training: an image that became unreadable after the dataset check is replaced by the next readable
        # sample (same seed, so the result is deterministic) and reported under the sample's "replaced" key.
        self.replace_unreadable = replace_unreadable

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        """A whole batch (the DataLoader's fetcher calls this when it exists): the caller's state is
        saved and restored once per batch, not per sample."""
        if torch.utils.data.get_worker_info() is not None:
            return [self._load(idx, seed) for idx, seed in keys]
        py, npy, pt = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        try:
            return [self._load(idx, seed) for idx, seed in keys]
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.default_generator.set_state(pt)

    def _load(self, idx: int, seed: int):
        if not self.replace_unreadable:
            return self._seeded(idx, seed)
        replaced = []
        n = len(self.dataset)
        for j in range(idx, idx + min(n, _MAX_REPLACEMENTS)):
            try:
                sample = self._seeded(j % n, seed)
            except ImageReadError as e:
                replaced.append({"sample_id": e.sample_id, "path": e.path, "error": str(e)})
                continue
            for r in replaced:
                r["replaced_by"] = sample.get("sample_id")
            sample["replaced"] = replaced
            return sample
        raise ImageReadError(f"{len(replaced)} images in a row cannot be read, from {replaced[0]['path']} on; "
                             f"the dataset changed under the run: check its storage",
                             sample_id=replaced[0]["sample_id"], path=replaced[0]["path"])

    def _seeded(self, idx: int, seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        return self.dataset[idx]
