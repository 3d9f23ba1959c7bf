"""LoRA adapters: save a live model's adapters as peft folders, read them back, apply (merge) them onto a
base with peft, strip or merge the layers of a model.

Layout of an adapter folder: see :func:`save_lora_adapter`. Under DeepSpeed the saved values are the
optimizer's fp32 master weights (ZeRO-3 partitions gathered first).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import yaml
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from engine.checkpoints.common import (ADAPTER_FORMAT, ADAPTER_INFO, ENGINE_STATE, PART_FOLDERS, PART_MODULES,
                                       RECIPE_FILE, TRAINED_WEIGHTS, ExportError, dtype_name, hf_model, listing,
                                       write_json)
from engine.checkpoints.engine_checkpoint import checkpoint_recipe
from engine.models.lora import merge_lora
from engine.models.parts import gathered


def lora_layers(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def lora_parts(hf: nn.Module) -> List[str]:
    """The parts ("llm", "qformer", "vision") that carry LoRA adapters."""
    return [part for part, attr in PART_MODULES.items() if lora_layers(getattr(hf, attr))]


def strip_lora(hf: nn.Module) -> int:
    """Remove the LoRA adapters without merging them (the base layers stay as they were). Returns how many."""
    n = 0
    for name, layer in lora_layers(hf):
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent) if parent else hf, child, layer.get_base_layer())
        n += 1
    for attr in PART_MODULES.values():
        drop_peft_marks(getattr(hf, attr))
    return n


def drop_peft_marks(module: nn.Module) -> None:
    # inject_adapter_in_model leaves `peft_config` on the part; a plain model must not carry it.
    if "peft_config" in module.__dict__:
        del module.__dict__["peft_config"]


def full_tensors(named: Sequence[Tuple[str, nn.Parameter]]) -> Dict[str, torch.Tensor]:
    """Whole tensors of `named` parameters on CPU; the fp32 master weights when DeepSpeed holds them.

    Under ZeRO these are collectives: every rank must call this with the same parameters.
    """
    out: Dict[str, torch.Tensor] = {}
    deepspeed_params = any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in named)
    if deepspeed_params:
        # deepspeed here, not at the top: adapters of a plain model are written without loading it.
        from deepspeed.utils import safe_get_full_fp32_param
    rest = []
    for name, p in named:
        full = None
        # A parameter the optimizer owns: its fp32 master (a bf16 run's module weights are rounded copies).
        if hasattr(p, "_hp_mapping") or (hasattr(p, "ds_id") and hasattr(p, "_z3_optimizer")):
            full = safe_get_full_fp32_param(p)
        if full is None:
            rest.append((name, p))
        else:
            out[name] = full.detach().to("cpu", copy=True).contiguous()
    if rest:
        with gathered([p for _, p in rest]):  # ZeRO-3 partitions: gather them; a no-op otherwise
            for name, p in rest:
                out[name] = p.detach().to("cpu", copy=True).contiguous()
    return {name: out[name] for name, _ in named}


_ADAPTER_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")


def _peft_key(name: str) -> str:
    """`x.q_proj.lora_A.default.weight` -> `base_model.model.x.q_proj.lora_A.weight` (peft's saved form)."""
    return "base_model.model." + _ADAPTER_NAME.sub(r".\1", name)


def _rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_lora_adapter(model: nn.Module, out_dir: str, *, recipe: Optional[Mapping[str, Any]] = None,
                      include_trained: bool = True) -> Optional[str]:
    """Write the model's LoRA adapters as peft folder(s) into `out_dir`; returns `out_dir` (None if no LoRA).

    `model`: a VisionLanguageModel, the DeepSpeed engine wrapping one, or the transformers BLIP-2 model.
    Under DeepSpeed (ZeRO-2/3) call it on EVERY rank (reading the fp32 master weights and gathering
    ZeRO-3 partitions are collectives); only rank 0 writes.

    Layout: the LLM's adapter at the top (``adapter_config.json`` + ``adapter_model.safetensors``, for
    ``PeftModel.from_pretrained(model.language_model, out_dir)``); Q-Former / vision adapters, if any,
    in ``qformer/`` / ``vision/`` (for ``model.qformer`` / ``model.vision_model``);
    ``trained_weights.safetensors``: the other trained parameters (e.g. Q-Former, query tokens,
    projection; BLIP-2 finetuning trains them too) under the transformers names, when `include_trained`;
    ``adapter_info.json``; ``recipe.yaml`` when `recipe` (the resolved recipe dict) is given.
    """
    hf = hf_model(model)
    parts = lora_parts(hf)
    if not parts:
        return None
    tensors: Dict[str, Dict[str, torch.Tensor]] = {}
    for part in parts:
        sub = getattr(hf, PART_MODULES[part])
        named = [(n, p) for n, p in sub.named_parameters() if "lora_" in n]
        tensors[part] = {_peft_key(n): t for n, t in full_tensors(named).items()}
    trained: Dict[str, torch.Tensor] = {}
    if include_trained:
        named = [(n, p) for n, p in hf.named_parameters() if p.requires_grad and "lora_" not in n]
        trained = full_tensors(named)
    if not _rank0():
        return out_dir
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    base_path = None
    if recipe is not None:
        m = recipe.get("model", {})
        base_path = m.get("finetuned") if m.get("load_finetuned") else m.get("pretrained")
    for part in parts:
        folder = os.path.join(tmp, PART_FOLDERS[part])
        os.makedirs(folder, exist_ok=True)
        config = copy.deepcopy(getattr(hf, PART_MODULES[part]).peft_config["default"])
        config.inference_mode = True
        config.base_model_name_or_path = base_path
        config.save_pretrained(folder)
        save_file(tensors[part], os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    if trained:
        save_file(trained, os.path.join(tmp, TRAINED_WEIGHTS), metadata={"format": "pt"})
    dtypes = sorted({dtype_name(t.dtype) for d in list(tensors.values()) + [trained] for t in d.values()})
    info = {
        "format": ADAPTER_FORMAT,
        "model_class": type(hf).__name__,
        "parts": {part: PART_FOLDERS[part] for part in parts},
        "part_modules": {part: PART_MODULES[part] for part in parts},
        "trained_weights": TRAINED_WEIGHTS if trained else None,
        "trained_weights_keys": len(trained),
        "dtype": dtypes,
        "base_model_name_or_path": base_path,
    }
    write_json(os.path.join(tmp, ADAPTER_INFO), info)
    if recipe is not None:
        with open(os.path.join(tmp, RECIPE_FILE), "w", encoding="utf-8") as f:
            yaml.safe_dump(dict(recipe), f, sort_keys=False)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def merge_parts(hf: nn.Module) -> int:
    """Merge every LoRA adapter into its base layer (engine.models.merge_lora); returns how many."""
    n = merge_lora(hf)
    for attr in PART_MODULES.values():
        drop_peft_marks(getattr(hf, attr))
    return n


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_INFO)) or os.path.isfile(os.path.join(path, "adapter_config.json"))


