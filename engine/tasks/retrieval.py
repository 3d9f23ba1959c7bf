"""Sherlock retrieval: the official leaderboard metrics, and scoring them by likelihood.

The definitions are those of the leaderboard's scorer (allenai/sherlock,
``leaderboard_eval/score_retrieval.py``), applied to one split at a time:

* ``sim[i, j]`` is the score of image+region ``i`` with inference ``j``; higher
  is better; the true pairs are on the diagonal;
* the im->txt rank of sample ``i`` is the rank of ``sim[i, i]`` within row ``i``,
  the txt->im rank the rank within column ``i``; ranks start at 1 and ties share
  the average rank (``scipy.stats.rankdata``'s default), so a two-way tie at the
  top ranks 1.5;
* P@1 = 100 * the fraction of im->txt ranks equal to 1 (im->txt only);
* the leaderboard reports the plain mean of the per-split values (23 splits of
  about 1000 samples).

The validation monitor in the official training script (``train_retrieval_clip.py``)
is not this: it swaps the two directions and ranks the whole validation set at
once. Numbers from it are not comparable with the leaderboard.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import scipy.stats
import torch

from engine.tasks import _common as C
from engine.tasks.metrics import RETRIEVAL_METRIC_KEYS, aggregate_metric, check_metric_name

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = ("im2txt_mean_rank", "txt2im_mean_rank")
RETRIEVAL_BATCH_KEYS = ("image", "prompt", "text_output", "sample_id")


def retrieval_metrics(sim: np.ndarray) -> Dict[str, float]:
    """Leaderboard metrics of one split; ``sim[i, j]`` = score of image+region i with inference j."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"retrieval_metrics: sim must be a non-empty square matrix; got shape {sim.shape}")
    nans = int(np.isnan(sim).sum())
    if nans:
        raise ValueError(f"retrieval_metrics: sim holds {nans} NaN score(s); their ranks would be meaningless")
    im2txt = np.diagonal(scipy.stats.rankdata(-sim, axis=1))
    txt2im = np.diagonal(scipy.stats.rankdata(-sim, axis=0))
    return {
        "im2txt_mean_rank": float(np.mean(im2txt)),
        "txt2im_mean_rank": float(np.mean(txt2im)),
        "p_at_1": float(100 * np.mean(im2txt == 1.0)),
    }


def retrieval_metrics_grouped(groups: Sequence[np.ndarray]) -> Dict[str, float]:
    """Plain mean over groups (splits) of :func:`retrieval_metrics`, as the leaderboard averages its splits."""
    if len(groups) == 0:
        raise ValueError("retrieval_metrics_grouped: no groups to score")
    per_group = [retrieval_metrics(g) for g in groups]
    return {k: float(np.mean([m[k] for m in per_group])) for k in RETRIEVAL_METRIC_KEYS}


