"""Learning-rate schedules, evaluated once per optimizer step.

DeepSpeed calls ``step()`` at every gradient-accumulation boundary and stores
``state_dict()`` in its checkpoints, so the schedule resumes with the run.
The class sets the learning rate directly on the optimizer's param groups, so
it works with DeepSpeed's ZeRO optimizer wrappers as well as torch optimizers.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List


def lr_at(step: int, *, sched: str, init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
          total_steps: int, steps_per_epoch: int, decay_rate: float, max_epoch: int = 1, accum: int = 1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    LAVIS's schedules (``linear_warmup_cosine_lr``, ``linear_warmup_step_lr``, ``constant_lr``) as LAVIS
    (lavis/common/optims.py) sets them: in the first epoch a linear warmup from ``warmup_lr`` over
    ``warmup_steps`` data iterations, capped at ``init_lr`` (LAVIS sets the rate before every iteration,
    so an optimizer step uses the rate of its last micro-batch); from the second epoch on one rate per
    epoch: ``min_lr + (init_lr - min_lr) * (1 + cos(pi * epoch / max_epoch)) / 2``, ``max(min_lr, init_lr *
    decay_rate ** epoch)`` or ``init_lr``. ``linear_warmup_cosine_lr_per_step``: a warmup over
    ``warmup_steps`` optimizer steps, then a cosine from ``init_lr`` to ``min_lr`` at the last step.
    """
    if sched == "linear_warmup_cosine_lr_per_step":
        if warmup_steps > 0 and step < warmup_steps:
            return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (init_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    epoch, local = divmod(step, max(1, steps_per_epoch))
    if epoch == 0:
        iteration = local * accum + accum - 1
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * iteration / max(warmup_steps, 1))
    if sched == "constant_lr":
        return init_lr
    if sched == "linear_warmup_step_lr":
        return max(min_lr, init_lr * decay_rate ** epoch)
    if sched == "linear_warmup_cosine_lr":
        return min_lr + 0.5 * (init_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / max(1, max_epoch)))
    raise ValueError(f"unknown lr_sched {sched!r}")


class StepLR:
    def __init__(self, optimizer, lr_fn: Callable[[int], float]):
        self.optimizer = optimizer
        self.lr_fn = lr_fn
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.lr_fn(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, *_args, **_kwargs) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, int]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
