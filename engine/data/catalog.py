"""The built-in datasets and processors, declared to `engine.registry` with what the recipe schema checks.

Light on purpose: datasets carry their option schema (engine/data/schemas.py), processors the names of
their keyword arguments; the builders (torch, torchvision, timm) are imported only when data is built.
tests/test_data.py keeps each ``params`` equal to its class's signature.
"""
from engine.data.schemas import CocoCaptionConfig, JsonlConfig, SherlockConfig
from engine.registry import DATASETS, PROCESSORS

DATASETS.declare("sherlock", "engine.data.sherlock:build_sherlock", schema=SherlockConfig,
                 prepare="engine.data.sherlock:prepare_sherlock")
DATASETS.declare("coco_caption", "engine.data.coco:build_coco_caption", schema=CocoCaptionConfig)
DATASETS.declare("jsonl", "engine.data.jsonl:build_jsonl", schema=JsonlConfig)

_TRAIN_IMAGE = ("image_size", "min_scale", "max_scale", "mean", "std", "flip", "region_tries", "normalize")
PROCESSORS.declare("blip_image_train", "engine.data.processors:BlipImageTrainProcessor", params=_TRAIN_IMAGE)
PROCESSORS.declare("blip2_image_train", "engine.data.processors:Blip2ImageTrainProcessor", params=_TRAIN_IMAGE)
PROCESSORS.declare("blip_image_eval", "engine.data.processors:BlipImageEvalProcessor",
                   params=("image_size", "mean", "std", "normalize"))
PROCESSORS.declare("blip_caption", "engine.data.processors:BlipCaptionProcessor", params=("prompt", "max_words"))
