"""The built-in evaluation tasks, declared to `engine.registry.TASKS` with their metric names.

Light on purpose: the recipe schema checks ``run.best_metric`` against ``metric_keys(run)`` with
``check_metric`` (engine/tasks/metrics.py, no heavy imports); the task classes (torch, scipy,
pycocoevalcap) are imported only when a task is built.
"""
from engine.registry import TASKS
from engine.tasks.metrics import CAPTION_METRIC_KEYS, RETRIEVAL_METRIC_KEYS, check_metric_name


def caption_metric_keys(run) -> tuple:
    """The captioning task's metric names for a run (SPICE only when ``run.spice`` is on)."""
    return CAPTION_METRIC_KEYS + (("SPICE",) if run.spice else ())


def retrieval_metric_keys(run) -> tuple:
    return RETRIEVAL_METRIC_KEYS


TASKS.declare("captioning", "engine.tasks.captioning:CaptioningTask", metric_keys=caption_metric_keys,
              check_metric=check_metric_name)
TASKS.declare("sherlock_retrieval", "engine.tasks.retrieval:SherlockRetrievalTask",
              metric_keys=retrieval_metric_keys, check_metric=check_metric_name)
