"""A distributed sampler that visits every index exactly once per epoch.

torch's ``DistributedSampler`` pads the epoch with repeated indices so all
ranks get the same count; in evaluation that counts some samples twice. This
sampler never repeats an index. Contract, for ``N`` samples and ``R`` ranks:

* The epoch order is ``torch.randperm(N)`` drawn from a generator seeded with
  ``seed + epoch`` (or ``range(N)`` without shuffling): the same on every rank
  and every run. Rank ``r`` takes positions ``r, r + R, r + 2R, ...`` of it.
* ``even=False`` (evaluation): all ``N`` indices, each exactly once; ranks get
  ``ceil(N / R)`` or ``floor(N / R)`` indices, so they may differ by one.
* ``even=True`` (training): the epoch order is cut into chunks of ``chunk``
  positions (the micro-batch size) and the chunks are dealt round-robin: rank
  ``r`` takes chunks ``r, r + R, ...`` of the first ``floor(N / (chunk R))``.
  Every rank gets the same count, no index twice; the at most ``chunk R - 1``
  positions at the end are left out (other samples each epoch when shuffling).
  All ranks then make the same number of batches, which DeepSpeed needs: every
  rank must take part in every step's collectives. ``num_batches`` gives that
  count. Micro-batch ``k`` of rank ``r`` is chunk ``k R + r``, so the micro-
  batches are the same chunks whatever ``R``: with ``accum`` micro-batches per
  optimizer step, step ``s`` trains on chunks ``[s accum R, (s + 1) accum R)``,
  and a run on 1 rank with ``accum = A R`` takes exactly the steps of a run on
  ``R`` ranks with ``accum = A`` (what lets a run resume on another number of
  GPUs, docs/multinode.md).
* ``set_epoch(e)`` picks the epoch's order and resets the start to 0;
  ``set_start(k)`` then skips the first ``k`` indices of this rank's order
  (``k = batches_done * batch_size`` to resume mid-epoch exactly).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .mixing import MixedDataset


def _dist_default(num_replicas: Optional[int], rank: Optional[int]):
    if num_replicas is not None and rank is not None:
        return num_replicas, rank
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    return num_replicas, rank


class ExactDistributedSampler(Sampler[int]):
    def __init__(self, num_samples: int, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, shuffle: bool = True, seed: int = 0,
                 even: bool = False, chunk: int = 1):
        num_replicas, rank = _dist_default(num_replicas, rank)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if chunk < 1 or (chunk > 1 and not even):
            raise ValueError(f"chunk must be >= 1 and is only used with even=True, got chunk={chunk}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.even = bool(even)
        self.chunk = int(chunk)
        self.epoch = 0
        self.start = 0

    # -- sizes -------------------------------------------------------------
    def rank_length(self) -> int:
        """How many indices this rank gets per epoch (before ``set_start``)."""
        N, R = self.num_samples, self.num_replicas
        if self.even:
            return N // (self.chunk * R) * self.chunk
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
            return deal_chunks(order, R, self.rank, self.chunk)
        return order[self.rank::R]

    def epoch_order_with_copies(self) -> Tuple[List[int], List[int]]:
        """``epoch_order()`` and, per position, how many times its index was drawn earlier in this epoch
        (over all ranks): 0 everywhere here, as every index is drawn once."""
        order = self.epoch_order()
        return order, [0] * len(order)

    def iter_with_copies(self) -> Iterator[Tuple[int, int]]:
        """``(index, copy)`` from ``start`` on: the per-sample seed tells copies of a sample apart."""
        order, copies = self.epoch_order_with_copies()
        return zip(order[self.start:], copies[self.start:])

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start:])

    # -- checkpoints -------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed,
                "num_samples": self.num_samples, "num_replicas": self.num_replicas,
                "shuffle": self.shuffle, "even": self.even, "chunk": self.chunk}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore epoch and start; the order must be the same one, so the sizes must match."""
        for key in ("num_samples", "num_replicas", "seed", "shuffle", "even", "chunk"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the sampler position exactly: the checkpoint has {key}={state[key]!r}, "
                    f"this run has {key}={getattr(self, key)!r}. Resume with the same dataset, world size "
                    f"and seed, or restart the epoch.")
        self.set_epoch(state["epoch"])
        self.set_start(state["start"])


