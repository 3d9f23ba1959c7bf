"""A distributed sampler that visits every index exactly once per epoch.

torch's ``DistributedSampler`` pads the epoch with repeated indices so all
ranks get the same count; in evaluation that counts some samples twice. This
sampler never repeats an index. Contract, for ``N`` samples and ``R`` ranks:

* The epoch order is ``torch.randperm(N)`` drawn from a generator seeded with
  ``seed + epoch`` (or ``range(N)`` without shuffling): the same on every rank
  and every run. Rank ``r`` takes positions ``r, r + R, r + 2R, ...`` of it.
* ``even=False`` (evaluation): all ``N`` indices, each exactly once; ranks get
  ``ceil(N / R)`` or ``floor(N / R)`` indices, so they may differ by one.
* ``even=True`` (training): every rank gets ``floor(N / R)`` indices, no index
  twice; the at most ``R - 1`` positions at the end of the epoch order are left
  out (other samples each epoch when shuffling). All ranks then make the same
  number of batches, which DeepSpeed needs: every rank must take part in every
  step's collectives. ``num_batches`` gives that count.
* ``set_epoch(e)`` picks the epoch's order and resets the start to 0;
  ``set_start(k)`` then skips the first ``k`` indices of this rank's order
  (``k = batches_done * batch_size`` to resume mid-epoch exactly).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.utils.data import Sampler


def _dist_default(num_replicas: Optional[int], rank: Optional[int]):
    if num_replicas is not None and rank is not None:
        return num_replicas, rank
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    return num_replicas, rank


class ExactDistributedSampler(Sampler[int]):
    def __init__(self, num_samples: int, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, shuffle: bool = True, seed: int = 0,
                 even: bool = False):
        num_replicas, rank = _dist_default(num_replicas, rank)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.even = bool(even)
        self.epoch = 0
        self.start = 0

    # -- sizes -------------------------------------------------------------
    def rank_length(self) -> int:
        """How many indices this rank gets per epoch (before ``set_start``)."""
        N, R = self.num_samples, self.num_replicas
        if self.even:
            return N // R
        return N // R + (1 if self.rank < N % R else 0)

    def __len__(self) -> int:
        return self.rank_length() - self.start

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches this rank makes in a whole epoch with a DataLoader of ``batch_size``.

        With ``even=True`` every rank returns the same number. With
        ``even=False`` ranks may differ by one batch: fine for evaluation
        (results are gathered at the end), not for training steps.
        """
        n = self.rank_length()
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    # -- epoch control -----------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.rank_length():
            raise ValueError(f"start must be in [0, {self.rank_length()}] for this rank, got {start}")
        self.start = int(start)

    def epoch_order(self) -> List[int]:
        """This rank's whole order for the current epoch (ignores ``start``)."""
        N, R = self.num_samples, self.num_replicas
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(N, generator=g).tolist()
        else:
            order = list(range(N))
        if self.even:
            order = order[: (N // R) * R]
        return order[self.rank::R]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start:])

    # -- checkpoints -------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed,
                "num_samples": self.num_samples, "num_replicas": self.num_replicas,
                "shuffle": self.shuffle, "even": self.even}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore epoch and start; the order must be the same one, so the sizes must match."""
        for key in ("num_samples", "num_replicas", "seed", "shuffle", "even"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the sampler position exactly: the checkpoint has {key}={state[key]!r}, "
                    f"this run has {key}={getattr(self, key)!r}. Resume with the same dataset, world size "
                    f"and seed, or restart the epoch.")
        self.set_epoch(state["epoch"])
        self.set_start(state["start"])
