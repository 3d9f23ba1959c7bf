"""Datasets, processors, region rendering, collate and samplers.

Importing this package registers the ``sherlock`` dataset and the LAVIS-named
processors (``blip_image_train``, ``blip2_image_train``, ``blip_image_eval``,
``blip_caption``).
"""
from . import collate, errors, processors, region, sampler, sherlock, synthetic  # noqa: F401  (registration)
from .collate import collate as collate_fn  # noqa: F401
from .errors import DatasetError  # noqa: F401
from .region import REGION_MODES, render_region  # noqa: F401
from .sampler import ExactDistributedSampler  # noqa: F401
from .sherlock import SherlockConfig, SherlockDataset, build_sherlock, url_to_path  # noqa: F401
from .synthetic import make_tiny_sherlock  # noqa: F401
