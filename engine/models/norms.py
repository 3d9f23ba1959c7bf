"""RMS norms of T5 and LLaMA with a backward of their own.

Flan-T5-XL has 122 of these norms and Vicuna-7B 65. Autograd differentiates transformers' forward
(`to(float32)`, `pow`, `mean`, `add`, `rsqrt`, `mul`, `to(dtype)`, `mul`) op by op: about 16 kernels per
norm in backward, and an fp32 copy of the norm's input kept for it. `RMSNormFunction` computes the same
forward with the same ops in the same order (bitwise the same output) and differentiates the whole norm
at once: the gradient of y = x * r, r = (mean(x^2) + eps)^-1/2, is r * (g - x * r^2 * mean(g * x)), in
fp32, in 6 kernels plus the casts, and it keeps the input in its own dtype.

The modules stay transformers' classes (their weights, names and `isinstance` checks are unchanged): each
norm's class becomes a subclass whose forward calls the function (`use_lean_rms_norms`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

_HALF = (torch.float16, torch.bfloat16)


class RMSNormFunction(torch.autograd.Function):
    """weight * cast(x * rsqrt(mean(x^2, -1) + eps)), computed in fp32; ``cast`` to ``dtype`` when given."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: Optional[torch.dtype]):
        r = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
        y = x * r  # promotes to fp32, as transformers' forward does
        if dtype is not None:
            y = y.to(dtype)
        ctx.save_for_backward(x, weight, r)
        ctx.dtype = dtype
        return weight * y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xf = x.to(torch.float32)
        g = (grad * weight).to(torch.float32)  # the gradient of y
        # d/dx [x r] = r g - x r^3 mean(g x)
        coef = (g * xf).mean(-1, keepdim=True) * r.pow(2)
        grad_x = torch.addcmul(g, xf, coef, value=-1.0).mul_(r).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            y = xf * r if ctx.dtype is None else (xf * r).to(ctx.dtype)
            grad_w = (grad * y).reshape(-1, y.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None, None


class LeanT5LayerNorm(T5LayerNorm):
    """T5LayerNorm whose backward is `RMSNormFunction`'s (same weights, same output)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # T5 casts the normalised value to the weight's dtype when that is a half type.
        dtype = self.weight.dtype if self.weight.dtype in _HALF else None
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, dtype)


class LeanLlamaRMSNorm(LlamaRMSNorm):
    """LlamaRMSNorm whose backward is `RMSNormFunction`'s (same weights, same output)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # LLaMA casts the normalised value back to the input's dtype.
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, hidden_states.dtype)


_LEAN = {T5LayerNorm: LeanT5LayerNorm, LlamaRMSNorm: LeanLlamaRMSNorm}


def use_lean_rms_norms(model: nn.Module) -> int:
    """Give every T5 / LLaMA RMS norm in ``model`` the one-function backward; returns how many changed."""
    n = 0
    for module in model.modules():
        lean = _LEAN.get(type(module))
        if lean is not None:
            module.__class__ = lean
            n += 1
    return n
