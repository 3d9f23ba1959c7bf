"""What may change between a run and its resumption.

A resumed run must rebuild the same model and optimizer, so architecture keys are
fixed. Keys that shape the optimisation (schedule, data) would silently make the
resumed run different from the one that was started, so changing them needs
``run.allow_recipe_change=true``. The batch is judged as a whole: micro-batch,
accumulation and number of ranks may change as long as the global batch stays
(engine/trainer/reshape.py). The DeepSpeed config may change (another ZeRO stage,
offload): the checkpoint then goes through DeepSpeed's universal format. Everything
else (logging, evaluation, output) may change freely. Every difference is listed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

from engine.config import Problem
from engine.trainer.reshape import check_global_batch, keep_global_batch, saved_layout

# Prefixes of dotted keys; the first match decides.
FIXED = ("model.arch", "model.model_type", "model.lora", "model.freeze_vit", "model.freeze_qformer",
         "model.freeze_llm", "model.load_in_8bit", "model.load_in_4bit", "model.max_txt_len", "model.image_size",
         "run.precision")
BATCH = ("run.batch_size_train", "run.accum_grad_iters")  # judged together with the number of ranks
FREE = ("run.output_dir", "run.resume_ckpt_path", "run.overwrite_output_dir", "run.log_freq", "run.val_freq",
        "run.num_workers", "run.batch_size_eval", "run.num_beams", "run.max_len", "run.min_len",
        "run.repetition_penalty", "run.length_penalty", "run.valid_splits", "run.test_splits", "run.evaluate",
        "run.keep_last", "run.save_every_steps", "run.save_frozen", "run.max_eval_samples", "run.best_metric", "run.patience",
        "run.spice", "run.allow_recipe_change", "model.pretrained", "model.use_grad_checkpoint",
        "model.checkpoint_qformer", "model.checkpoint_llm",
        "run.max_bad_samples", "run.retrieval_group_size", "run.deepspeed", "run.dist_timeout_s")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: d}


def diff(old: dict, new: dict) -> List[Tuple[str, Any, Any]]:
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _kind(key: str) -> str:
    if any(key == p or key.startswith(p + ".") for p in FIXED):
        return "fixed"
    if any(key == p or key.startswith(p + ".") for p in FREE):
        return "free"
    return "schedule"


def read_saved_recipe(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "engine_state.json"), "r", encoding="utf-8") as f:
        return json.load(f)["recipe"]


def check_resume(ckpt_dir: str, recipe, world_size: int = 1) -> Tuple[List[Problem], List[str]]:
    """(problems that forbid resuming, notes of allowed differences). May set ``run.accum_grad_iters`` to
    keep the checkpoint's global batch on another number of ranks (reshape.keep_global_batch)."""
    old = read_saved_recipe(ckpt_dir)
    layout = saved_layout(ckpt_dir)
    problems, notes = keep_global_batch(recipe, layout, world_size)
    if not problems and not notes:
        p, n = check_global_batch(recipe, layout, world_size)
        problems, notes = problems + p, notes + n
    allow = recipe.run.allow_recipe_change
    for key, was, now in diff(old, recipe.to_dict()):
        if key in BATCH:
            continue
        kind = _kind(key)
        line = f"{key}: {was!r} in the checkpoint, {now!r} now"
        if kind == "fixed":
            problems.append(Problem(key, f"{was!r} in {ckpt_dir}, {now!r} now: the model/optimizer cannot change "
                                         f"on resume; start a new run (model.finetuned / load_finetuned) instead"))
        elif kind == "schedule" and not allow:
            problems.append(Problem(key, f"{was!r} in {ckpt_dir}, {now!r} now: changes the training being resumed; "
                                         f"pass --options run.allow_recipe_change=true to accept"))
        else:
            notes.append(line)
    return problems, notes
