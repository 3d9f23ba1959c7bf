"""Where config objects stop: recipe sections -> builders' flat keyword arguments.

Models, datasets and processors never see a config object or the registry;
this module is the only bridge between them.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from typing import Dict, List, Optional

import torch

from engine.checkpoints.lora import apply_adapter
from engine.config import Recipe
from engine.data.check import Report, SplitSummary
from engine.data.errors import WARNING_KINDS, BadRecord, DatasetError
from engine.data.mixing import MixedDataset
from engine.models.parts import cast_parameters
from engine.models.zoo import checkpoint_image_size
from engine.registry import DATASETS, MODELS, PROCESSORS, TASKS, load

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(recipe: Recipe, dtype: Optional[torch.dtype] = None, device: Optional[str] = None):
    """The recipe's model. ``dtype``: the dtype weights are built in (default fp32).

    Training passes the run's precision (engine/train.py): DeepSpeed would cast an fp32 build to bf16/fp16
    anyway, so building in it gives the same weights with half the host memory per rank while a checkpoint
    loads (8 ranks x a 7B model: about 110 GiB instead of 220). Export and evaluation keep fp32, so weights
    consolidated from fp32 master copies are not rounded. ``device``: a checkpoint's weights load straight onto
    it, a random real-size model is drawn on it (engine/train.py passes the rank's GPU under ZeRO-1/2).

    A random real-size model (``pretrained: random``) is always drawn in the run's precision, its weights depend
    on it: export and evaluation, which ask for fp32, get the training run's weights cast to fp32."""
    m = recipe.model
    entry = MODELS.get(m.arch)
    # A saved adapter is merged into the base after building, so the base is built without new LoRA layers.
    lora = dataclasses.asdict(m.lora) if m.lora is not None and not m.adapter else None
    pretrained = m.finetuned if m.load_finetuned else m.pretrained
    want = dtype or torch.float32
    drawn = DTYPES[recipe.run.precision] if pretrained == "random" and m.model_type != "tiny" else want
    model = entry(
        model_type=m.model_type,
        pretrained=pretrained,
        freeze_vit=m.freeze_vit,
        freeze_qformer=m.freeze_qformer,
        freeze_llm=m.freeze_llm,
        use_grad_checkpoint=m.use_grad_checkpoint,
        checkpoint_qformer=m.checkpoint_qformer,
        checkpoint_llm=m.checkpoint_llm,
        max_txt_len=m.max_txt_len,
        max_output_txt_len=m.max_output_txt_len,
        image_size=m.image_size,
        lora=lora,
        load_in_8bit=m.load_in_8bit,
        load_in_4bit=m.load_in_4bit,
        torch_dtype=drawn,
        trust_remote_code=m.trust_remote_code,
        seed=recipe.run.seed,
        device=device,
    )
    if drawn != want:
        cast_parameters(model, want)
    if m.adapter:
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ValueError(f"model.adapter={m.adapter}: an adapter cannot be merged into a ZeRO-3-partitioned "
                             f"model; use a ZeRO-2 config, or merge it first with tools/merge_lora.py")
        apply_adapter(model, m.adapter)
    return model


def build_text_inputs(recipe: Recipe):
    """The text side of the recipe's model (the tokenising, padding and label masking the training loader's
    collate runs: ``TextInputs``), without building the model (bench/loader_speed.py)."""
    from engine.models.blip2 import build_text_inputs as text_inputs  # transformers: only when asked for

    m = recipe.model
    return text_inputs(m.arch, model_type=m.model_type, pretrained=m.finetuned if m.load_finetuned else m.pretrained,
                       max_txt_len=m.max_txt_len, max_output_txt_len=m.max_output_txt_len,
                       trust_remote_code=m.trust_remote_code)


def model_image_size(recipe: Recipe) -> int:
    """The size images are given to the ViT: model.image_size, else the checkpoint's."""
    m = recipe.model
    if m.image_size is not None:
        return int(m.image_size)
    folder = m.finetuned if m.load_finetuned else m.pretrained
    return checkpoint_image_size(m.arch, m.model_type, folder) or 224


def build_data_processor(spec, default_name: Optional[str], image_size: Optional[int], uint8: bool = False):
    """The processor a recipe's ``vis_processor``/``text_processor`` slot names (``default_name`` when the slot
    is empty; None when both are), following the model's image size unless the slot sets one."""
    if spec is None:
        if default_name is None:
            return None
        name, kwargs = default_name, {}
    else:
        name, kwargs = spec.name, dict(spec.kwargs)
    builder = PROCESSORS.get(name)
    params = inspect.signature(builder.obj).parameters
    if image_size is not None and "image_size" not in kwargs and "image_size" in params:
        kwargs["image_size"] = image_size  # follow the model's resolution unless the recipe says otherwise
    if uint8 and "normalize" not in kwargs and "normalize" in params:
        # Training images leave the workers as uint8; the trainer normalises them on the device
        # (engine/data/normalize.py), unless the recipe sets normalize: true.
        kwargs["normalize"] = False
    return builder(**kwargs)


def build_dataset(recipe: Recipe, name: str, split: str, is_train: bool, **overrides):
    """One dataset split; ``overrides`` replace options of the dataset's schema (tools/check_dataset.py)."""
    spec = recipe.datasets[name]
    slot = "train" if is_train else "eval"
    vis = build_data_processor(spec.vis_processor.get(slot), "blip2_image_train" if is_train else "blip_image_eval",
                               model_image_size(recipe), uint8=is_train)
    text = build_data_processor(spec.text_processor.get(slot), None, None)
    kwargs = dataclasses.asdict(spec.options)
    if "max_bad_samples" in kwargs and not kwargs["max_bad_samples"]:
        kwargs["max_bad_samples"] = recipe.run.max_bad_samples  # the run-wide default; a dataset may set its own
    kwargs.update({k: v for k, v in overrides.items() if k in kwargs})
    return DATASETS.get(name)(split=split, is_train=is_train, vis_processor=vis, text_processor=text,
                              prompt=recipe.model.prompt, **kwargs)


def build_split(recipe: Recipe, split: str, is_train: bool):
    """One dataset, or all the recipe's datasets mixed (training: in run.train_dataset_ratios), for a split."""
    parts: Dict[str, object] = {name: build_dataset(recipe, name, split, is_train) for name in recipe.datasets}
    if len(parts) == 1:
        return next(iter(parts.values()))
    ratios = recipe.run.train_dataset_ratios if is_train else None
    return MixedDataset(parts, ratios=ratios)


def prepare_datasets(recipe: Recipe) -> None:
    """Make what a dataset generates or caches on first use (e.g. the synthetic Sherlock).

    The trainer calls this on global rank 0 while the other ranks wait, then every rank builds its
    datasets: on storage shared by all nodes the data is made once; on a node's own disk the first rank
    of each node that misses it makes it (under a file lock) when it builds the dataset.
    """
    for name, spec in recipe.datasets.items():
        prepare = DATASETS.get(name).meta.get("prepare")
        if isinstance(prepare, str):  # declared as "module:function" (engine/data/catalog.py)
            prepare = load(prepare)
        if prepare is not None:
            prepare(**dataclasses.asdict(spec.options))


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
                      repetition_penalty=r.repetition_penalty, length_penalty=r.length_penalty, spice=r.spice,
                      length_counting=r.length_counting)
    elif r.task == "sherlock_retrieval":
        kwargs.update(group_size=r.retrieval_group_size, batch_size=r.batch_size_eval)
    return TASKS.get(r.task)(**kwargs)