def adapter_recipe(adapter_dir: str) -> Optional[Dict[str, Any]]:
    """The recipe of an adapter folder: its recipe.yaml, else the checkpoint it sits in (``<ckpt>/adapter``)."""
    own = os.path.join(adapter_dir, RECIPE_FILE)
    if os.path.isfile(own):
        with open(own, "r", encoding="utf-8") as f:
            return yaml.safe_load(f)
    parent = os.path.dirname(os.path.abspath(adapter_dir))
    if os.path.isfile(os.path.join(parent, ENGINE_STATE)):
        return checkpoint_recipe(parent)
    return None


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - a damaged file: say which
        raise ExportError(f"cannot read {path} ({type(e).__name__}: {e}); the file is damaged or truncated") from e


def read_adapter_info(adapter_dir: str) -> Dict[str, Any]:
    path = os.path.join(adapter_dir, ADAPTER_INFO)
    if os.path.isfile(path):
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    if os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        return {"parts": {"llm": "."}, "trained_weights": None}  # a plain peft folder: the LLM's adapter
    raise ExportError(f"{adapter_dir} is not an adapter folder: expected {ADAPTER_INFO} or adapter_config.json")


def apply_adapter(model, adapter_dir: str) -> Dict[str, Any]:
    """Load an adapter folder into `model` (a VisionLanguageModel without LoRA) and merge it with peft
    (``PeftModel.from_pretrained`` + ``merge_and_unload``). Returns a report of what was loaded."""
    ainfo = read_adapter_info(adapter_dir)
    hf = model.hf
    if type(hf).__name__ != ainfo.get("model_class", type(hf).__name__):
        raise ExportError(f"the adapter in {adapter_dir} was saved from a {ainfo['model_class']} but the base is a "
                          f"{type(hf).__name__}; check --base / the recipe's model.arch")
    report: Dict[str, Any] = {"source_adapter": os.path.abspath(adapter_dir)}
    if ainfo.get("trained_weights"):
        trained = _load_safetensors(os.path.join(adapter_dir, ainfo["trained_weights"]))
        current = hf.state_dict(keep_vars=True)
        bad = [k for k in trained if k not in current]
        shapes = [f"{k} (base {tuple(current[k].shape)}, adapter {tuple(v.shape)})" for k, v in trained.items()
                  if k in current and tuple(current[k].shape) != tuple(v.shape)]
        if bad or shapes:
            raise ExportError(f"{ainfo['trained_weights']} does not fit the base: {len(bad)} unknown key(s) "
                              f"{listing(bad)}; {len(shapes)} shape mismatch(es) {listing(shapes)}")
        with torch.no_grad():
            for k, v in trained.items():
                current[k].copy_(v)
        report["trained_weights"] = len(trained)
    merged = {}
    for part, sub in ainfo["parts"].items():
        attr = PART_MODULES[part]
        peft_model = PeftModel.from_pretrained(getattr(hf, attr), os.path.normpath(os.path.join(adapter_dir, sub)))
        merged[part] = len(lora_layers(peft_model))
        setattr(hf, attr, peft_model.merge_and_unload())
        drop_peft_marks(getattr(hf, attr))
    report["merged_layers"] = merged
    return report
