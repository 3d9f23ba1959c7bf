"""Batching samples (dicts) from the datasets."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch


def collate(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack ``image`` into one ``[B, 3, S, S]`` tensor; every other key becomes a list.

    Texts stay strings: the model side tokenizes (it knows its tokenizer and
    the label masking rules).
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
