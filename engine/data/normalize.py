"""Normalising uint8 image batches on the device.

Training image processors return ``uint8 [3, S, S]`` images (``normalize=False``,
which engine/build.py sets for the train slot): a quarter of the bytes of
float32 through worker queues, pinned memory and the host-to-device copy, and no
float work in the workers. The trainer wraps its training DataLoader with
:func:`on_device`, the one place where those batches get the processor's
mean/std. Float batches (processors left at ``normalize=True``) pass through.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .processors import ImageProcessor, normalize_uint8

Stats = Tuple[Tuple[float, ...], Tuple[float, ...]]


def _leaves(dataset) -> List[Any]:
    """The datasets behind wrappers (``.dataset``) and concatenations (``.datasets``)."""
    if hasattr(dataset, "datasets"):
        return [leaf for d in dataset.datasets for leaf in _leaves(d)]
    if hasattr(dataset, "dataset"):
        return _leaves(dataset.dataset)
    return [dataset]


def image_stats(dataset) -> Optional[Stats]:
    """``(mean, std)`` of the image processors that return uint8 in ``dataset``; None if none does."""
    found = set()
    for leaf in _leaves(dataset):
        proc = getattr(leaf, "vis_processor", None)
        if isinstance(proc, ImageProcessor) and not proc.normalize:
            found.add((tuple(proc.mean), tuple(proc.std)))
    if len(found) > 1:
        raise ValueError(f"the datasets of one split normalise images differently ({sorted(found)}); give their "
                         f"vis_processor the same mean and std")
    return next(iter(found)) if found else None


def normalize_batch(batch: Dict[str, Any], stats: Optional[Stats], device: torch.device) -> Dict[str, Any]:
    """Move ``batch["image"]`` to ``device``; a uint8 image becomes float32, normalised with ``stats``."""
    image = batch["image"].to(device, non_blocking=True)
    if image.dtype == torch.uint8:
        if stats is None:
            raise ValueError("a batch holds uint8 images but no dataset's image processor says how to normalise "
                             "them (set normalize: true on the processor, or use a registered image processor)")
        image = normalize_uint8(image, *stats)
    batch["image"] = image
    return batch


class DeviceNormalizedLoader:
    """Iterates ``loader``; each batch's images arrive on ``device``, normalised. Other attributes pass through."""

    def __init__(self, loader, stats: Optional[Stats], device: torch.device):
        self.loader = loader
        self.stats = stats
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for batch in self.loader:
            yield normalize_batch(batch, self.stats, self.device)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)


def on_device(loader, dataset, device) -> DeviceNormalizedLoader:
    """Wrap a DataLoader over ``dataset`` so its batches come out normalised on ``device``."""
    return DeviceNormalizedLoader(loader, image_stats(dataset), device)
