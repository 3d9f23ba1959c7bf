"""Resuming on another number of GPUs, or under another ZeRO stage.

A ZeRO checkpoint holds every rank's shard of the fp32 weights and Adam state,
cut for the world size and stage that wrote it. DeepSpeed's universal checkpoint
format stores the same state per parameter instead; ``ds_to_universal`` converts
a checkpoint to it and ``checkpoint.load_universal`` re-shards it for whatever
layout loads it. This module decides when that is needed, runs the conversion
once (``<checkpoint>/universal``, made atomically, reused by later resumes) and
keeps the rest of the training the same:

* the global batch (micro-batch x ranks x accumulation): when only the number
  of ranks changed, ``run.accum_grad_iters`` is scaled to keep it; the sampler
  deals whole micro-batches round-robin (engine/data/sampler.py), so the
  resumed run trains on the same micro-batches in every step;
* the LR schedule: its step counter is restored and the total number of steps,
  a function of the global batch, stays the same;
* the data position: the samples already taken this epoch, converted to
  micro-batches of the new layout.

Every change is reported in the log at the start of the resumed run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional, Tuple

from engine.checkpoints.paths import COMPLETE, is_complete
from engine.config import Problem

logger = logging.getLogger("engine")

UNIVERSAL = "universal"  # sub-folder of a checkpoint holding its universal form


@dataclass
class SavedLayout:
    """How the run that wrote a checkpoint was laid out."""
    world_size: int
    zero_stage: Optional[int]
    batch_size_train: int
    accum_grad_iters: int
    deepspeed: Optional[str] = None  # the run's DeepSpeed config file

    @property
    def global_batch(self) -> int:
        return self.batch_size_train * self.accum_grad_iters * self.world_size

    def describe(self) -> str:
        return (f"{self.batch_size_train} per micro-batch x {self.world_size} rank(s) x "
                f"{self.accum_grad_iters} accumulation step(s)")


def describe(batch: int, world: int, accum: int) -> str:
    return SavedLayout(world, None, batch, accum).describe()


def saved_layout(ckpt_dir: str) -> SavedLayout:
    path = os.path.join(ckpt_dir, "engine_state.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint of this engine (no engine_state.json); "
                                f"name a folder under run.output_dir/checkpoints/ (latest names the newest)")
    with open(path, "r", encoding="utf-8") as f:
        state = json.load(f)
    run = state["recipe"]["run"]
    stage = state.get("zero_stage")
    if stage is None:  # written before the stage was recorded: DeepSpeed's own record of its config
        stage = _stage_from_deepspeed_files(ckpt_dir)
    return SavedLayout(world_size=int(state.get("world_size") or 1), zero_stage=stage,
                       batch_size_train=int(run["batch_size_train"]), accum_grad_iters=int(run["accum_grad_iters"]),
                       deepspeed=run.get("deepspeed"))


def _stage_from_deepspeed_files(ckpt_dir: str) -> Optional[int]:
    names = os.listdir(ckpt_dir)
    if any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in names):
        return 3
    if any(n.endswith("_optim_states.pt") for n in names):
        return 2 if "mp_rank_00_model_states.pt" in names else None
    return None


def keep_global_batch(recipe, layout: SavedLayout, world: int) -> Tuple[List[Problem], List[str]]:
    """On another number of ranks, scale ``run.accum_grad_iters`` so the global batch stays the checkpoint's.

    Only when the recipe kept the checkpoint's micro-batch and accumulation (a recipe that sets other
    values is judged by ``check_global_batch``). Returns (problems, notes); changes ``recipe`` in place.
    """
    r = recipe.run
    if world == layout.world_size:
        return [], []
    if (r.batch_size_train, r.accum_grad_iters) != (layout.batch_size_train, layout.accum_grad_iters):
        return [], []
    per_step = r.batch_size_train * world
    if layout.global_batch % per_step:
        ok = [a for a in range(1, layout.global_batch + 1) if layout.global_batch % a == 0
              and (layout.global_batch // a) % world == 0]
        hint = ", ".join(f"run.batch_size_train={layout.global_batch // (a * world)} run.accum_grad_iters={a}"
                         for a in ok[:3])
        return [Problem("run.accum_grad_iters", (
            f"the checkpoint's global batch is {layout.global_batch} ({layout.describe()}); with "
            f"run.batch_size_train={r.batch_size_train} on {world} ranks no whole number of accumulation steps "
            f"gives it. " + (f"Set e.g. {hint}" if hint else f"Resume on a number of ranks that divides "
                                                                f"{layout.global_batch}") +
            ", or pass run.allow_recipe_change=true to go on with another global batch"))], []
    accum = layout.global_batch // per_step
    r.accum_grad_iters = accum
    return [], [f"{layout.world_size} -> {world} rank(s): run.accum_grad_iters {layout.accum_grad_iters} -> "
                f"{accum} keeps the global batch at {layout.global_batch} "
                f"({describe(r.batch_size_train, world, accum)}; it was {layout.describe()})"]


def check_global_batch(recipe, layout: SavedLayout, world: int) -> Tuple[List[Problem], List[str]]:
    """The global batch shapes the LR schedule and the data position: it may only change on request."""
    r = recipe.run
    now = r.batch_size_train * r.accum_grad_iters * world
    if now == layout.global_batch:
        if (r.batch_size_train, r.accum_grad_iters, world) != (layout.batch_size_train, layout.accum_grad_iters,
                                                               layout.world_size):
            return [], [f"global batch kept at {now}: {describe(r.batch_size_train, world, r.accum_grad_iters)} "
                        f"(it was {layout.describe()})"]
        return [], []
    line = (f"the global batch would change from {layout.global_batch} ({layout.describe()}) to {now} "
            f"({describe(r.batch_size_train, world, r.accum_grad_iters)})")
    if r.allow_recipe_change:
        return [], [line + ": accepted (run.allow_recipe_change); the epoch goes on from the same sample, "
                           "the LR schedule is recomputed for the new number of steps"]
    return [Problem("run.batch_size_train", line + ": that changes the training being resumed. Keep "
                    "run.batch_size_train x run.accum_grad_iters x ranks equal to the checkpoint's, or pass "
                    "run.allow_recipe_change=true to accept")], []


def needs_universal(layout: SavedLayout, world: int, stage: int, deepspeed: Optional[str] = None) -> bool:
    """Another number of ranks or ZeRO stage; or another DeepSpeed config file (e.g. optimizer offload
    switched on), where the universal form is the one way DeepSpeed promises to load the state."""
    return (layout.world_size != world or (layout.zero_stage is not None and layout.zero_stage != stage)
            or (deepspeed is not None and layout.deepspeed is not None and layout.deepspeed != deepspeed))


def universal_dir(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, UNIVERSAL)


def convert_to_universal(ckpt_dir: str, workers: int = 1) -> str:
    """Convert ``ckpt_dir`` with DeepSpeed's ``ds_to_universal`` into ``ckpt_dir/universal``; return it.

    Made in a temporary folder and moved into place with one rename once complete, so an interrupted
    conversion is never mistaken for a finished one; a finished one is reused.
    """
    # deepspeed and torch here, not at the top: reading a layout must not import them.
    from deepspeed.checkpoint import ds_to_universal

    from engine.checkpoints.safe_loading import weights_only_loads  # (imports torch)

    out = universal_dir(ckpt_dir)
    if is_complete(out):
        return out
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {COMPLETE} marker); convert a "
                                f"complete one (checkpoints/latest names the newest)")
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=ckpt_dir, output_folder=tmp, num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    printed = io.StringIO()
    try:
        with weights_only_loads(), contextlib.redirect_stdout(printed):
            ds_to_universal.main(args)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.error("ds_to_universal output:\n%s", printed.getvalue()[-4000:])
        raise
    with weights_only_loads():
        _optimizer_state_for_every_stage(tmp)
    _name_model_states_for_every_stage(tmp)
    with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8"):
        pass
    if os.path.isdir(out):  # an incomplete leftover (no COMPLETE)
        shutil.rmtree(out)
    os.replace(tmp, out)
    # ds_to_universal also leaves a `latest_universal` pointer beside its output, naming the temporary folder;
    # the engine loads by explicit path, and a pointer to a folder that is gone would only mislead.
    stale = os.path.join(ckpt_dir, "latest_universal")
    if os.path.isfile(stale):
        os.remove(stale)
    return out


def _name_model_states_for_every_stage(folder: str) -> None:
    """Loading a universal checkpoint reads the model-states file only for the LR schedule and DeepSpeed's
    bookkeeping (weights and optimizer state come from ``zero/``), but looks for it under the name the
    loading stage writes: ``mp_rank_00_model_states.pt`` (ZeRO-1/2) or ``zero_pp_rank_0_mp_rank_00_...``
    (ZeRO-3). Give it both names, so a ZeRO-2 checkpoint resumes under ZeRO-3 and the reverse."""
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if os.path.isfile(os.path.join(folder, n))]
    if not have:
        raise FileNotFoundError(f"ds_to_universal wrote no model-states file into {folder}")
    for n in names:
        if n not in have:
            os.link(os.path.join(folder, have[0]), os.path.join(folder, n))


def _optimizer_state_for_every_stage(folder: str) -> None:
    """``zero/optimizer_state.pt`` is written in the layout of the stage that saved the checkpoint, and
    each stage's loader reads its own: ZeRO-3 takes Adam's step and the group settings from the torch
    optimizer state inside it; ZeRO-1/2 take the step from a ``step.pt`` beside every parameter's state
    and check the DeepSpeed version. Add what the other stage reads, from the same values."""
    # deepspeed and torch here, not at the top: reading a layout (tools/to_universal.py) must not import them.
    import deepspeed
    import torch

    zero = os.path.join(folder, "zero")
    path = os.path.join(zero, "optimizer_state.pt")
    sd = torch.load(path, map_location="cpu")
    groups = sd["param_groups"]
    params = [d for d in sorted(os.listdir(zero)) if os.path.isdir(os.path.join(zero, d))]
    inner = sd.get("optimizer_state_dict")
    if inner is None:  # saved under ZeRO-1/2
        steps = [os.path.join(zero, d, "step.pt") for d in params if os.path.isfile(os.path.join(zero, d, "step.pt"))]
        if not steps:
            raise RuntimeError(f"{zero} holds no optimizer step (step.pt): the conversion is incomplete")
        sd["optimizer_state_dict"] = {"state": {0: {"step": torch.load(steps[0], map_location="cpu")}},
                                      "param_groups": groups}
    else:  # saved under ZeRO-3: its per-parameter states are flat tensors; ZeRO-1/2 read {param, cat_dim}
        step = inner["state"][0]["step"]
        sd.setdefault("ds_version", deepspeed.__version__)
        shapes = {}
        states = os.path.join(folder, "zero_pp_rank_0_mp_rank_00_model_states.pt")
        for group in torch.load(states, map_location="cpu")["param_shapes"]:
            shapes.update(group)
        for d in params:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                f = os.path.join(zero, d, f"{key}.pt")
                if not os.path.isfile(f):
                    continue
                t = torch.load(f, map_location="cpu")
                if isinstance(t, torch.Tensor):
                    torch.save({"param": t.view(shapes[d]), "cat_dim": 0}, f)
            if os.path.isfile(os.path.join(zero, d, "exp_avg.pt")) and not os.path.isfile(os.path.join(zero, d, "step.pt")):
                torch.save(step, os.path.join(zero, d, "step.pt"))
    torch.save(sd, path)


def prepare_universal(ckpt_dir: str, rank: int, wait_group=None) -> str:
    """Rank 0 converts (or finds a finished conversion) while the others wait; every rank returns the
    folder to load. ``wait_group`` is a process group whose timeout allows for a long conversion."""
    import torch.distributed as dist  # here, not at the top: reading a layout must not import torch

    out = universal_dir(ckpt_dir)
    if rank == 0:
        if is_complete(out):
            logger.info("using the universal form of %s made earlier (%s)", ckpt_dir, out)
        else:
            logger.info("converting %s to DeepSpeed's universal checkpoint format (ds_to_universal) ...", ckpt_dir)
            convert_to_universal(ckpt_dir)
            logger.info("converted: %s", out)
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=wait_group)
    return out
