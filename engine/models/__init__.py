"""Model builders. Importing this package registers the BLIP-2 archs in `engine.registry.MODELS`:
blip2_opt, blip2_t5, blip2_vicuna_instruct, blip2_t5_instruct (each with a `tiny` model type)."""
from .blip2 import (
    ARCHS,
    IGNORE_INDEX,
    LENGTH_COUNTING,
    VisionLanguageModel,
    WeightsNotFoundError,
    build_blip2_opt,
    build_blip2_t5,
    build_blip2_t5_instruct,
    build_blip2_vicuna_instruct,
    build_vlm,
    checkpoint_image_size,
    compile_layers,
)
from .lora import DEFAULT_TARGETS, merge_lora
from .tokenizer import IMAGE_TOKEN, local_tokenizer
from .zoo import BUILDER_KEYS, ZooEntry

__all__ = [
    "ARCHS", "BUILDER_KEYS", "LENGTH_COUNTING", "checkpoint_image_size", "DEFAULT_TARGETS", "IGNORE_INDEX", "IMAGE_TOKEN", "VisionLanguageModel",
    "WeightsNotFoundError", "ZooEntry", "build_blip2_opt", "build_blip2_t5", "build_blip2_t5_instruct",
    "build_blip2_vicuna_instruct", "build_vlm", "local_tokenizer", "merge_lora",
]
