"""Where config objects stop: recipe sections -> builders' flat keyword arguments.

Models, datasets and processors never see a config object or the registry;
this module is the only bridge between them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional

import torch

from engine.config import Recipe
from engine.registry import DATASETS, MODELS, PROCESSORS, TASKS

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(recipe: Recipe):
    m = recipe.model
    entry = MODELS.get(m.arch)
    lora = dataclasses.asdict(m.lora) if m.lora is not None else None
    pretrained = m.finetuned if m.load_finetuned else m.pretrained
    return entry(
        model_type=m.model_type,
        pretrained=pretrained,
        freeze_vit=m.freeze_vit,
        freeze_qformer=m.freeze_qformer,
        freeze_llm=m.freeze_llm,
        use_grad_checkpoint=m.use_grad_checkpoint,
        max_txt_len=m.max_txt_len,
        lora=lora,
        load_in_8bit=m.load_in_8bit,
        load_in_4bit=m.load_in_4bit,
        # Weights are built in fp32; DeepSpeed casts the module to the run's precision.
        torch_dtype=torch.float32,
        trust_remote_code=m.trust_remote_code,
        seed=recipe.run.seed,
    )


def _processor(spec, default_name: str, image_size: Optional[int]):
    if spec is None:
        if default_name is None:
            return None
        name, kwargs = default_name, {}
    else:
        name, kwargs = spec.name, dict(spec.kwargs)
    builder = PROCESSORS.get(name)
    if image_size is not None and "image_size" not in kwargs:
        import inspect

        if "image_size" in inspect.signature(builder.obj).parameters:
            kwargs["image_size"] = image_size  # follow the model's resolution unless the recipe says otherwise
    return builder(**kwargs)


def build_dataset(recipe: Recipe, name: str, split: str, is_train: bool):
    spec = recipe.datasets[name]
    slot = "train" if is_train else "eval"
    vis = _processor(spec.vis_processor.get(slot), "blip2_image_train" if is_train else "blip_image_eval",
                     recipe.model.image_size)
    text = _processor(spec.text_processor.get(slot), None, None)
    kwargs = dataclasses.asdict(spec.options)
    if "max_bad_samples" in kwargs and not kwargs["max_bad_samples"]:
        kwargs["max_bad_samples"] = recipe.run.max_bad_samples  # the run-wide default; a dataset may set its own
    return DATASETS.get(name)(split=split, is_train=is_train, vis_processor=vis, text_processor=text,
                              prompt=recipe.model.prompt, **kwargs)


def build_split(recipe: Recipe, split: str, is_train: bool):
    """One dataset (or the concatenation of all the recipe's datasets) for a split."""
    parts: List = [build_dataset(recipe, name, split, is_train) for name in recipe.datasets]
    if len(parts) == 1:
        return parts[0]
    return torch.utils.data.ConcatDataset(parts)


def build_datasets(recipe: Recipe) -> Dict[str, object]:
    r = recipe.run
    out = {}
    if not r.evaluate:
        for split in r.train_splits:
            out[split] = build_split(recipe, split, is_train=True)
    for split in list(r.valid_splits) + list(r.test_splits):
        if split not in out:
            out[split] = build_split(recipe, split, is_train=False)
    return out


def build_task(recipe: Recipe):
    r = recipe.run
    kwargs = {} if r.best_metric is None else {"best_metric": r.best_metric}
    if r.task == "captioning":
        kwargs.update(num_beams=r.num_beams, max_len=r.max_len, min_len=r.min_len,
                      repetition_penalty=r.repetition_penalty, length_penalty=r.length_penalty, spice=r.spice)
    elif r.task == "sherlock_retrieval":
        kwargs.update(group_size=r.retrieval_group_size, batch_size=r.batch_size_eval)
    return TASKS.get(r.task)(**kwargs)
