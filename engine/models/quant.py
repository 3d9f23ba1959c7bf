"""8-bit / 4-bit base weights for the language model (bitsandbytes)."""
from __future__ import annotations

import torch

# Only the LLM is quantised: the ViT, the Q-Former and the projection stay in
# full precision (the Q-Former and projection are trained).
_SKIP = ["vision_model", "qformer", "language_projection", "lm_head"]


def quantization_config(load_in_8bit: bool, load_in_4bit: bool):
    """A `BitsAndBytesConfig` for from_pretrained, or None when neither is asked for."""
    if not (load_in_8bit or load_in_4bit):
        return None
    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of model.load_in_8bit and model.load_in_4bit, not both")
    if not torch.cuda.is_available():
        raise ValueError(
            "8/4-bit base weights need a CUDA GPU with bitsandbytes; on CPU use load_in_8bit: false "
            "(and load_in_4bit: false) and LoRA in bf16"
        )
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_SKIP)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=_SKIP,
    )

