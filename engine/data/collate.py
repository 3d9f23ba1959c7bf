"""Batching samples (dicts) from the datasets."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch


def collate(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack ``image`` into one ``[B, 3, S, S]`` tensor; every other key becomes a list.

    Texts stay strings; :class:`WithTextInputs` adds the model's tensors for them.
    """
    if not samples:
        raise ValueError("collate got an empty batch")
    keys = list(samples[0])
    for i, s in enumerate(samples[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"sample {i} of the batch has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    batch: Dict[str, Any] = {}
    for k in keys:
        values: List[Any] = [s[k] for s in samples]
        batch[k] = torch.stack(values) if k == "image" else values
    return batch


class WithTextInputs:
    """A collate function that also turns each batch's ``prompt`` and ``text_output`` into the model's tensors
    (``batch["inputs"]``: token ids, masks and labels, padded), so tokenising, truncation, padding and label
    masking run in the DataLoader workers instead of the training step. ``build(prompts, targets)`` comes
    from the model side (its tokenizer and LAVIS's masking rules); it must be picklable for spawned workers.
    """

    def __init__(self, build: Callable[[List[str], List[str]], Dict[str, Any]]):
        self.build = build

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        batch = collate(samples)
        batch["inputs"] = self.build(batch["prompt"], batch["text_output"])
        return batch
