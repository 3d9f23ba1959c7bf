"""Datasets, processors, region rendering, collate, samplers, mixing and dataset checks.

Importing this package registers the ``sherlock``, ``coco_caption`` and ``jsonl``
datasets and the LAVIS-named processors (``blip_image_train``,
``blip2_image_train``, ``blip_image_eval``, ``blip_caption``).
"""
from . import collate, errors, processors, region, sampler, sherlock, synthetic  # noqa: F401  (registration)
from . import coco, jsonl  # noqa: F401  (registration)
from .coco import CocoCaptionConfig, CocoCaptionDataset, build_coco_caption  # noqa: F401
from .collate import collate as collate_fn  # noqa: F401
from .errors import BadRecord, DatasetError  # noqa: F401
from .jsonl import JsonlConfig, JsonlDataset, build_jsonl  # noqa: F401
from .mixing import MixedDataset  # noqa: F401
from .region import REGION_MODES, render_region  # noqa: F401
from .sampler import ExactDistributedSampler, MixedDistributedSampler, training_sampler  # noqa: F401
from .sherlock import SherlockConfig, SherlockDataset, build_sherlock, url_to_path  # noqa: F401
from .synthetic import make_tiny_sherlock  # noqa: F401
