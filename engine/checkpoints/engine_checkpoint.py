"""This engine's checkpoints, read: find one (a folder, ``latest``, ``best``, a run), its engine state and
recipe, DeepSpeed's consolidation of its ZeRO shards (``zero_to_fp32``, never re-implemented), and a strict
load of those weights into a model (a key the model lacks, a key the checkpoint lacks or a shape that
differs is an error that names them; there is no silent ``strict=False``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
import yaml
from torch import nn

from engine.checkpoints import paths as locate
from engine.checkpoints.common import ENGINE_STATE, ExportError, dtype_name, listing
from engine.checkpoints.safe_loading import weights_only_loads
from engine.config import ConfigError, parse_recipe
from engine.models.parts import part_of

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> str:
    """The real folder of one complete checkpoint: a checkpoint folder, ``checkpoints/latest``,
    ``checkpoints/best``, the ``checkpoints`` folder or a run's output_dir (engine/checkpoints/paths.py)."""
    try:
        return locate.resolve_checkpoint(path).folder
    except locate.CheckpointNotFound as e:
        raise ExportError(str(e)) from None


def is_checkpoint(path: str) -> bool:
    try:
        resolve_checkpoint(path)
        return True
    except ExportError:
        return False


def read_engine_state(ckpt_dir: str) -> Dict[str, Any]:
    path = os.path.join(ckpt_dir, ENGINE_STATE)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None


def checkpoint_recipe(ckpt_dir: str, state: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The resolved recipe a checkpoint was trained with (``engine_state.json``, else the run's config.yaml)."""
    state = read_engine_state(ckpt_dir) if state is None else state
    if isinstance(state.get("recipe"), dict):
        return copy.deepcopy(state["recipe"])
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))
    cfg = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg):
        with open(cfg, "r", encoding="utf-8") as f:
            return yaml.safe_load(f)
    raise ExportError(f"{ckpt_dir} carries no recipe ({ENGINE_STATE} has none and {cfg} is missing); the model "
                      f"cannot be rebuilt without it")


def parse_saved_recipe(data: Mapping[str, Any], source: str = ""):
    """A `Recipe` from a saved, resolved recipe dict (files it names, e.g. dataset roots, need not exist)."""
    data = copy.deepcopy(dict(data))
    try:
        return parse_recipe(data, source=source, check_files=False)
    except ConfigError as e:
        # The DeepSpeed config a run used may be gone on this machine; it does not matter for the weights.
        if not e.problems or any(not p.key.startswith("run.deepspeed") for p in e.problems):
            raise
        logger.warning("%s: %s; using ds_configs/zero2.json to read the recipe", source, e.problems[0])
        data.setdefault("run", {})["deepspeed"] = "ds_configs/zero2.json"
        return parse_recipe(data, source=source, check_files=False)


def consolidated_state_dict(ckpt_dir: str) -> Dict[str, Any]:
    """DeepSpeed's consolidation of a checkpoint's ZeRO shards (lazy: call `.contiguous()` on a value).

    Keys are the wrapper's (``hf.``...). Trained parameters are the fp32 master weights; frozen ones are
    in the dtype the run held them in.
    """
    # deepspeed here, not at the top: resolving and reading a checkpoint's recipe must not load it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(os.path.realpath(ckpt_dir))
    try:
        # zero_to_fp32 reports progress with print(); keep stdout for the tools' results.
        with contextlib.redirect_stdout(sys.stderr), weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, lazy_mode=True)
    except Exception as e:  # noqa: BLE001 - every failure here means an unreadable checkpoint; say where
        files = ", ".join(sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt"))) or "no .pt files"
        raise ExportError(
            f"DeepSpeed could not consolidate the checkpoint {ckpt_dir} ({type(e).__name__}: {e}). Expected "
            f"mp_rank_00_model_states.pt (ZeRO-2) or zero_pp_rank_*_model_states.pt (ZeRO-3) plus one "
            f"*_optim_states.pt per rank; found {files}. A truncated or partly copied file gives this error: "
            f"copy the checkpoint again or use an earlier one.") from e


def load_strict(module: nn.Module, state: Mapping[str, Any], what: str = "checkpoint",
                keep: Iterable[str] = ()) -> Dict[str, torch.dtype]:
    """Copy `state` into `module`'s parameters and buffers; every key must match, with the same shape.

    Values may be tensors or lazy tensors (with `.shape`, `.dtype`, `.contiguous()`); they are
    materialised one at a time. Returns the source dtype of each key. Keys in `keep` may be absent
    from `state`: they keep the module's values (frozen weights of a checkpoint that left them out).
    """
    expected = module.state_dict(keep_vars=True)
    keep = set(keep)
    missing = [k for k in expected if k not in state and k not in keep]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (model {tuple(expected[k].shape)}, {what} {tuple(state[k].shape)})"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"the {what} does not match the model built from the recipe:"]
        if missing:
            lines.append(f"  {len(missing)} key(s) the model has but the {what} lacks: {listing(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} key(s) in the {what} that the model lacks: {listing(unexpected)}")
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es): {listing(shapes)}")
        lines.append("  (a checkpoint of another arch/model_type, another LoRA setting, or the wrong recipe)")
        raise ExportError("\n".join(lines))
    dtypes: Dict[str, torch.dtype] = {}
    done = set()
    with torch.no_grad():
        for key, target in expected.items():
            if key not in state:  # kept (see `keep`)
                dtypes[key] = target.dtype
                continue
            dtypes[key] = state[key].dtype
            if id(target) in done:  # tied weights: one tensor under two names
                continue
            done.add(id(target))
            target.copy_(state[key].contiguous())
    return dtypes


def frozen_keys(module: nn.Module) -> List[str]:
    """Every state-dict name of a frozen parameter (tied weights under each of their names)."""
    ids = {id(p) for p in module.parameters() if not p.requires_grad}
    return [n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in ids]


def part_summary(hf: nn.Module, source_dtypes: Mapping[str, torch.dtype],
                 trained: bool = True, from_base: Iterable[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Per part (vision, qformer, llm, lora): parameter count and the dtype(s) its tensors had in the source;
    with `trained`, also whether the run trained it (the model's requires_grad flags, set from the recipe).
    `from_base`: names read from the base instead of the checkpoint (frozen weights it left out)."""
    from_base = set(from_base)
    out: Dict[str, Dict[str, Any]] = {}
    for name, p in hf.named_parameters():
        part = out.setdefault(part_of(name), {"params": 0, "trained_params": 0, "source_dtype": set()})
        part["params"] += p.numel()
        part["trained_params"] += p.numel() if p.requires_grad else 0
        if name in source_dtypes:
            part["source_dtype"].add(dtype_name(source_dtypes[name]))
    for part in out.values():
        part["source_dtype"] = "/".join(sorted(part["source_dtype"]))
        if not trained:
            del part["trained_params"]
            continue
        part["trained"] = part["trained_params"] > 0
        if part["trained_params"] == part["params"]:
            part["note"] = "trained: the optimizer's fp32 master weights"
        elif part["trained_params"] == 0 and from_base:
            part["note"] = f"frozen: from the base ({part['source_dtype']})"
        elif part["trained_params"] == 0:
            part["note"] = f"frozen: as the run held it ({part['source_dtype']})"
        else:
            where = "from the base" if from_base else "as the run held them"
            part["note"] = f"partly trained: trained tensors are fp32 master weights, frozen ones {where}"
    return out
