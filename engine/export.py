"""Standard artefacts from this engine's checkpoints: the model is rebuilt from the recipe (engine/build.py)
and the formats of engine/checkpoints/ are read and written.

* :func:`export_checkpoint`: a DeepSpeed checkpoint (ZeRO-2 or ZeRO-3 shards, any number of ranks) ->
  a Hugging Face folder that ``Blip2ForConditionalGeneration.from_pretrained`` /
  ``InstructBlipForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` load (safetensors),
  with the resolved recipe (``recipe.yaml``) and ``export_info.json`` beside it.
* :func:`save_lora_adapter`: the LoRA adapters of a live model (plain, or wrapped by DeepSpeed under
  ZeRO-2/3) -> a peft folder that ``PeftModel.from_pretrained(language_model, folder)`` loads.
* :func:`merge_adapter`: such an adapter folder + its base -> a Hugging Face folder with the adapters merged.

The shards are consolidated by DeepSpeed's own ``zero_to_fp32`` (never re-implemented here): trained
parameters come back as the optimizer's fp32 master weights. Frozen parameters come from the base the
checkpoint names (``model.pretrained``, or the seeded weights of a tiny/random model), which must be the
one it was trained on (engine/trainer/checkpoint.py ``check_base``); a checkpoint that holds them
(``run.save_frozen``, or one written before checkpoints left them out) gives them in the dtype the run
held them in (bf16 in a bf16 run). ``export_info.json`` says which dtype each part had.

Every load is strict: a key the model lacks, a key the checkpoint lacks or a shape that differs is an
error that names them (there is no silent ``strict=False``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional

from torch import nn

from engine.build import build_model
from engine.checkpoints.common import COMPLETE, ENGINE_STATE, EXPORT_INFO, RECIPE_FILE, ExportError, check_out_dir
from engine.checkpoints.engine_checkpoint import (checkpoint_recipe, consolidated_state_dict, load_strict,
                                                  parse_saved_recipe, part_summary, read_engine_state,
                                                  resolve_checkpoint)
from engine.checkpoints.hf import export_recipe, save_hf_folder
from engine.checkpoints.lora import (adapter_recipe, apply_adapter, lora_parts, merge_parts, read_adapter_info,
                                     save_lora_adapter, strip_lora)
from engine.deepspeed_config import load_ds_config, zero_stage
from engine.trainer.checkpoint import BaseMismatchError, check_base, describe_base

logger = logging.getLogger(__name__)


def frozen_keys(module: nn.Module) -> List[str]:
    """Every state-dict name of a frozen parameter (tied weights under each of their names)."""
    ids = {id(p) for p in module.parameters() if not p.requires_grad}
    return [n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in ids]


def load_checkpoint_model(ckpt: str, recipe: Optional[Mapping[str, Any]] = None, base: Optional[str] = None):
    """Rebuild the checkpoint's model from its recipe and load the consolidated weights (fp32, eval mode).

    The frozen weights a checkpoint left out come from its base: the recipe's ``model.pretrained``, or
    `base` (a folder holding the same weights, e.g. after moving them), checked against the fingerprint the
    checkpoint recorded. Returns ``(model, recipe_dict, info)``; `info` has the checkpoint folder, step,
    the base and the dtype per part.
    """
    ckpt_dir = resolve_checkpoint(ckpt)
    state = read_engine_state(ckpt_dir)
    recipe_dict = copy.deepcopy(dict(recipe)) if recipe is not None else checkpoint_recipe(ckpt_dir, state)
    if base is not None:
        recipe_dict.setdefault("model", {}).update(pretrained=os.path.abspath(base), load_finetuned=False,
                                                   finetuned=None)
    parsed = parse_saved_recipe(recipe_dict, source=os.path.join(ckpt_dir, ENGINE_STATE))
    frozen_saved = state.get("frozen_saved", True)
    model = build_model(parsed, device=seeded_base_device(state, ckpt_dir) if not frozen_saved else None).cpu()
    info_base = None
    if not frozen_saved:
        current = describe_base(parsed.to_dict()["model"], parsed.run.seed, parsed.run.precision, model)
        try:
            moved = check_base(ckpt_dir, state, current)
        except BaseMismatchError as e:
            raise ExportError(f"{e}; or pass --base with the folder of those weights") from None
        if moved:
            logger.info(moved)
        info_base = {k: current.get(k) for k in ("kind", "path", "fingerprint")}
    raw = consolidated_state_dict(ckpt_dir)
    sd = {k[len("hf."):] if k.startswith("hf.") else k: v for k, v in raw.items()}
    keep = [] if frozen_saved else frozen_keys(model.hf)
    dtypes = load_strict(model.hf, sd, what="checkpoint", keep=keep)
    model.eval()
    info = {
        "source_checkpoint": ckpt_dir,
        "global_step": state.get("global_step"),
        "epoch": state.get("epoch"),
        "frozen_from": "checkpoint" if frozen_saved else "base",
        "parts": part_summary(model.hf, dtypes, from_base=set(keep)),
    }
    if info_base is not None:
        info["base"] = info_base
    return model, recipe_dict, info


def seeded_base_device(state: Mapping[str, Any], ckpt_dir: str) -> Optional[str]:
    """Where a checkpoint's random real-size base must be drawn again: on the device type it was drawn on
    (the CPU's and CUDA's generators give other numbers from one seed); None for the host."""
    base = state.get("base") or {}
    device = base.get("device", "cpu") if base.get("kind") == "seeded" else "cpu"
    if device == "cpu":
        return None
    import torch  # here, not at the top: only this case needs to know the machine's devices

    if device != "cuda" or not torch.cuda.is_available():
        raise ExportError(f"{ckpt_dir}: its frozen weights are {base.get('path')}, which only a {device} device "
                          f"draws again, and this machine has none; run this on a machine with one, or train "
                          f"with run.save_frozen=true so the checkpoint holds them")
    return f"cuda:{torch.cuda.current_device()}"


def export_checkpoint(ckpt: str, out_dir: str, *, merge: bool = True, dtype: str = "fp32",
                      force: bool = False, base: Optional[str] = None) -> Dict[str, Any]:
    """A checkpoint of this engine -> a Hugging Face folder (see the module doc). Returns export_info.

    `base`: the folder of the checkpoint's base weights when they are no longer where the recipe says
    (checked against the fingerprint the checkpoint recorded).

    With LoRA in the model: merged into the weights (default), or with ``merge=False`` kept apart: the
    folder holds the base weights and ``adapter/`` the peft adapter folder(s) (see `save_lora_adapter`).
    """
    ckpt_dir = resolve_checkpoint(ckpt)
    run_dir = os.path.dirname(os.path.dirname(ckpt_dir))
    check_out_dir(out_dir, force, protect=[ckpt_dir, run_dir])
    model, recipe_dict, info = load_checkpoint_model(ckpt_dir, base=base)
    parts = lora_parts(model.hf)
    if not parts or merge:
        if parts:
            info["lora"] = {"parts": parts, "merged_layers": merge_parts(model.hf)}
        return _finish_export(model, out_dir, recipe_dict, info, dtype, force, keep_lora=False, extra=None)
    # Keep the adapters apart: write them from the unmerged model, then remove the LoRA layers.
    staging = f"{os.path.abspath(out_dir)}.adapter-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # The adapter's recipe names the exported folder as its base (it holds the trained Q-Former too).
        adapter_recipe_dict, _ = export_recipe(recipe_dict, out_dir, keep_lora=True)
        save_lora_adapter(model, staging, recipe=adapter_recipe_dict, include_trained=False)
        info["lora"] = {"parts": parts, "adapter": "adapter/", "removed_layers": strip_lora(model.hf)}
        return _finish_export(model, out_dir, recipe_dict, info, dtype, force, keep_lora=True,
                              extra=lambda tmp: os.replace(staging, os.path.join(tmp, "adapter")))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish_export(model, out_dir, recipe_dict, info, dtype, force, keep_lora, extra) -> Dict[str, Any]:
    save_hf_folder(model, out_dir, recipe_dict=recipe_dict, info=info, dtype=dtype, force=force,
                   keep_lora=keep_lora, extra=extra)
    with open(os.path.join(out_dir, EXPORT_INFO), "r", encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- adapters -> merged folders


def _check_seeded_base(recipe, adapter_dir: str) -> None:
    """A base rebuilt from the recipe's seed (tiny, or pretrained: random) equals the training base only
    when the run did not build it under ZeRO-3, whose partitioned init draws other random numbers."""
    m = recipe.model
    pretrained = m.finetuned if m.load_finetuned else m.pretrained
    if not (pretrained == "random" or (m.model_type == "tiny" and pretrained is None)):
        return
    try:
        stage = zero_stage(load_ds_config(recipe.run.deepspeed))
    except (OSError, ValueError):
        stage = None
    if stage == 3:
        parent = os.path.dirname(os.path.abspath(adapter_dir))
        hint = (f"merge the checkpoint instead (tools/merge_lora.py {parent} OUT_DIR), which holds or names "
                f"its base"
                if os.path.isfile(os.path.join(parent, COMPLETE)) else "pass --base with the run's base weights")
        raise ExportError(f"{adapter_dir}: the base of this {m.arch}/{m.model_type} run was random weights built "
                          f"under ZeRO-3 ({recipe.run.deepspeed}), which cannot be rebuilt from the seed; {hint}")


def merge_adapter(adapter_dir: str, out_dir: str, *, base: Optional[str] = None,
                  recipe: Optional[Mapping[str, Any]] = None, dtype: str = "fp32",
                  force: bool = False) -> Dict[str, Any]:
    """An adapter folder (from `save_lora_adapter`, or a plain peft folder for the LLM) + its base ->
    a Hugging Face folder with the adapters merged by peft. Returns export_info.

    The base is `base` (a Hugging Face BLIP-2 folder of the recipe's arch) or else the recipe's
    ``model.pretrained`` (a `tiny` recipe without one rebuilds its seeded random weights). The recipe
    is `recipe`, else the adapter folder's recipe.yaml, else the checkpoint's the folder sits in.
    """
    adapter_dir = os.path.abspath(adapter_dir)
    read_adapter_info(adapter_dir)  # fail early on a folder that is not an adapter
    check_out_dir(out_dir, force, protect=[adapter_dir] + ([base] if base else []))
    recipe_dict = copy.deepcopy(dict(recipe)) if recipe is not None else adapter_recipe(adapter_dir)
    if recipe_dict is None:
        raise ExportError(f"no recipe for {adapter_dir}: it has no {RECIPE_FILE} and is not inside a checkpoint; "
                          f"pass --recipe (the training recipe or the run's config.yaml)")
    base_recipe = copy.deepcopy(recipe_dict)
    m = base_recipe.setdefault("model", {})
    m["lora"] = None
    if base is not None:
        m.update(pretrained=os.path.abspath(base), load_finetuned=False, finetuned=None)
    parsed = parse_saved_recipe(base_recipe, source=adapter_dir)
    _check_seeded_base(parsed, adapter_dir)
    model = build_model(parsed)
    report = apply_adapter(model, adapter_dir)
    report["base"] = m.get("pretrained") or f"{m.get('arch')}/{m.get('model_type')} built from the recipe's seed"
    model.eval()
    dtypes = {k: v.dtype for k, v in model.hf.state_dict().items()}
    info = {"source_adapter": adapter_dir, "merge": report, "parts": part_summary(model.hf, dtypes, trained=False)}
    return _finish_export(model, out_dir, recipe_dict, info, dtype, force, keep_lora=False, extra=None)
