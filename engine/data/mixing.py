"""Several datasets in one split: ``MixedDataset`` and how many of each an epoch draws.

The datasets share one index space, as in ``ConcatDataset`` (sample ``i`` of
dataset ``d`` is index ``offset[d] + i``). With ``ratios`` (the recipe's
``run.train_dataset_ratios``) a training epoch of ``epoch_length`` samples
(default: the sum of the datasets' lengths) holds ``counts()[d]`` samples of
dataset ``d``, in proportion to its ratio; :class:`engine.data.sampler.MixedDistributedSampler`
draws them. Without ratios every sample is used once per epoch.

Samples keep only the keys every dataset has (``SAMPLE_KEYS``), so one batch
can hold samples of different datasets.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

from torch.utils.data import ConcatDataset, Dataset

from .records import SAMPLE_KEYS


def split_counts(total: int, weights: List[float]) -> List[int]:
    """``total`` split in proportion to ``weights``: floors, then the remainder by largest fraction."""
    s = float(sum(weights))
    if total < 0 or s <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"need total >= 0 and non-negative weights with a positive sum, got {total}, {weights}")
    exact = [total * w / s for w in weights]
    counts = [int(math.floor(x)) for x in exact]
    by_fraction = sorted(range(len(weights)), key=lambda d: (-(exact[d] - counts[d]), d))
    for d in by_fraction[: total - sum(counts)]:
        counts[d] += 1
    return counts


class MixedDataset(ConcatDataset):
    def __init__(self, datasets: Mapping[str, Dataset], ratios: Optional[Mapping[str, float]] = None,
                 epoch_length: Optional[int] = None):
        if not datasets:
            raise ValueError("MixedDataset needs at least one dataset")
        self.names: List[str] = list(datasets)
        super().__init__([datasets[n] for n in self.names])
        self.lengths = [len(d) for d in self.datasets]
        self.offsets = [0] + self.cumulative_sizes[:-1]
        if ratios is not None:
            unknown = [n for n in ratios if n not in datasets]
            missing = [n for n in self.names if n not in ratios]
            if unknown or missing:
                raise ValueError(f"ratios must name each dataset once: unknown {unknown}, missing {missing} "
                                 f"(datasets: {', '.join(self.names)})")
            if any(not float(ratios[n]) > 0 for n in self.names):
                raise ValueError(f"ratios must be positive, got {dict(ratios)}")
        self.ratios = None if ratios is None else {n: float(ratios[n]) for n in self.names}
        self.epoch_length = int(epoch_length) if epoch_length is not None else sum(self.lengths)
        empty = [n for n, k in zip(self.names, self.counts()) if k and not len(datasets[n])]
        if empty:
            raise ValueError(f"dataset(s) {empty} are empty but have a positive ratio")

    def counts(self) -> List[int]:
        """Samples of each dataset in one epoch (in ``names`` order)."""
        if self.ratios is None:
            return list(self.lengths)
        return split_counts(self.epoch_length, [self.ratios[n] for n in self.names])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = super().__getitem__(index)
        return {k: sample[k] for k in SAMPLE_KEYS if k in sample}

    def ground_truth(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for d in self.datasets:
            out.update(d.ground_truth())
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={k}" + (f" (ratio {self.ratios[n]:g})" if self.ratios else "")
                          for n, k in zip(self.names, self.lengths))
        return f"MixedDataset({parts}, epoch_length={self.epoch_length})"
