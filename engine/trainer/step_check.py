"""One check for non-finite gradients per optimizer step, on the gradient norm DeepSpeed computes anyway.

DeepSpeed's bf16 ZeRO-1/2 optimizer checks every gradient tensor for inf/NaN before a step
(``bf16.check_grad_overflow``, on by default): a reduction and a host read per trainable tensor, hundreds
of kernels and syncs per step. The global gradient norm it then computes (for clipping and logging) is
non-finite exactly when some gradient is, so one look at that norm is the same check. The filled
DeepSpeed config turns the per-tensor check off (engine/deepspeed_config.py) and :func:`install` wraps the
optimizer's norm: the trainer's vote (every rank's verdict on the step, docs/reliability.md) runs there,
between the norm and the update, and a non-finite verdict makes DeepSpeed skip the step as it would skip an
overflow (gradients dropped, weights, optimizer state and LR schedule untouched). The norm crosses to the
host in the same read as the vote's flag, so the step's one host read is this one; DeepSpeed gets it back
as a host scalar and reads nothing more.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Tuple

import torch
import torch.distributed as dist

# vote(norm on the device) -> (the norm as a float, skip this step)
Vote = Callable[[torch.Tensor], Tuple[float, bool]]


def install(engine, vote: Vote) -> bool:
    """Run ``vote`` on the gradient norm inside each of ``engine``'s optimizer steps; a True verdict skips the
    step. Returns False where this does not apply (no ZeRO-1/2 optimizer, or one that computes no norm):
    there DeepSpeed's own checks stay and the trainer votes on each loss instead."""
    # deepspeed loads here, not at import: the trainer package is imported before deepspeed.initialize runs.
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer) or not getattr(opt, "compute_grad_norm", True):
        return False
    norm_of = opt.scaled_global_norm
    if _plain(opt):
        norm_of = partial(fused_norm, opt)
    elif _plain(opt, offload=True):
        # CPU offload: DeepSpeed keeps each gradient's norm on the device and sums their squares on the host,
        # one read per tensor; summed on the device here, read once with the vote.
        opt.complete_grad_norm_calculation_for_cpu_offload = partial(fused_offload_norm, opt)
        if not opt.check_grad_overflow:
            # The per-tensor inf/NaN flag (a read per tensor) only feeds DeepSpeed's own overflow check, which
            # is off: the vote on the norm decides.
            opt.update_offload_overflow_tracker = _no_flag

    def checked_norm(norm_type: int = 2):
        value, skip = vote(norm_of(norm_type))
        if skip:
            # DeepSpeed's step reads this flag right after the norm: it drops the gradients and returns
            # before the update, and the engine leaves the LR schedule where it was.
            opt.overflow = True
        # A host scalar: DeepSpeed's own validity test, clipping and get_global_grad_norm read it for free
        # (a 0-d CPU tensor combines with device tensors as a plain number).
        return torch.tensor(value, dtype=torch.float32)

    opt.scaled_global_norm = checked_norm
    return True


def _plain(opt, offload: bool = False) -> bool:
    """A ZeRO-1/2 optimizer whose norm is a plain data-parallel L2 norm of fp32/bf16 gradients: no model or
    pipeline parallelism, no MoE, no loss scale (fp16), AdamW; its partitions on the device, or (``offload``)
    in host memory with the per-tensor norms on the device."""
    return (getattr(opt, "model_parallel_world_size", 1) == 1 and not getattr(opt, "has_moe_layers", False)
            and bool(opt.cpu_offload) == offload and opt.dtype != torch.float16
            and not getattr(opt, "_muon_groups", None))


def _no_flag(grad) -> None:
    return None


def fused_offload_norm(opt, params) -> torch.Tensor:
    """DeepSpeed's ``complete_grad_norm_calculation_for_cpu_offload`` without a host read per tensor: the
    norms it recorded per gradient (fp64 on the device) summed in squares on the device, then over the
    data-parallel group. A non-finite norm is -1, as DeepSpeed marks it."""
    norms = []
    for p in params:
        norm = opt.norm_for_param_grads.get(opt.get_param_id(p))
        if norm is not None:
            norms.append(norm)
        elif not opt.ignore_unused_parameters:
            raise RuntimeError("a trainable parameter got no gradient (it was not used to compute the loss); set "
                               "zero_optimization.ignore_unused_parameters or make every trainable parameter "
                               "take part in the loss")
    norm = _global_norm(opt, norms)
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, -1.0))


def fused_norm(opt, norm_type: int = 2) -> torch.Tensor:
    """The global L2 norm of the optimizer's gradient partitions, as DeepSpeed's ``scaled_global_norm`` computes
    it (each tensor's norm in fp64, summed in squares over the data-parallel group) with one multi-tensor
    kernel per group instead of a cast, a norm and a copy per gradient tensor. Non-finite stays non-finite."""
    norms = []
    for i in range(len(opt.bit16_groups)):
        grads = [g for g in (opt.averaged_gradients[i] or []) if not getattr(g, "_zero_padding", False)]
        if grads:
            norms.extend(torch._foreach_norm(grads, norm_type, dtype=torch.float64))
    return _global_norm(opt, norms)


def _global_norm(opt, norms) -> torch.Tensor:
    """sqrt of the squares of this rank's per-tensor (fp64) norms, summed on the device and over the
    data-parallel group: an fp32 scalar on the device. Non-finite stays non-finite."""
    if norms:
        total = torch.stack(norms).double().pow(2).sum().float()
    else:  # nothing of this rank's partition trains: a zero on the device the group reduces on
        # deepspeed loads here, not at import (see install); with CPU offload opt.device is the host.
        from deepspeed.accelerator import get_accelerator

        total = torch.zeros((), dtype=torch.float32, device=get_accelerator().current_device_name())
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=opt.dp_process_group)
    return total.sqrt()
