"""8-bit / 4-bit base weights for the language model (bitsandbytes)."""
from __future__ import annotations

import torch

# Only the LLM is quantised: the ViT, the Q-Former and the projection stay in
# full precision (the Q-Former and projection are trained).
_SKIP = ["vision_model", "qformer", "language_projection", "lm_head"]


class QuantizationError(ValueError):
    """8/4-bit weights were asked for where they cannot work."""


def check_quantization(load_in_8bit: bool, load_in_4bit: bool, device: str) -> None:
    """Raise QuantizationError when 8/4-bit base weights cannot run on `device` ("cuda", "cpu", ...)."""
    if not (load_in_8bit or load_in_4bit):
        return
    key = "model.load_in_4bit" if load_in_4bit else "model.load_in_8bit"
    bits = 4 if load_in_4bit else 8
    if load_in_8bit and load_in_4bit:
        raise QuantizationError("choose one of model.load_in_8bit and model.load_in_4bit, not both")
    if device != "cuda":
        raise QuantizationError(
            f"{key}: {bits}-bit base weights (bitsandbytes) need a CUDA GPU; this run is on {device}. "
            f"Instead set {key}=false and keep the LLM frozen with LoRA adapters in bf16 (model.lora), "
            f"and to save GPU memory offload with ZeRO (ds_configs/zero2_offload.json or zero3_offload.json)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationError(f"{key}: {bits}-bit base weights need bitsandbytes: pip install -e .[quant]") from None


def quantization_config(load_in_8bit: bool, load_in_4bit: bool):
    """A `BitsAndBytesConfig` for from_pretrained, or None when neither is asked for."""
    if not (load_in_8bit or load_in_4bit):
        return None
    check_quantization(load_in_8bit, load_in_4bit, "cuda" if torch.cuda.is_available() else "cpu")
    from transformers import BitsAndBytesConfig  # here: only 8/4-bit runs need it (and bitsandbytes)

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_SKIP)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=_SKIP,
    )

