"""What every checkpoint format shares: its error, the file names, and writing an output folder safely.

An output folder is never overwritten by surprise (:func:`check_out_dir`) and appears whole or not at all
(:func:`staged`: written beside it, then moved into place).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from engine.checkpoints.paths import COMPLETE, ENGINE_STATE  # noqa: F401  (the shared file names)

RECIPE_FILE = "recipe.yaml"
EXPORT_INFO = "export_info.json"
ADAPTER_INFO = "adapter_info.json"
TRAINED_WEIGHTS = "trained_weights.safetensors"
ADAPTER_FORMAT = "blip2-engine-lora/1"
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Where a part's peft folder goes inside an adapter folder: the LLM at the top, so that
# `PeftModel.from_pretrained(model.language_model, folder)` works on the folder itself.
PART_FOLDERS = {"llm": ".", "qformer": "qformer", "vision": "vision"}
PART_MODULES = {"llm": "language_model", "qformer": "qformer", "vision": "vision_model"}
SHOW = 20  # keys listed per kind in an error message (the count is always given)


class ExportError(ValueError):
    """The input is not what was expected (not a checkpoint, another architecture, a truncated file...)."""


def listing(keys: Sequence[str], show: int = SHOW) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - show} more" if len(keys) > show else ""
    return ", ".join(keys[:show]) + more


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers BLIP-2 model inside a DeepSpeed engine / VisionLanguageModel / itself."""
    model = getattr(model, "module", model)  # DeepSpeedEngine -> its module
    return getattr(model, "hf", model)


def check_out_dir(out_dir: str, force: bool = False, protect: Iterable[str] = ()) -> None:
    """Refuse to write into a non-empty folder unless `force`; never replace a folder holding `protect` paths."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not a folder; choose another output folder")
    for p in protect:
        if p and is_within(p, out_dir):
            raise ExportError(f"refusing to write to {out_dir}: it holds the input {p}; choose another output folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ExportError(f"{out_dir} already exists and is not empty; choose another output folder or pass "
                          f"--force to replace it")


@contextlib.contextmanager
def staged(out_dir: str, force: bool):
    """Write into a sibling temp folder and move it to `out_dir` only when everything is written."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.incomplete-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out_dir):
        if os.listdir(out_dir) and not force:  # someone wrote there meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(f"{out_dir} was filled while exporting; nothing was replaced")
        old = f"{out_dir}.replaced-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