def build_groups(split_idx: Sequence[int], group_size: Optional[int]) -> List[List[int]]:
    """Group sample positions into retrieval splits.

    Samples with a ``split_idx`` (>= 0; the official validation file has one per
    record) are grouped by it, groups ordered by split and samples kept in the
    given order. Samples without one (-1) form consecutive chunks of
    ``group_size``, which must then be given (the leaderboard's splits hold about
    1000 samples). A group of one sample (a trailing chunk, say) ranks trivially
    and is dropped with a warning.
    """
    if group_size is not None and group_size < 2:
        raise ValueError(f"build_groups: group_size must be at least 2; got {group_size}")
    by_split: Dict[int, List[int]] = {}
    loose: List[int] = []
    for pos, s in enumerate(split_idx):
        s = int(s)
        (loose if s < 0 else by_split.setdefault(s, [])).append(pos)
    if loose and group_size is None:
        raise ValueError(f"build_groups: {len(loose)} sample(s) have no split_idx (-1); set group_size to rank "
                         f"them in consecutive groups of that size (the leaderboard's splits hold ~1000)")
    groups = [by_split[s] for s in sorted(by_split)]
    groups += [loose[k:k + group_size] for k in range(0, len(loose), group_size or 1)]
    small = [g for g in groups if len(g) < 2]
    if small:
        logger.warning("build_groups: dropping %d group(s) of a single sample (nothing to rank against)", len(small))
        groups = [g for g in groups if len(g) >= 2]
    if not groups:
        raise ValueError(f"build_groups: no group of two or more samples among {len(split_idx)} sample(s)")
    return groups


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_retrieval_detailed(model: Any, loader, *, device, dtype: Optional[torch.dtype] = None,
                             group_size: Optional[int] = None,
                             batch_size: Optional[int] = None) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
    """:func:`score_retrieval`, plus one record per group: ``{"group", "size", "sample_ids", metrics...}``."""
    dtype = C.resolve_dtype(model, dtype)
    batch_size = int(batch_size or getattr(loader, "batch_size", None) or 8)
    use_embeds = callable(getattr(model, "encode_image", None)) and \
        callable(getattr(model, "score_with_image_embeds", None))
    rank = C.rank()

    with C.eval_mode(model):
        # 1. This rank's samples: encode each image once (or keep the image itself
        #    when the model cannot score from embeddings), on the CPU until needed.
        visual: Dict[Any, Any] = {}
        meta: List[Tuple[Any, str, str, int]] = []
        for batch in loader:
            C.check_batch(batch, RETRIEVAL_BATCH_KEYS, "score_retrieval")
            image = C.to_device(batch["image"], device, dtype)
            vis = model.encode_image(image) if use_embeds else image
            vis = C.tree_map(lambda t: t.detach().cpu(), vis)
            split = batch.get("split_idx")
            split = [-1] * len(batch["sample_id"]) if split is None else [int(x) for x in split]
            for k, sid in enumerate(batch["sample_id"]):
                if sid in visual:
                    continue
                visual[sid] = C.tree_map(lambda t, k=k: t[k:k + 1], vis)
                meta.append((sid, batch["prompt"][k], batch["text_output"][k], split[k]))

        # 2. Every rank's samples in one global order; a sample belongs to the first
        #    rank that has it (a sampler's padding repeats it elsewhere).
        samples, owner, seen = [], [], set()
        for r, part in enumerate(C.all_gather_object(meta)):
            for m in part:
                if m[0] not in seen:
                    seen.add(m[0])
                    samples.append(m)
                    owner.append(r)
        order = sorted(range(len(samples)), key=lambda n: samples[n][0])
        samples, owner = [samples[n] for n in order], [owner[n] for n in order]
        groups = build_groups([m[3] for m in samples], group_size)
        where = {i: (g, p) for g, members in enumerate(groups) for p, i in enumerate(members)}

        mine = [(g, [i for i in members if owner[i] == rank]) for g, members in enumerate(groups)]
        n_pairs = sum(len(rows) * len(groups[g]) for g, rows in mine)
        n_calls = math.ceil(n_pairs / batch_size)
        max_calls = max(C.all_gather_object(n_calls))
        if rank == 0:
            total = sum(len(m) ** 2 for m in groups)
            logger.info("score_retrieval: %d samples in %d group(s), %d pairs to score (%s)", len(samples),
                        len(groups), total, "one image encoding per sample" if use_embeds
                        else "no encode_image/score_with_image_embeds: one image encoding per pair")

        # 3. Score (row i, text j) for this rank's rows i against every text of their group.
        def pairs():
            for g, rows in mine:
                for i in rows:
                    for j in groups[g]:
                        yield i, j

        def score(rows: List[int], texts: List[int]) -> np.ndarray:
            vis = C.to_device(C.tree_cat([visual[samples[i][0]] for i in rows]), device)
            prompts = [samples[i][1] for i in rows]
            outputs = [samples[j][2] for j in texts]
            fn = model.score_with_image_embeds if use_embeds else model.score
            s = fn(vis, prompts, outputs)
            s = s.detach().float().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, np.float64)
            if s.shape != (len(rows),):
                raise RuntimeError(f"score_retrieval: the model returned scores of shape {s.shape} for "
                                   f"{len(rows)} pairs; expected ({len(rows)},)")
            return s

        rows_out: Dict[int, np.ndarray] = {}
        for chunk in _chunks(pairs(), batch_size):
            s = score([i for i, _ in chunk], [j for _, j in chunk])
            for (i, j), v in zip(chunk, s):
                g, _ = where[i]
                if i not in rows_out:
                    rows_out[i] = np.full(len(groups[g]), np.nan)
                rows_out[i][where[j][1]] = v
        if n_calls < max_calls:
            # Under ZeRO-3 each forward gathers parameter shards from every rank, so all
            # ranks must run the same number of forwards: pad with throw-away calls.
            if not meta:
                raise RuntimeError("score_retrieval: this rank has no samples but other ranks still score; "
                                   "give every rank at least one batch")
            own = next(i for i in range(len(samples)) if samples[i][0] == meta[0][0])
            for _ in range(max_calls - n_calls):
                score([own], [own])

    # 4. Every rank assembles the same matrices from all rows.
    all_rows: Dict[int, np.ndarray] = {}
    for part in C.all_gather_object(rows_out):
        all_rows.update(part)
    sims = [np.stack([all_rows[i] for i in members]) for members in groups]
    records = []
    for g, (members, sim) in enumerate(zip(groups, sims)):
        split = samples[members[0]][3]
        records.append({"group": g, "split_idx": split, "size": len(members),
                        "sample_ids": [samples[i][0] for i in members], **retrieval_metrics(sim)})
    return retrieval_metrics_grouped(sims), records


