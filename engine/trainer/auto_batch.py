"""``run.batch_size_train: auto`` on a GPU: the planner's micro batch, checked by one real step's memory.

The planner (engine.memory.resolve_auto_batch) predicts the largest micro batch that fits; `check_micro_batch`
measures it. It runs after deepspeed.initialize, when the model states are allocated as they will stay:
each rank runs the model's forward and backward on a synthetic batch of that size, images at the ViT's size
and every text at the longest the recipe allows (max_txt_len, max_output_txt_len), with the gradients taken
by torch.autograd.grad, so DeepSpeed's gradient hooks do not fire, no optimizer state changes and nothing
is trained. The micro batch passes when it runs and its peak, plus what DeepSpeed adds at a real step (the
fp32 gradient partition and the reduction buckets, from the plan) and the allocator's and CUDA's share,
fits the GPU. Otherwise the next smaller divisor of the rank's share of run.global_batch_size is tried,
accumulation making up the rest (the global batch, hence the schedule, stays as the recipe says). The ranks
take the smallest result (one all_reduce) and DeepSpeed's micro batch and accumulation are set to it.

Only under ZeRO-1/2 on CUDA: under ZeRO-3 the bare forward would need DeepSpeed's parameter gathering, so
the plan stands there (said in the log). The fault ``ENGINE_FAULT=auto_batch_oom:<n>`` makes every micro
batch above n run out of memory, on any device: the tests' way through the search on a CPU.
"""
from __future__ import annotations

import gc
from typing import Callable, List, Optional, Tuple

import torch

from engine.config import ConfigError, Problem, Recipe
from engine.faults import fault
from engine.memory import CUDA_CONTEXT_GB, FRAGMENTATION, GIB, plan

# Texts long enough to reach every truncation limit of the recipes (a few hundred tokens at most).
_LONG_TEXT = " ".join(["the"] * 1024)


def probe_batch(model, batch: int, device) -> Tuple[torch.Tensor, dict]:
    """A synthetic micro batch of ``batch`` samples at the model's image size and longest texts."""
    size = model.image_size
    pixels = torch.zeros(batch, 3, size, size, device=device)
    inputs = model.build_inputs([_LONG_TEXT] * batch, [_LONG_TEXT] * batch, device, lean=True)
    return pixels, inputs


def forward_backward_peak(model, batch: int, device) -> Optional[int]:
    """Peak bytes allocated on ``device`` by one forward and backward of ``batch`` samples (None off CUDA).
    Raises torch.cuda.OutOfMemoryError when it does not fit."""
    limit = fault("auto_batch_oom")
    if limit is not None and batch > int(limit):
        raise torch.cuda.OutOfMemoryError(f"ENGINE_FAULT auto_batch_oom:{limit}: micro batch {batch}")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    params = [p for p in model.parameters() if p.requires_grad]
    pixels, inputs = probe_batch(model, batch, device)
    loss = model(pixels, inputs=inputs)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    del loss, grads, pixels, inputs
    if not on_cuda:
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def step_extra_bytes(recipe: Recipe, world: int, gpu_mem_gb: float) -> int:
    """What a real step adds to the probe's peak: DeepSpeed's fp32 gradient partition and its buckets."""
    p = plan(recipe, world, gpu_mem_gb, suggest=False)
    trainable = p.params["all"]["trainable"]
    return int(4 * trainable / world + p.breakdown_gb.get("ds_buffers", 0.0) * GIB)


def search_micro_batch(candidates: List[int], fits: Callable[[int], Tuple[bool, str]]) -> Tuple[int, List[str]]:
    """The first of ``candidates`` (largest first) for which ``fits`` says yes, and what was tried."""
    tried = []
    for b in candidates:
        ok, why = fits(b)
        tried.append(f"{b}: {why}")
        if ok:
            return b, tried
    return 0, tried


def check_micro_batch(engine, recipe: Recipe, world: int, gpu_mem_gb: Optional[float], zero_stage: int,
                      log: Callable[[str], None]) -> bool:
    """Check the planner's ``run.batch_size_train`` (already resolved from auto) on this device and step it
    down until it fits; sets run.batch_size_train / run.accum_grad_iters and DeepSpeed's micro batch and
    accumulation. Returns whether they changed. A micro batch of 1 that does not fit is a ConfigError."""
    r = recipe.run
    model = engine.module
    device = next(model.parameters()).device
    forced = fault("auto_batch_oom") is not None
    if not forced and (device.type != "cuda" or gpu_mem_gb is None):
        return False
    if zero_stage == 3:
        log(f"run.batch_size_train: auto: micro batch {r.batch_size_train} from the plan (ZeRO-3: not measured)")
        return False
    per_rank = r.batch_size_train * r.accum_grad_iters
    candidates = [b for b in range(r.batch_size_train, 0, -1) if per_rank % b == 0]
    budget = (gpu_mem_gb or 0.0) * GIB
    # What a step adds does not depend on the micro batch; only a CUDA peak is compared with the budget.
    extra = step_extra_bytes(recipe, world, gpu_mem_gb) if device.type == "cuda" else 0

    def fits(b: int) -> Tuple[bool, str]:
        was_training = model.training
        model.train()
        try:
            peak = forward_backward_peak(model, b, device)
        except torch.cuda.OutOfMemoryError:
            return False, "out of memory"
        finally:
            model.train(was_training)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if peak is None:
            return True, "ran"
        need = peak * (1 + FRAGMENTATION) + CUDA_CONTEXT_GB * GIB + extra
        ok = need <= budget
        return ok, f"peak {peak / GIB:.2f} GiB, a step needs {need / GIB:.2f} of {budget / GIB:.2f} GiB"

    micro, tried = search_micro_batch(candidates, fits)
    if torch.distributed.is_initialized() and world > 1:
        agreed = torch.tensor([micro], device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        micro = int(agreed.item())
    if micro == 0:
        raise ConfigError([Problem("run.batch_size_train", f"auto: not even a micro batch of 1 fits this GPU "
                                   f"({'; '.join(tried)}); see python tools/plan_memory.py --recipe "
                                   f"{recipe.source} for changes that fit")], recipe.source)
    changed = micro != r.batch_size_train
    planned = r.batch_size_train
    r.batch_size_train, r.accum_grad_iters = micro, per_rank // micro
    if changed:
        engine.set_train_micro_batch_size(micro)
        engine.set_train_batch_size(micro * r.accum_grad_iters * world)
    log(f"run.batch_size_train: auto: micro batch {micro} x {r.accum_grad_iters} accumulation "
        f"(planned {planned}; measured {'; '.join(tried)})")
    return changed
