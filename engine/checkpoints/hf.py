"""Hugging Face folders: a model written so that ``Blip2ForConditionalGeneration.from_pretrained`` /
``InstructBlipForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` load it (safetensors),
with its processor (LAVIS's eval transform), the recipe to rebuild it (``recipe.yaml``) and
``export_info.json`` beside it.
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import yaml
from tokenizers import AddedToken
from transformers import Blip2Processor, BlipImageProcessor, InstructBlipProcessor
from transformers.image_utils import PILImageResampling

from engine.checkpoints.common import (EXPORT_INFO, RECIPE_FILE, SAVE_DTYPES, ExportError, check_out_dir, staged,
                                       write_json)
from engine.checkpoints.engine_checkpoint import parse_saved_recipe
from engine.checkpoints.lora import lora_layers
from engine.data.processors import CLIP_MEAN, CLIP_STD
from engine.models.tokenizer import IMAGE_TOKEN


def image_processor_args(recipe, model) -> Dict[str, Any]:
    """Size/mean/std of the eval image processor the recipe evaluates with; the size is the ViT's (the
    recipe's processors are checked to agree with it)."""
    size = model.image_size
    mean, std = CLIP_MEAN, CLIP_STD
    for spec in recipe.datasets.values():
        ev = spec.vis_processor.get("eval")
        if ev is not None:
            mean = ev.kwargs.get("mean") or mean
            std = ev.kwargs.get("std") or std
            break
    return {"image_size": int(size), "mean": list(mean), "std": list(std)}


def build_processor(model, image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Blip2Processor / InstructBlipProcessor for `model` (a VisionLanguageModel): LAVIS's eval transform
    (bicubic resize to image_size, CLIP mean/std) and the model's num_query_tokens."""
    images = BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
                                image_mean=list(mean), image_std=list(std), do_convert_rgb=True)
    tokenizer = copy.deepcopy(model.tokenizer)  # the processors set attributes on their tokenizer
    if model.instruct:
        proc = InstructBlipProcessor(image_processor=images, tokenizer=tokenizer,
                                     qformer_tokenizer=copy.deepcopy(model.qformer_tokenizer),
                                     num_query_tokens=model.num_query_tokens)
    else:
        proc = Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=model.num_query_tokens)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.image_token_id:
        raise ExportError(f"the tokenizer's {IMAGE_TOKEN} id differs from the model's image_token_index "
                          f"{model.image_token_id}")
    # The processors call `.content` on this; a tokenizer may carry the plain string (the engine's local ones do).
    proc.image_token = AddedToken(IMAGE_TOKEN, normalized=False, special=True)
    return proc


def export_recipe(recipe_dict: Mapping[str, Any], out_dir: str, keep_lora: bool) -> Tuple[Dict[str, Any], Dict]:
    """The recipe written beside an export: the training recipe, rebuilt from the exported folder."""
    out = copy.deepcopy(dict(recipe_dict))
    m = out.setdefault("model", {})
    changes = {}
    for key, value in (("pretrained", os.path.abspath(out_dir)), ("load_finetuned", False), ("finetuned", None)):
        if m.get(key) != value:
            changes[f"model.{key}"] = {"was": m.get(key), "now": value}
            m[key] = value
    if not keep_lora and m.get("lora") is not None:
        changes["model.lora"] = {"was": m["lora"], "now": None, "why": "the adapters are merged into the weights"}
        m["lora"] = None
    return out, changes


def save_hf_folder(model, out_dir: str, *, recipe_dict: Optional[Mapping[str, Any]], info: Dict[str, Any],
                   dtype: str = "fp32", force: bool = False, keep_lora: bool = False,
                   extra: Optional[Callable[[str], None]] = None) -> str:
    """Write `model` (a VisionLanguageModel without LoRA layers) as a Hugging Face folder.

    Files: config.json + model.safetensors (+ generation_config.json), the tokenizer, the processor
    (processor_config.json; InstructBLIP: qformer_tokenizer/), recipe.yaml (when a recipe is given)
    and export_info.json. `extra(tmp_folder)` may add files before the folder is moved into place.
    """
    hf = model.hf
    if lora_layers(hf):
        raise ExportError("the model still has LoRA layers; merge (merge_parts) or strip (strip_lora) them first")
    if dtype not in SAVE_DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
    if dtype == "fp16" and model.family == "t5":
        raise ExportError("Flan-T5 overflows in fp16; export in bf16 or fp32")
    check_out_dir(out_dir, force)
    recipe = parse_saved_recipe(recipe_dict) if recipe_dict is not None else None
    with staged(out_dir, force) as tmp:
        hf.to(SAVE_DTYPES[dtype])
        kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(
            hf.save_pretrained).parameters else {}  # transformers 5 always writes safetensors
        if recipe is not None:  # plain transformers then generates as the engine's evaluation does
            r = recipe.run
            hf.generation_config = model.hf_generation_config(
                num_beams=r.num_beams, max_len=r.max_len, min_len=r.min_len, repetition_penalty=r.repetition_penalty,
                length_penalty=r.length_penalty, length_counting=r.length_counting)
        hf.save_pretrained(tmp, **kwargs)
        proc_args = image_processor_args(recipe, model) if recipe is not None else {
            "image_size": model.image_size, "mean": None, "std": None}
        if proc_args["mean"] is None:
            proc_args.update(mean=list(CLIP_MEAN), std=list(CLIP_STD))
        build_processor(model, proc_args["image_size"], proc_args["mean"], proc_args["std"]).save_pretrained(tmp)
        info = dict(info)
        info["saved_dtype"] = dtype
        info["processor"] = {"class": "InstructBlipProcessor" if model.instruct else "Blip2Processor",
                             "num_query_tokens": model.num_query_tokens, **proc_args}
        info["model_class"] = type(hf).__name__
        if recipe_dict is not None:
            written, changes = export_recipe(recipe_dict, out_dir, keep_lora)
            info["recipe_changes"] = changes
            with open(os.path.join(tmp, RECIPE_FILE), "w", encoding="utf-8") as f:
                yaml.safe_dump(written, f, sort_keys=False)
        if extra is not None:
            extra(tmp)
        write_json(os.path.join(tmp, EXPORT_INFO), info)
    return os.path.abspath(out_dir)
