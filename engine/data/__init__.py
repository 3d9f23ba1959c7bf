"""Datasets, processors, region rendering, collate, samplers, mixing and dataset checks.

The ``sherlock``, ``coco_caption`` and ``jsonl`` datasets and the LAVIS-named processors
(``blip_image_train``, ``blip2_image_train``, ``blip_image_eval``, ``blip_caption``) are declared in
`engine.registry` by engine/data/catalog.py. The names below load their module on first use (PEP 562),
so importing a light submodule (the schemas, the catalog) does not import torch.
"""
import importlib

_EXPORTS = {
    "CocoCaptionConfig": "schemas", "JsonlConfig": "schemas", "SherlockConfig": "schemas",
    "CocoCaptionDataset": "coco", "build_coco_caption": "coco",
    "JsonlDataset": "jsonl", "build_jsonl": "jsonl",
    "SherlockDataset": "sherlock", "build_sherlock": "sherlock", "url_to_path": "sherlock",
    "collate_fn": "collate:collate",
    "BadRecord": "errors", "DatasetError": "errors",
    "MixedDataset": "mixing",
    "REGION_MODES": "schemas", "render_region": "region",
    "ExactDistributedSampler": "sampler", "MixedDistributedSampler": "sampler", "training_sampler": "sampler",
    "make_tiny_sherlock": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr or name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