# --------------------------------------------------------------------------- dataset check (tools/check_dataset.py)


def _splits(recipe) -> List[str]:
    r = recipe.run
    return list(dict.fromkeys(list(r.train_splits) + list(r.valid_splits) + list(r.test_splits)))


def check_recipe_datasets(recipe, full_decode: bool = False, log=None) -> Report:
    """Scan every split (run.train/valid/test_splits) of every dataset of ``recipe``.

    ``log(str)``, when given, hears progress (one line per split).
    """
    report = Report(full_decode=full_decode)
    train = set(recipe.run.train_splits)
    for name in recipe.datasets:
        seen: Dict[str, str] = {}
        for split in _splits(recipe):
            if log:
                log(f"checking {name}/{split} ...")
            data_log = logging.getLogger("engine.data")
            level = data_log.level
            data_log.setLevel(logging.ERROR)  # the skip warnings would repeat what the report says
            try:
                # Every bad record lands in ds.bad_records (and in the report) instead of failing the build.
                ds = build_dataset(recipe, name, split, is_train=split in train, max_bad_samples=sys.maxsize,
                                   check_images=True)
            except (DatasetError, ValueError, OSError) as e:
                file = getattr(e, "filename", None) or f"datasets.{name} ({split})"
                report.splits.append(SplitSummary(name, split, file, note="could not be read"))
                report.bad.append(BadRecord(file, "file", "", "", [("missing_file", str(e))]))
                continue
            finally:
                data_log.setLevel(level)
            file = getattr(ds, "ann_file", "?")
            if file in seen:
                report.splits.append(SplitSummary(name, split, file, note=f"same file as {seen[file]}"))
                continue
            seen[file] = split
            images = len({r[2] for r in ds.image_refs()}) if hasattr(ds, "image_refs") else 0
            summary = SplitSummary(name, split, file, records=len(ds) + len(getattr(ds, "bad_records", [])),
                                   images=images)
            report.splits.append(summary)
            report.bad += list(getattr(ds, "bad_records", []))
            if hasattr(ds, "duplicate_ids"):
                report.bad += ds.duplicate_ids()
            if hasattr(ds, "verify_images"):
                strict = getattr(ds, "strict_boxes", False)
                for b in ds.verify_images(decode=full_decode):
                    warning = not strict and all(k in WARNING_KINDS for k in b.kinds)
                    (report.warnings if warning else report.bad).append(b)
    return report