def deal_chunks(order: List[int], num_replicas: int, rank: int, chunk: int) -> List[int]:
    """Rank ``rank``'s share of ``order``: chunks of ``chunk`` consecutive positions dealt round-robin,
    whole rounds only (``floor(len / (chunk * num_replicas))`` chunks per rank)."""
    rounds = len(order) // (chunk * num_replicas)
    out: List[int] = []
    for k in range(rounds):
        start = (k * num_replicas + rank) * chunk
        out += order[start:start + chunk]
    return out


class MixedDistributedSampler(ExactDistributedSampler):
    """Draws a :class:`~engine.data.mixing.MixedDataset` epoch in its datasets' ratios.

    Contract, for an epoch of ``L = dataset.epoch_length`` samples and ``R`` ranks:

    * Dataset ``d`` contributes ``dataset.counts()[d]`` samples. They are the
      next positions of an endless stream made of fresh permutations of ``d``
      (each seeded by ``seed``, ``d`` and its number), so no sample of ``d`` is
      drawn a second time before all of ``d`` was drawn once, across epochs too.
    * The ``L`` picks are shuffled with a generator seeded by ``seed + epoch``
      and dealt to the ranks in chunks of ``chunk``, as in
      :class:`ExactDistributedSampler` with ``even=True``: every rank gets the
      same count, no pick twice.
    * ``set_epoch``, ``set_start``, ``num_batches`` and the state dict work as in
      :class:`ExactDistributedSampler`; the order depends only on seed and epoch.
    """

    def __init__(self, dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, chunk: int = 1):
        super().__init__(dataset.epoch_length, num_replicas, rank, shuffle=shuffle, seed=seed, even=True,
                         chunk=chunk)
        self.lengths = list(dataset.lengths)
        self.offsets = list(dataset.offsets)
        self.counts = list(dataset.counts())

    def _stream(self, d: int, start: int, count: int) -> List[int]:
        """Positions ``[start, start + count)`` of dataset ``d``'s stream of permutations."""
        n = self.lengths[d]
        out: List[int] = []
        for k in range(start // n, (start + count - 1) // n + 1) if count else ():
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed((self.seed * 1_000_003 + (d + 1) * 7_919 + k) % (2**63 - 1))
                perm = torch.randperm(n, generator=g).tolist()
            else:
                perm = list(range(n))
            lo, hi = max(start - k * n, 0), min(start + count - k * n, n)
            out += perm[lo:hi]
        return out

    def _picks(self) -> List[int]:
        """The epoch's picks over all ranks, in order."""
        picks: List[int] = []
        for d, (off, c) in enumerate(zip(self.offsets, self.counts)):
            picks += [off + i for i in self._stream(d, self.epoch * c, c)]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            picks = [picks[i] for i in torch.randperm(len(picks), generator=g).tolist()]
        return picks

    def epoch_order(self) -> List[int]:
        return deal_chunks(self._picks(), self.num_replicas, self.rank, self.chunk)

    def epoch_order_with_copies(self) -> Tuple[List[int], List[int]]:
        """A dataset drawn more often than it has samples repeats them within the epoch: copy ``k`` of an
        index is its ``k``-th repeat in the epoch's order, the same whatever the number of ranks."""
        picks = self._picks()
        seen: Dict[int, int] = {}
        copies = []
        for i in picks:
            copies.append(seen.get(i, 0))
            seen[i] = copies[-1] + 1
        R, r, c = self.num_replicas, self.rank, self.chunk
        return deal_chunks(picks, R, r, c), deal_chunks(copies, R, r, c)

    def state_dict(self) -> Dict[str, Any]:
        return dict(super().state_dict(), counts=list(self.counts), lengths=list(self.lengths))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("counts", "lengths"):
            if key in state and list(state[key]) != getattr(self, key):
                raise ValueError(f"cannot resume the sampler position exactly: the checkpoint mixed datasets with "
                                 f"{key}={state[key]}, this run has {getattr(self, key)}. Resume with the same "
                                 f"datasets and run.train_dataset_ratios, or restart the epoch.")
        super().load_state_dict(state)


def training_sampler(dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                     seed: int = 0, batch_size: int = 1) -> ExactDistributedSampler:
    """The training sampler for ``dataset``: mixed by ratio for a MixedDataset with ratios, else every
    sample once per epoch; either way every rank gets the same count (``even``), dealt in whole
    micro-batches of ``batch_size`` (``chunk``)."""
    if isinstance(dataset, MixedDataset) and dataset.ratios is not None:
        return MixedDistributedSampler(dataset, num_replicas, rank, shuffle=True, seed=seed, chunk=batch_size)
    return ExactDistributedSampler(len(dataset), num_replicas, rank, shuffle=True, seed=seed, even=True,
                                   chunk=batch_size)
