"""Captioning / inference generation: generate on every rank, gather, de-duplicate, score.

Works the same in one plain process and under torch.distributed (DeepSpeed or
not). Each rank generates for the shard its loader gives it; the results of all
ranks are gathered, de-duplicated by ``sample_id`` (a DistributedSampler pads the
last shard with repeats) and sorted, so every rank returns the same list. Metrics
are computed once, on rank 0, and broadcast, so every rank can take the same
best-checkpoint decision.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from engine.tasks import _common as C
from engine.tasks.metrics import CAPTION_METRIC_KEYS, aggregate_metric, caption_metrics, check_metric_name

logger = logging.getLogger(__name__)

CAPTION_BATCH_KEYS = ("image", "prompt", "sample_id", "image_id")


def _lockstep_batches(loader, synced_gpus: bool) -> Optional[int]:
    """With ``synced_gpus`` every rank must call ``generate`` equally often (ZeRO-3
    gathers parameters inside each forward): the largest per-rank batch count."""
    if not synced_gpus or C.world_size() == 1:
        return None
    try:
        n = len(loader)
    except TypeError:
        logger.warning("evaluate_captioning: the loader has no len(); cannot check that all ranks run the same "
                       "number of generate calls (with synced_gpus a mismatch hangs)")
        n = -1
    counts = C.all_gather_object(n)
    return None if min(counts) < 0 else max(counts)


def evaluate_captioning(
    model: Any,
    loader,
    *,
    device,
    dtype: Optional[torch.dtype] = None,
    num_beams: int = 5,
    max_len: int = 30,
    min_len: int = 1,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    synced_gpus: bool = False,
    spice: bool = False,
    length_counting: str = "lavis",
) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, float]]]:
    """Generate a caption for every sample of ``loader`` and score them.

    ``model.generate(image, prompt, num_beams=, max_len=, min_len=, repetition_penalty=,
    length_penalty=, synced_gpus=) -> list[str]``. Batches are dicts with ``image``,
    ``prompt``, ``sample_id``, ``image_id`` and ``references`` (list of reference
    captions per sample; without it, ``text_output`` is the single reference).
    Images are cast to ``dtype`` (default: the model's dtype).

    Returns ``(records, metrics)``: records are COCO-results entries
    ``{"image_id", "caption", "sample_id"}``, one per unique sample, sorted by
    sample_id, the same on every rank; metrics are those of :func:`caption_metrics`
    keyed by sample id (several Sherlock samples share an image), identical on
    every rank, or None when no sample has references (e.g. a test split).
    """
    dtype = C.resolve_dtype(model, dtype)
    gen_kwargs = dict(num_beams=num_beams, max_len=max_len, min_len=min_len,
                      repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                      synced_gpus=synced_gpus, length_counting=length_counting)
    local: List[Tuple[Dict[str, Any], List[str]]] = []
    with C.eval_mode(model):
        target = _lockstep_batches(loader, synced_gpus)
        done, last = 0, None
        for batch in loader:
            C.check_batch(batch, CAPTION_BATCH_KEYS, "evaluate_captioning")
            image = C.to_device(batch["image"], device, dtype)
            prompts = list(batch["prompt"])
            captions = model.generate(image, prompts, **gen_kwargs)
            done, last = done + 1, (image, prompts)
            ids = list(batch["sample_id"])
            if len(captions) != len(ids):
                raise RuntimeError(f"evaluate_captioning: model.generate returned {len(captions)} captions for a "
                                   f"batch of {len(ids)} samples")
            refs = batch.get("references")
            if refs is None:
                refs = [[t] for t in batch["text_output"]] if "text_output" in batch else [[] for _ in ids]
            for k, sid in enumerate(ids):
                record = {"image_id": batch["image_id"][k], "caption": captions[k], "sample_id": sid}
                local.append((record, [r for r in refs[k]]))
        if target is not None and done < target:
            # ZeRO-3 + synced_gpus: the other ranks still run forwards that need our
            # parameter shards, so keep generating (and discard) until all are done.
            if last is None:
                raise RuntimeError("evaluate_captioning: this rank's loader is empty but other ranks have "
                                   "batches; with synced_gpus every rank needs at least one batch")
            for _ in range(target - done):
                model.generate(*last, **gen_kwargs)

    records, references = [], {}
    for part in C.all_gather_object(local):
        for record, refs in part:
            sid = record["sample_id"]
            if sid in references:  # a padding repeat: keep the first occurrence
                continue
            references[sid] = refs
            records.append(record)
    records.sort(key=lambda r: r["sample_id"])

    with_refs = sum(1 for r in references.values() if r)
    if not records or with_refs == 0:
        logger.info("evaluate_captioning: %d predictions, no references; metrics skipped", len(records))
        return records, None
    predictions = {r["sample_id"]: r["caption"] for r in records}
    metrics = C.run_on_rank0_and_share(lambda: caption_metrics(predictions, references, spice=spice))
    return records, metrics


def write_predictions(records: List[Dict[str, Any]], path: str) -> str:
    """Write COCO-results JSON atomically (a reader never sees half a file). Call on one rank."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class CaptioningTask:
    """Generation with beam search, scored with pycocoevalcap.

    ``best_metric`` (a key or a sum such as ``CIDEr+Bleu_4``, LAVIS's choice) is
    checked here, before any model is built.
    """

    def __init__(self, *, num_beams: int = 5, max_len: int = 30, min_len: int = 1,
                 repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                 spice: bool = False, best_metric: str = "CIDEr+Bleu_4", length_counting: str = "lavis"):
        self.gen = dict(num_beams=num_beams, max_len=max_len, min_len=min_len,
                        repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                        length_counting=length_counting)
        self.spice = spice
        self.metric_keys = CAPTION_METRIC_KEYS + (("SPICE",) if spice else ())
        check_metric_name(best_metric, self.metric_keys)
        self.best_metric = best_metric

    def evaluate(self, model, loader, *, device, dtype: Optional[torch.dtype] = None,
                 synced_gpus: bool = False):
        """``(records, metrics)``; see :func:`evaluate_captioning`."""
        return evaluate_captioning(model, loader, device=device, dtype=dtype, synced_gpus=synced_gpus,
                                   spice=self.spice, **self.gen)

    def best_score(self, metrics: Dict[str, float]) -> float:
        """The number that ranks checkpoints (higher is better)."""
        return aggregate_metric(metrics, self.best_metric)
