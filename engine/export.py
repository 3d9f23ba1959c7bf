"""Standard artefacts from this engine's checkpoints.

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

import contextlib
import copy
import inspect
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn

from engine import checkpoint_paths as locate

logger = logging.getLogger(__name__)

ENGINE_STATE = "engine_state.json"
COMPLETE = "COMPLETE"  # engine.trainer.checkpoint writes it last (not imported: that module pulls in the trainer)
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
_SHOW = 20  # keys listed per kind in an error message (the count is always given)


class ExportError(ValueError):
    """The input is not what was expected (not a checkpoint, another architecture, a truncated file...)."""


# ----------------------------------------------------------------------------- small helpers


def _listing(keys: Sequence[str], show: int = _SHOW) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - show} more" if len(keys) > show else ""
    return ", ".join(keys[:show]) + more


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def _is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers BLIP-2 model inside a DeepSpeed engine / VisionLanguageModel / itself."""
    model = getattr(model, "module", model)  # DeepSpeedEngine -> its module
    return getattr(model, "hf", model)


def _part_of(name: str) -> str:
    from engine.models.blip2 import _part_of as part_of

    return part_of(name)


# ----------------------------------------------------------------------------- output folders


def check_out_dir(out_dir: str, force: bool = False, protect: Iterable[str] = ()) -> None:
    """Refuse to write into a non-empty folder unless `force`; never replace a folder holding `protect` paths."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not a folder; choose another output folder")
    for p in protect:
        if p and _is_within(p, out_dir):
            raise ExportError(f"refusing to write to {out_dir}: it holds the input {p}; choose another output folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ExportError(f"{out_dir} already exists and is not empty; choose another output folder or pass "
                          f"--force to replace it")


@contextlib.contextmanager
def _staged(out_dir: str, force: bool):
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


# ----------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str) -> str:
    """The real folder of one complete checkpoint: a checkpoint folder, ``checkpoints/latest``,
    ``checkpoints/best``, the ``checkpoints`` folder or a run's output_dir (engine/trainer/locate.py)."""
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
    from engine.config import ConfigError, parse_recipe

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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from engine.trainer.checkpoint import weights_only_loads

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
            lines.append(f"  {len(missing)} key(s) the model has but the {what} lacks: {_listing(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} key(s) in the {what} that the model lacks: {_listing(unexpected)}")
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es): {_listing(shapes)}")
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


def load_checkpoint_model(ckpt: str, recipe: Optional[Mapping[str, Any]] = None, base: Optional[str] = None):
    """Rebuild the checkpoint's model from its recipe and load the consolidated weights (fp32, eval mode).

    The frozen weights a checkpoint left out come from its base: the recipe's ``model.pretrained``, or
    `base` (a folder holding the same weights, e.g. after moving them), checked against the fingerprint the
    checkpoint recorded. Returns ``(model, recipe_dict, info)``; `info` has the checkpoint folder, step,
    the base and the dtype per part.
    """
    from engine.build import build_model
    from engine.trainer.checkpoint import BaseMismatchError, check_base, describe_base

    ckpt_dir = resolve_checkpoint(ckpt)
    state = read_engine_state(ckpt_dir)
    recipe_dict = copy.deepcopy(dict(recipe)) if recipe is not None else checkpoint_recipe(ckpt_dir, state)
    if base is not None:
        recipe_dict.setdefault("model", {}).update(pretrained=os.path.abspath(base), load_finetuned=False,
                                                   finetuned=None)
    parsed = parse_saved_recipe(recipe_dict, source=os.path.join(ckpt_dir, ENGINE_STATE))
    model = build_model(parsed)
    frozen_saved = state.get("frozen_saved", True)
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


