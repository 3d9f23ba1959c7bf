"""Evaluation tasks: captioning (generation + pycocoevalcap) and Sherlock retrieval.

Importing this package registers ``captioning`` and ``sherlock_retrieval`` in
``engine.registry.TASKS``; each is a class whose instances offer
``evaluate(model, loader, *, device, dtype=None, synced_gpus=False) -> (records, metrics)``
and ``best_score(metrics) -> float`` (higher is better).
"""
from engine.tasks.captioning import CaptioningTask, evaluate_captioning, write_predictions
from engine.tasks.metrics import CAPTION_METRIC_KEYS, aggregate_metric, caption_metrics, check_metric_name
from engine.tasks.retrieval import (
    RETRIEVAL_METRIC_KEYS,
    SherlockRetrievalTask,
    build_groups,
    retrieval_metrics,
    retrieval_metrics_grouped,
    score_retrieval,
    score_retrieval_detailed,
)

__all__ = [
    "CAPTION_METRIC_KEYS", "RETRIEVAL_METRIC_KEYS", "CaptioningTask", "SherlockRetrievalTask",
    "aggregate_metric", "build_groups", "caption_metrics", "check_metric_name", "evaluate_captioning",
    "retrieval_metrics", "retrieval_metrics_grouped", "score_retrieval", "score_retrieval_detailed",
    "write_predictions",
]
