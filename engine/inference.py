"""Inference on single images with a trained model, prepared exactly as the model saw its data.

The model comes from an exported folder (tools/export_hf.py, tools/merge_lora.py, tools/import_lavis.py:
a Hugging Face folder with recipe.yaml), an engine checkpoint, or an adapter folder. The saved recipe
says how the region is drawn (``datasets.<name>.region``), which text mode was trained (``text``; with
``clue_in_prompt`` the clue goes in the prompt) and which eval image processor and prompt were used.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from PIL import Image

from engine.build import build_data_processor, build_model, model_image_size
from engine.checkpoints.common import RECIPE_FILE, ExportError
from engine.checkpoints.engine_checkpoint import is_checkpoint, parse_saved_recipe
from engine.checkpoints.lora import adapter_recipe, apply_adapter, is_adapter_folder, lora_parts, merge_parts
from engine.data.processors import BlipCaptionProcessor
from engine.data.region import render_region
from engine.export import load_checkpoint_model

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(path: str, *, dtype: str = "fp32", device: Optional[str] = None):
    """``(model, recipe)`` for `path`: an exported folder, an engine checkpoint or an adapter folder.

    The model is in eval mode on `device` (default: cuda if present, else cpu) with LoRA merged.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    if os.path.isfile(os.path.join(path, "config.json")):
        recipe_file = os.path.join(path, RECIPE_FILE)
        if not os.path.isfile(recipe_file):
            raise ExportError(f"{path} has no {RECIPE_FILE}; export the model with tools/export_hf.py (or import "
                              f"it with tools/import_lavis.py), which write it")
        with open(recipe_file, "r", encoding="utf-8") as f:
            recipe_dict = yaml.safe_load(f)
        m = recipe_dict.setdefault("model", {})
        # The weights are in this folder (wherever it was moved to); adapters, if any, in adapter/.
        m.update(pretrained=os.path.abspath(path), load_finetuned=False, finetuned=None, lora=None)
        model = build_model(parse_saved_recipe(recipe_dict, source=recipe_file))
        adapter = os.path.join(path, "adapter")
        if os.path.isdir(adapter):
            apply_adapter(model, adapter)
    elif is_checkpoint(path):
        model, recipe_dict, _ = load_checkpoint_model(path)
        if lora_parts(model.hf):
            merge_parts(model.hf)
    elif is_adapter_folder(path):
        recipe_dict = adapter_recipe(path)
        if recipe_dict is None:
            raise ExportError(f"{path} is an adapter folder without a recipe; merge it first with "
                              f"tools/merge_lora.py --recipe ... and pass the merged folder")
        base = copy.deepcopy(recipe_dict)
        base["model"]["lora"] = None
        model = build_model(parse_saved_recipe(base, source=path))
        apply_adapter(model, path)
    else:
        raise ExportError(f"{path} is neither an exported model folder (config.json + {RECIPE_FILE}), an engine "
                          f"checkpoint (checkpoints/<tag>) nor an adapter folder")
    if dtype == "fp16" and model.family == "t5":
        raise ValueError("Flan-T5 overflows in fp16; use --dtype bf16 or fp32")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(device=device, dtype=_DTYPES[dtype])
    return model, parse_saved_recipe(recipe_dict, source=path)


@dataclass
class DataSettings:
    """How the recipe's (first) dataset turns a record into model inputs."""

    dataset: str
    region: Optional[str]  # None: the dataset has no regions
    crop_margin: float
    text: Optional[str]  # Sherlock text mode, None for other datasets
    vis_processor: Any
    text_processor: Any


def data_settings(recipe) -> DataSettings:
    if not recipe.datasets:
        raise ExportError("the recipe has no dataset section; it cannot say how images were prepared")
    name = "sherlock" if "sherlock" in recipe.datasets else next(iter(recipe.datasets))
    spec = recipe.datasets[name]
    opts = spec.options
    vis = build_data_processor(spec.vis_processor.get("eval"), "blip_image_eval", model_image_size(recipe))
    text = build_data_processor(spec.text_processor.get("eval"), None, None)
    return DataSettings(dataset=name, region=getattr(opts, "region", None),
                        crop_margin=float(getattr(opts, "crop_margin", 0.1)), text=getattr(opts, "text", None),
                        vis_processor=vis, text_processor=text)


def build_prompt(recipe, settings: DataSettings, prompt: Optional[str] = None,
                 clue: Optional[str] = None) -> Tuple[str, List[str]]:
    """The prompt as the dataset builds it (see SherlockDataset: ``clue_in_prompt`` puts
    ``"clue: " + clean(clue without its final full stop) + ". "`` before the model prompt).
    Returns ``(prompt, notes)``."""
    notes: List[str] = []
    base = recipe.model.prompt if prompt is None else prompt
    if settings.text == "clue_in_prompt":
        if not clue:
            raise ValueError("this model was trained with the clue in the prompt (text: clue_in_prompt); pass --clue")
        tp = settings.text_processor
        clean = tp.pre_caption if isinstance(tp, BlipCaptionProcessor) else (tp or (lambda s: s))
        return f"clue: {clean(clue.rstrip('. '))}. {base}", notes
    if clue:
        notes.append(f"--clue is ignored: the model was trained with text mode {settings.text!r}, where the clue is "
                     f"not part of the prompt")
    return base, notes


def parse_box(text: str) -> Tuple[float, float, float, float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        left, top, width, height = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--region {text!r}: expected left,top,width,height in pixels, e.g. 10,20,200,300") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"--region {text!r}: width and height must be positive")
    return left, top, width, height


def prepare_image(image, boxes: Sequence[Sequence[float]], settings: DataSettings) -> torch.Tensor:
    """Draw the region as training did (the recipe's region mode), then the eval image transform."""
    image = image.convert("RGB")
    if boxes:
        if settings.region is None:
            raise ValueError(f"the model's dataset ({settings.dataset}) has no regions; drop --region")
        image, _ = render_region(image, list(boxes), settings.region, margin=settings.crop_margin)
    return settings.vis_processor(image)


def generate(model, recipe, image_path: str, *, boxes: Sequence[Sequence[float]] = (), clue: Optional[str] = None,
             prompt: Optional[str] = None, num_beams: Optional[int] = None, max_len: Optional[int] = None,
             min_len: Optional[int] = None) -> Dict[str, Any]:
    """Generate for one image. Returns ``{"text", "prompt", "region_mode", "text_mode", "notes"}``."""
    settings = data_settings(recipe)
    full_prompt, notes = build_prompt(recipe, settings, prompt, clue)
    with Image.open(image_path) as im:
        pixels = prepare_image(im, boxes, settings)
    if not boxes and settings.region not in (None, "none"):
        notes.append(f"no --region given: the model was trained with regions drawn ({settings.region})")
    param = next(model.parameters())
    r = recipe.run
    text = model.generate(pixels.unsqueeze(0).to(param.device, param.dtype), [full_prompt],
                          num_beams=num_beams or r.num_beams, max_len=max_len or r.max_len,
                          min_len=min(min_len if min_len is not None else r.min_len, max_len or r.max_len),
                          repetition_penalty=r.repetition_penalty, length_penalty=r.length_penalty,
                          length_counting=r.length_counting)[0]
    return {"text": text, "prompt": full_prompt, "region_mode": settings.region, "text_mode": settings.text,
            "notes": notes}
