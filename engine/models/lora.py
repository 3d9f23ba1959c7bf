"""LoRA on parts of a BLIP-2 model with peft.

peft is applied to each chosen part (by default only the language model), not
to the whole BLIP-2 model: `get_peft_model` on the whole model would freeze
the Q-Former and the projection, which BLIP-2 finetuning trains. Adapters are
injected in place (`inject_adapter_in_model`), so module paths and the
wrapper's forward stay as they are; `merge_lora` folds them back in.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

# Attention projections LoRA adapts by default, per part and LLM family.
DEFAULT_TARGETS = {
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "qformer": ["query", "value"],
    "vision": ["qkv"],
}
PARTS = ("llm", "qformer", "vision")
LORA_KEYS = ("r", "alpha", "dropout", "target", "on")


def lora_targets(part: str, family: str, target: Any) -> List[str]:
    """Module names to adapt in `part`. `target` is a list (for the LLM) or a dict part -> list."""
    if isinstance(target, dict):
        target = target.get(part)
    elif part != "llm":
        target = None  # a plain list names LLM modules; other parts use their defaults
    if target:
        return list(target)
    return DEFAULT_TARGETS[family if part == "llm" else part]


def apply_lora(parts: Dict[str, nn.Module], family: str, lora: Dict[str, Any],
               dtype: Optional[torch.dtype] = None) -> List[str]:
    """Inject LoRA adapters into the modules of `parts` named by `lora["on"]` (default ["llm"]).

    Returns the parts that got adapters. Their base weights are frozen by the caller.
    """
    # peft here, not at the top: it is loaded only when a recipe asks for LoRA.
    from peft import LoraConfig, inject_adapter_in_model

    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"unknown lora key(s) {unknown}; allowed: {list(LORA_KEYS)}")
    on = list(lora.get("on") or ["llm"])
    bad = [p for p in on if p not in PARTS]
    if bad:
        raise ValueError(f"lora.on has {bad}; allowed parts: {list(PARTS)}")
    for part in on:
        cfg = LoraConfig(
            r=int(lora.get("r", 8)),
            lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.0)),
            target_modules=lora_targets(part, family, lora.get("target")),
            bias="none",
        )
        inject_adapter_in_model(cfg, parts[part])
        if dtype is not None:
            # peft creates adapters in fp32; DeepSpeed bf16/fp16 expects one dtype per model.
            for name, p in parts[part].named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(dtype)
    return on


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter in `model` into its base layer and remove it. Returns how many."""
    from peft.tuners.lora import LoraLayer  # here, not at the top: peft loads only for LoRA models

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
            merged += 1
    return merged