def score_retrieval(model: Any, loader, *, device, dtype: Optional[torch.dtype] = None,
                    group_size: Optional[int] = None, batch_size: Optional[int] = None) -> Dict[str, float]:
    """Sherlock retrieval metrics from the model's likelihood of every (image+region, inference) pair.

    For each group (see :func:`build_groups`) of N validation samples, ``sim[i, j]``
    is the model's mean token log-likelihood of sample j's ``text_output`` given
    sample i's image and prompt. With ``model.encode_image(image)`` and
    ``model.score_with_image_embeds(embeds, prompt, text_output) -> Tensor[B]`` an
    N x N group costs N image encodings and N^2 language-model passes; with only
    ``model.score(image, prompt, text_output) -> Tensor[B]`` the image is repeated
    and re-encoded for every pair (N^2 image encodings as well). The leaderboard's
    23 splits of ~1000 mean ~23M pairs: pass fewer samples or set ``group_size``
    for a monitor during training.

    Memory: one image embedding (or with ``model.score`` only, one image tensor) per
    sample is kept on the CPU. Under torch.distributed each rank encodes its loader
    shard and scores the rows of its own samples; rows are then gathered.
    ``batch_size`` pairs go into each call (default: the loader's batch size).
    """
    metrics, _ = score_retrieval_detailed(model, loader, device=device, dtype=dtype,
                                          group_size=group_size, batch_size=batch_size)
    return metrics


class SherlockRetrievalTask:
    """The Sherlock leaderboard's retrieval task, scored by the model's likelihood."""

    metric_keys = RETRIEVAL_METRIC_KEYS

    def __init__(self, *, group_size: Optional[int] = None, batch_size: Optional[int] = None,
                 best_metric: str = "p_at_1"):
        check_metric_name(best_metric, RETRIEVAL_METRIC_KEYS)
        self.group_size = group_size
        self.batch_size = batch_size
        self.best_metric = best_metric

    def evaluate(self, model, loader, *, device, dtype: Optional[torch.dtype] = None,
                 synced_gpus: bool = False):
        """``(records, metrics)``: one record per group, and the leaderboard metrics.

        ``synced_gpus`` is accepted for a common signature; scoring keeps ranks in
        lockstep on its own.
        """
        metrics, records = score_retrieval_detailed(model, loader, device=device, dtype=dtype,
                                                    group_size=self.group_size, batch_size=self.batch_size)
        return records, metrics

    def best_score(self, metrics: Dict[str, float]) -> float:
        """The number that ranks checkpoints, higher is better (mean ranks count negated)."""
        return aggregate_metric(metrics, self.best_metric, lower_is_better=LOWER_IS_BETTER)
