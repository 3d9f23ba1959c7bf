"""Model builders: blip2_opt, blip2_t5, blip2_vicuna_instruct, blip2_t5_instruct (each with a `tiny` model type),
declared in `engine.registry.MODELS` by engine/models/catalog.py.

The names below load their module on first use (PEP 562), so importing a light submodule (the zoo,
the catalog) does not import transformers.
"""
import importlib

_EXPORTS = {
    "IGNORE_INDEX": "wrapper", "LENGTH_COUNTING": "wrapper", "VisionLanguageModel": "wrapper", "WeightsNotFoundError": "blip2",
    "build_blip2_opt": "blip2", "build_blip2_t5": "blip2", "build_blip2_t5_instruct": "blip2",
    "build_blip2_vicuna_instruct": "blip2", "build_vlm": "blip2", "build_text_inputs": "blip2",
    "compile_layers": "blip2",
    "DEFAULT_TARGETS": "lora", "merge_lora": "lora",
    "IMAGE_TOKEN": "tokenizer", "local_tokenizer": "tokenizer",
    "ARCHS": "zoo", "BUILDER_KEYS": "zoo", "ZooEntry": "zoo", "checkpoint_image_size": "zoo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
