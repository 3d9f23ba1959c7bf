"""Evaluation tasks: captioning (generation + pycocoevalcap) and Sherlock retrieval.

``captioning`` and ``sherlock_retrieval`` are declared in ``engine.registry.TASKS`` by
engine/tasks/catalog.py; each is a class whose instances offer
``evaluate(model, loader, *, device, dtype=None, synced_gpus=False) -> (records, metrics)``
and ``best_score(metrics) -> float`` (higher is better). The names below load their module on first
use (PEP 562), so importing the light metric names does not import torch.
"""
import importlib

_EXPORTS = {
    "CaptioningTask": "captioning", "evaluate_captioning": "captioning", "write_predictions": "captioning",
    "CAPTION_METRIC_KEYS": "metrics", "RETRIEVAL_METRIC_KEYS": "metrics", "aggregate_metric": "metrics",
    "caption_metrics": "metrics", "check_metric_name": "metrics",
    "SherlockRetrievalTask": "retrieval", "build_groups": "retrieval", "retrieval_metrics": "retrieval",
    "retrieval_metrics_grouped": "retrieval", "score_retrieval": "retrieval", "score_retrieval_detailed": "retrieval",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