def part_summary(hf: nn.Module, source_dtypes: Mapping[str, torch.dtype],
                 trained: bool = True, from_base: Iterable[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Per part (vision, qformer, llm, lora): parameter count and the dtype(s) its tensors had in the source;
    with `trained`, also whether the run trained it (the model's requires_grad flags, set from the recipe).
    `from_base`: names read from the base instead of the checkpoint (frozen weights it left out)."""
    from_base = set(from_base)
    out: Dict[str, Dict[str, Any]] = {}
    for name, p in hf.named_parameters():
        part = out.setdefault(_part_of(name), {"params": 0, "trained_params": 0, "source_dtype": set()})
        part["params"] += p.numel()
        part["trained_params"] += p.numel() if p.requires_grad else 0
        if name in source_dtypes:
            part["source_dtype"].add(_dtype_name(source_dtypes[name]))
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


# ----------------------------------------------------------------------------- LoRA


def _lora_layers(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def lora_parts(hf: nn.Module) -> List[str]:
    """The parts ("llm", "qformer", "vision") that carry LoRA adapters."""
    return [part for part, attr in PART_MODULES.items() if _lora_layers(getattr(hf, attr))]


def strip_lora(hf: nn.Module) -> int:
    """Remove the LoRA adapters without merging them (the base layers stay as they were). Returns how many."""
    n = 0
    for name, layer in _lora_layers(hf):
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent) if parent else hf, child, layer.get_base_layer())
        n += 1
    for attr in PART_MODULES.values():
        _drop_peft_marks(getattr(hf, attr))
    return n


def _drop_peft_marks(module: nn.Module) -> None:
    # inject_adapter_in_model leaves `peft_config` on the part; a plain model must not carry it.
    if "peft_config" in module.__dict__:
        del module.__dict__["peft_config"]


def _full_tensors(named: Sequence[Tuple[str, nn.Parameter]]) -> Dict[str, torch.Tensor]:
    """Whole tensors of `named` parameters on CPU; the fp32 master weights when DeepSpeed holds them.

    Under ZeRO these are collectives: every rank must call this with the same parameters.
    """
    out: Dict[str, torch.Tensor] = {}
    deepspeed_params = any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in named)
    if deepspeed_params:
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
        from engine.models.blip2 import _gathered

        with _gathered([p for _, p in rest]):  # ZeRO-3 partitions: gather them; a no-op otherwise
            for name, p in rest:
                out[name] = p.detach().to("cpu", copy=True).contiguous()
    return {name: out[name] for name, _ in named}


_ADAPTER_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")


def _peft_key(name: str) -> str:
    """`x.q_proj.lora_A.default.weight` -> `base_model.model.x.q_proj.lora_A.weight` (peft's saved form)."""
    return "base_model.model." + _ADAPTER_NAME.sub(r".\1", name)


def _rank0() -> bool:
    import torch.distributed as dist

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
    from safetensors.torch import save_file

    hf = _hf_model(model)
    parts = lora_parts(hf)
    if not parts:
        return None
    tensors: Dict[str, Dict[str, torch.Tensor]] = {}
    for part in parts:
        sub = getattr(hf, PART_MODULES[part])
        named = [(n, p) for n, p in sub.named_parameters() if "lora_" in n]
        tensors[part] = {_peft_key(n): t for n, t in _full_tensors(named).items()}
    trained: Dict[str, torch.Tensor] = {}
    if include_trained:
        named = [(n, p) for n, p in hf.named_parameters() if p.requires_grad and "lora_" not in n]
        trained = _full_tensors(named)
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
    dtypes = sorted({_dtype_name(t.dtype) for d in list(tensors.values()) + [trained] for t in d.values()})
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
    _write_json(os.path.join(tmp, ADAPTER_INFO), info)
    if recipe is not None:
        with open(os.path.join(tmp, RECIPE_FILE), "w", encoding="utf-8") as f:
            yaml.safe_dump(dict(recipe), f, sort_keys=False)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def merge_parts(hf: nn.Module) -> int:
    """Merge every LoRA adapter into its base layer (engine.models.merge_lora); returns how many."""
    from engine.models import merge_lora

    n = merge_lora(hf)
    for attr in PART_MODULES.values():
        _drop_peft_marks(getattr(hf, attr))
    return n


# ----------------------------------------------------------------------------- HF folders


def _image_processor_args(recipe, model) -> Dict[str, Any]:
    """Size/mean/std of the eval image processor the recipe evaluates with; the size is the ViT's (the
    recipe's processors are checked to agree with it)."""
    from engine.data.processors import CLIP_MEAN, CLIP_STD

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
    from tokenizers import AddedToken
    from transformers import Blip2Processor, BlipImageProcessor, InstructBlipProcessor
    from transformers.image_utils import PILImageResampling

    from engine.models import IMAGE_TOKEN

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


def _export_recipe(recipe_dict: Mapping[str, Any], out_dir: str, keep_lora: bool) -> Tuple[Dict[str, Any], Dict]:
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
    if _lora_layers(hf):
        raise ExportError("the model still has LoRA layers; merge (merge_parts) or strip (strip_lora) them first")
    if dtype not in SAVE_DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
    if dtype == "fp16" and model.family == "t5":
        raise ExportError("Flan-T5 overflows in fp16; export in bf16 or fp32")
    check_out_dir(out_dir, force)
    recipe = parse_saved_recipe(recipe_dict) if recipe_dict is not None else None
    with _staged(out_dir, force) as tmp:
        hf.to(SAVE_DTYPES[dtype])
        kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(
            hf.save_pretrained).parameters else {}  # transformers 5 always writes safetensors
        if recipe is not None:  # plain transformers then generates as the engine's evaluation does
            r = recipe.run
            hf.generation_config = model.hf_generation_config(
                num_beams=r.num_beams, max_len=r.max_len, min_len=r.min_len, repetition_penalty=r.repetition_penalty,
                length_penalty=r.length_penalty, length_counting=r.length_counting)
        hf.save_pretrained(tmp, **kwargs)
        proc_args = _image_processor_args(recipe, model) if recipe is not None else {
            "image_size": model.image_size, "mean": None, "std": None}
        if proc_args["mean"] is None:
            from engine.data.processors import CLIP_MEAN, CLIP_STD

            proc_args.update(mean=list(CLIP_MEAN), std=list(CLIP_STD))
        build_processor(model, proc_args["image_size"], proc_args["mean"], proc_args["std"]).save_pretrained(tmp)
        info = dict(info)
        info["saved_dtype"] = dtype
        info["processor"] = {"class": "InstructBlipProcessor" if model.instruct else "Blip2Processor",
                             "num_query_tokens": model.num_query_tokens, **proc_args}
        info["model_class"] = type(hf).__name__
        if recipe_dict is not None:
            written, changes = _export_recipe(recipe_dict, out_dir, keep_lora)
            info["recipe_changes"] = changes
            with open(os.path.join(tmp, RECIPE_FILE), "w", encoding="utf-8") as f:
                yaml.safe_dump(written, f, sort_keys=False)
        if extra is not None:
            extra(tmp)
        _write_json(os.path.join(tmp, EXPORT_INFO), info)
    return os.path.abspath(out_dir)


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
        adapter_recipe_dict, _ = _export_recipe(recipe_dict, out_dir, keep_lora=True)
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
    from safetensors.torch import load_file

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
    from peft import PeftModel

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
                              f"{_listing(bad)}; {len(shapes)} shape mismatch(es) {_listing(shapes)}")
        with torch.no_grad():
            for k, v in trained.items():
                current[k].copy_(v)
        report["trained_weights"] = len(trained)
    merged = {}
    for part, sub in ainfo["parts"].items():
        attr = PART_MODULES[part]
        peft_model = PeftModel.from_pretrained(getattr(hf, attr), os.path.normpath(os.path.join(adapter_dir, sub)))
        merged[part] = len(_lora_layers(peft_model))
        setattr(hf, attr, peft_model.merge_and_unload())
        _drop_peft_marks(getattr(hf, attr))
    report["merged_layers"] = merged
    return report


def _check_seeded_base(recipe, adapter_dir: str) -> None:
    """A base rebuilt from the recipe's seed (tiny, or pretrained: random) equals the training base only
    when the run did not build it under ZeRO-3, whose partitioned init draws other random numbers."""
    from engine.deepspeed_config import load_ds_config, zero_stage

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
    from engine.build import build_model

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
