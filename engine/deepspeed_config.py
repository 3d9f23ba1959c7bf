"""Fill and check a ds_configs/*.json against the recipe, in one place.

The recipe owns the micro batch, accumulation, clipping, precision, optimizer
and LR schedule. In a DeepSpeed config those fields are written as ``"auto"``
(or left out) and filled here; an explicit value that disagrees with the recipe
is an error rather than a silent winner.
"""
from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING, Any, Dict, List

from engine.problems import Problem, project_path

if TYPE_CHECKING:
    from engine.config import Recipe


def load_ds_config(path: str) -> Dict[str, Any]:
    resolved = project_path(path)
    if not os.path.isfile(resolved):
        shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
        names = ", ".join(sorted(os.listdir(shipped))) if os.path.isdir(shipped) else "none"
        raise FileNotFoundError(f"run.deepspeed: DeepSpeed config '{path}' not found (shipped: {names} in ds_configs/)")
    with open(resolved, "r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"run.deepspeed: {resolved} is not valid JSON: {e}") from None


def _owned(recipe: Recipe) -> Dict[str, tuple]:
    """ds key -> (recipe key, value) for the scalar fields the recipe owns."""
    r = recipe.run
    return {
        "train_micro_batch_size_per_gpu": ("run.batch_size_train", r.batch_size_train),
        "gradient_accumulation_steps": ("run.accum_grad_iters", r.accum_grad_iters),
        "gradient_clipping": ("run.grad_clip", r.grad_clip),
    }


def _auto(v: Any) -> bool:
    return v is None or v == "auto"


def zero_stage(ds: Dict[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def offloads(ds: Dict[str, Any]) -> Dict[str, bool]:
    z = ds.get("zero_optimization") or {}

    def on(key):
        dev = (z.get(key) or {}).get("device", "none")
        return dev not in (None, "none")

    return {"optimizer": on("offload_optimizer"), "param": on("offload_param")}


def check_ds_config(recipe: Recipe, check_files: bool = True) -> List[Problem]:
    """Problems between the recipe and its DeepSpeed config (no world size needed)."""
    key = "run.deepspeed"
    try:
        ds = load_ds_config(recipe.run.deepspeed)
    except (FileNotFoundError, ValueError) as e:
        return [Problem(key, str(e).split(": ", 1)[-1])]
    out: List[Problem] = []
    name = recipe.run.deepspeed
    for ds_key, (rkey, value) in _owned(recipe).items():
        v = ds.get(ds_key, "auto")
        if not _auto(v) and v != value:
            out.append(Problem(key, f"{name} sets {ds_key}={v!r} but {rkey}={value!r}; write \"auto\" in the "
                                    f"DeepSpeed config (the recipe fills it) or make them equal"))
    tb = ds.get("train_batch_size", "auto")
    if not _auto(tb):
        per_rank = recipe.run.batch_size_train * recipe.run.accum_grad_iters
        if not isinstance(tb, int) or tb % per_rank:
            out.append(Problem(key, f"{name} sets train_batch_size={tb!r}, which is not a multiple of "
                                    f"run.batch_size_train x run.accum_grad_iters = {per_rank}; write \"auto\""))
    prec = recipe.run.precision
    for p in ("bf16", "fp16"):
        enabled = (ds.get(p) or {}).get("enabled", "auto")
        if not _auto(enabled) and bool(enabled) != (prec == p):
            out.append(Problem(key, f"{name} sets {p}.enabled={enabled!r} but run.precision={prec!r}; write "
                                    f"\"auto\" there (the recipe decides)"))
    if "amp" in ds:
        out.append(Problem(key, f"{name} has an amp section; use run.precision (bf16/fp16) instead"))
    opt = ds.get("optimizer", "auto")
    if not _auto(opt):
        if not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ("adam", "adamw"):
            out.append(Problem(key, f"{name} sets optimizer={opt!r}; only AdamW is supported, write \"auto\""))
        else:
            params = opt.get("params") or {}
            mine = {"lr": recipe.run.init_lr, "weight_decay": recipe.run.weight_decay}
            for k, v in mine.items():
                if k in params and not _auto(params[k]) and float(params[k]) != float(v):
                    rk = "run.init_lr" if k == "lr" else "run.weight_decay"
                    out.append(Problem(key, f"{name} sets optimizer.params.{k}={params[k]!r} but {rk}={v!r}; "
                                            f"write \"auto\" or remove it"))
    if not _auto(ds.get("scheduler", "auto")):
        out.append(Problem(key, f"{name} sets a scheduler; the schedule comes from run.lr_sched "
                                f"({recipe.run.lr_sched}); write \"scheduler\": \"auto\""))
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        out.append(Problem(key, f"{name} sets zero_optimization.stage={stage}; use 0-3"))
    off = offloads(ds)
    if off["param"] and stage != 3:
        out.append(Problem(key, f"{name} offloads parameters (offload_param) with ZeRO stage {stage}; "
                                f"parameter offload needs stage 3 (use ds_configs/zero3_offload.json)"))
    m = recipe.model
    if (m.load_in_8bit or m.load_in_4bit) and stage == 3:
        out.append(Problem("model.load_in_8bit" if m.load_in_8bit else "model.load_in_4bit",
                           f"8/4-bit weights cannot be partitioned by ZeRO-3 ({name}); use ds_configs/zero2.json "
                           f"or zero2_offload.json"))
    return out


def fill_ds_config(recipe: Recipe, world_size: int, on_cpu: bool, load_universal: bool = False) -> Dict[str, Any]:
    """Return the DeepSpeed config dict with every "auto" field filled from the recipe.

    ``load_universal``: the run resumes from a checkpoint in DeepSpeed's universal format (another number
    of ranks or ZeRO stage than the run that saved it: engine/trainer/reshape.py)."""
    ds = copy.deepcopy(load_ds_config(recipe.run.deepspeed))
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    r = recipe.run
    if r.precision == "fp16" and on_cpu:
        raise ValueError("run.precision: 'fp16' needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    for ds_key, (_, value) in _owned(recipe).items():
        ds[ds_key] = value
    ds["train_batch_size"] = r.batch_size_train * r.accum_grad_iters * world_size
    ds.setdefault("bf16", {})["enabled"] = r.precision == "bf16"
    if r.precision == "bf16":
        # One check per step on the gradient norm instead of one per gradient tensor (engine/trainer/
        # step_check.py); a config that sets the key keeps its value.
        ds["bf16"].setdefault("check_grad_overflow", False)
    z = ds.get("zero_optimization") or {}
    if world_size == 1 and zero_stage(ds) in (1, 2):
        # One rank has no gradient communication to overlap or to batch: overlap_comm would only add a
        # synchronize of the reduction stream at the end of every backward, and contiguous_gradients a copy of
        # every gradient into a reduction bucket (before the copy into the partition), a kernel per tensor.
        z["overlap_comm"] = False
        z["contiguous_gradients"] = False
    ds.setdefault("fp16", {})["enabled"] = r.precision == "fp16"
    if not ds["fp16"]["enabled"]:
        ds.pop("fp16")
    off = offloads(ds)
    params = {"lr": r.init_lr, "betas": list(r.adam_betas), "eps": 1e-8, "weight_decay": r.weight_decay}
    if on_cpu and not off["optimizer"]:
        # DeepSpeed's fused Adam is a GPU kernel; on CPU use torch's AdamW (no JIT build needed).
        params["torch_adam"] = True
    opt = ds.get("optimizer")
    if _auto(opt):
        ds["optimizer"] = {"type": "AdamW", "params": params}
    else:
        merged = dict(params)
        merged.update({k: v for k, v in (opt.get("params") or {}).items() if not _auto(v)})
        ds["optimizer"] = {"type": opt.get("type", "AdamW"), "params": merged}
    ds.pop("scheduler", None)  # our LR schedule is passed to deepspeed.initialize
    return ds


def normalize_cuda_arch_list(environ=None) -> str:
    """Make TORCH_CUDA_ARCH_LIST readable by DeepSpeed's just-in-time op builder; return a note ('' if unchanged).

    Containers for Hopper and Blackwell often set architecture-specific entries such as ``9.0a`` or ``10.0f``.
    PyTorch accepts them; DeepSpeed 0.19 parses every entry as ``major.minor[+PTX]`` and stops building its
    fused Adam with ``invalid literal for int() with base 10: '0a'``. DeepSpeed's kernels use no
    architecture-specific instructions, so the suffix is dropped (``9.0a`` -> ``9.0``, ``9.0a+PTX`` ->
    ``9.0+PTX``) in this process's environment."""
    env = os.environ if environ is None else environ
    value = env.get("TORCH_CUDA_ARCH_LIST")
    if not value or not value.strip():
        return ""
    out = []
    for entry in value.replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        arch, plus, ptx = entry.partition("+")
        major, dot, minor = arch.partition(".")
        digits = minor.rstrip("abcdefghijklmnopqrstuvwxyz")
        if dot and major.isdigit() and digits.isdigit():
            entry = f"{major}.{digits}{plus}{ptx}"
        if entry not in out:
            out.append(entry)
    fixed = ";".join(out)
    if fixed == value:
        return ""
    env["TORCH_CUDA_ARCH_LIST"] = fixed
    return (f"TORCH_CUDA_ARCH_LIST={value!r} has architecture suffixes DeepSpeed's op builder cannot parse; "
            f"using {fixed!r} for its just-in-time ops")
