"""What the optimizer sees: the trainable parameters in weight-decay groups (as LAVIS groups them) and the
learning-rate schedule DeepSpeed steps (engine/trainer/schedule.py)."""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from engine.config import Recipe
from engine.trainer.schedule import StepLR, lr_at


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Trainable parameters only, grouped as LAVIS does (BaseModel.get_optimizer_params): weight decay on
    every parameter of 2+ dimensions (query_tokens, embeddings and LoRA matrices included) except biases;
    none on biases, norms and other 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions parameters to 1-d shards; ds_shape keeps the real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        if ndim < 2 or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check model.freeze_* and model.lora")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_scheduler_factory(recipe: Recipe, total_steps: int, steps_per_epoch: int):
    r = recipe.run

    def fn(step: int) -> float:
        warmup_lr = r.warmup_lr if r.warmup_lr is not None else r.init_lr  # LAVIS: unset = init_lr
        return lr_at(step, sched=r.lr_sched, init_lr=r.init_lr, min_lr=r.min_lr, warmup_lr=warmup_lr,
                     warmup_steps=r.warmup_steps, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     decay_rate=r.lr_decay_rate, max_epoch=r.max_epoch, accum=r.accum_grad_iters)

    return lambda optimizer: StepLR(optimizer, fn)
