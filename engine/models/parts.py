"""Which part of a BLIP-2 model a parameter belongs to, and gathering ZeRO-3 parameters: shared by the
model wrapper, the checkpoint formats and the memory planner."""
from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import List, Optional

from torch import nn

LN_VISION = "vision_model.post_layernorm."  # LAVIS's ln_vision


def part_of(name: str) -> str:
    """Which part of a BLIP-2 model a parameter name (relative to the HF model) belongs to."""
    if "lora_" in name:
        return "lora"
    if name.startswith("vision_model.") and not name.startswith(LN_VISION):
        return "vision"
    if name.startswith(("qformer.", "query_tokens", "language_projection.", LN_VISION)):
        # The projection trains with the Q-Former, as in BLIP-2; so does the ViT's output norm (LAVIS's
        # ln_vision): LAVIS's freeze_vit freezes `visual_encoder` only.
        return "qformer"
    return "llm"


def gathered(params: List[nn.Parameter], modifier_rank: Optional[int] = None):
    """Gather ZeRO-3 partitioned parameters for use outside their module's forward; no-op otherwise."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed  # here, not at the top: only a ZeRO-3 model (already under deepspeed) gets this far

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def cast_parameters(module: nn.Module, dtype) -> None:
    """Cast ``module``'s parameters to ``dtype`` in place, as DeepSpeed casts a model: parameters only (fp32
    buffers such as rotary tables stay); nothing when ZeRO-3 has partitioned them (they are cast there)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return
    for p in params:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def used_outside_its_module(module: nn.Module, param: nn.Parameter) -> None:
    """Tell ZeRO-3 that ``module``'s forward uses ``param``, which another module owns: it is gathered for that
    forward (DeepSpeed's register_external_parameter). Only with DeepSpeed loaded: without it nothing can
    partition the model (a tool that only runs inference does not load it for this)."""
    if "deepspeed" not in sys.modules:
        return
    import deepspeed  # loaded already (checked above): this only binds the name

    deepspeed.zero.register_external_parameter(module, param)
