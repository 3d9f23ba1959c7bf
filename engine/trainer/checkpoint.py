"""Checkpoints: DeepSpeed's own format plus the engine's state, made visible atomically.

Layout under ``output_dir/checkpoints/``::

    <tag>/                 DeepSpeed files (model + optimizer shards) written by every rank
    <tag>/rng_rank<R>.pt   each rank's RNG states (python, numpy, torch)
    <tag>/engine_state.json  step, epoch, position in the epoch, metrics (rank 0)
    <tag>/COMPLETE         written last, after every rank finished
    latest                 the tag of the newest complete checkpoint (moved with os.replace)

A checkpoint counts only once ``COMPLETE`` exists: ``latest`` moves after all
ranks passed a barrier, so a crash mid-save leaves the previous one in charge.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
from typing import Any, Dict, List, Optional

from engine.trainer.faults import fault

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, COMPLETE))


class UnsafeFileError(ValueError):
    """A file the engine reads holds a pickle with arbitrary objects (code would run): refused, exit code 2."""


# The few DeepSpeed classes its optimizer-state files hold (loss scaler, ZeRO stage, fragment addresses):
# plain records, allowed by name so the rest of a checkpoint still loads with ``weights_only=True``.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load`` that only accepts tensors and plain containers; anything else is refused, not run."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(_unsafe_message(path, e)) from None


def _unsafe_message(path, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"{path} holds objects other than tensors and plain data, so it was not loaded (unpickling it "
            f"could run code). If you made this file and trust it, re-save it as plain tensors; otherwise "
            f"delete it. ({first})")


class CheckpointSaveError(RuntimeError):
    """A save failed; the previous checkpoint is untouched and still ``latest``."""


def save(engine, root: str, tag: str, state: Dict[str, Any], extra_writer=None) -> str:
    """Save a checkpoint on every rank; returns its folder. ``latest`` moves only when all ranks are done.

    ``extra_writer(folder)`` (optional) runs on every rank after DeepSpeed's files are written, e.g. to
    store a LoRA adapter beside them.
    """
    final = os.path.join(root, tag)
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(final):  # a leftover of an interrupted save of the same tag
            shutil.rmtree(final)
    _barrier()
    try:
        if fault("enospc_in_save") == tag:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        engine.save_checkpoint(root, tag=tag, client_state={"engine_state": state}, save_latest=False)
        torch.save(rng_state(), os.path.join(final, f"rng_rank{rank}.pt"))
        if extra_writer is not None:
            extra_writer(final)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
        prev = latest_tag(root)
        hint = "free disk space (or point run.output_dir at a larger disk) and resume" \
            if e.errno == errno.ENOSPC else "check the folder's permissions and resume"
        raise CheckpointSaveError(
            f"saving checkpoint {final} failed: {e}. The partial save was removed; the previous checkpoint "
            f"({prev or 'none'}) is intact and still 'latest'; {hint}."
        ) from e
    _barrier()  # every rank's shards and RNG file are on disk
    if rank == 0:
        if fault("crash_in_save") == tag:
            os._exit(86)  # die after the shards are written but before the checkpoint is marked complete
        _atomic_write(os.path.join(final, "engine_state.json"), json.dumps(state, indent=2))
        _atomic_write(os.path.join(final, COMPLETE), "")
        _atomic_write(os.path.join(root, "latest"), tag)
    _barrier()
    return final


def promote_best(root: str, src_tag: str) -> None:
    """Point ``best`` at a complete checkpoint: a symlink swapped in one os.replace (no copy of the weights)."""
    if _rank() == 0:
        best = os.path.join(root, "best")
        tmp = best + ".incoming"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(src_tag, tmp)
        os.replace(tmp, best)
    _barrier()


def latest_tag(root: str) -> Optional[str]:
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        tag = f.read().strip()
    return tag if tag and is_complete(os.path.join(root, tag)) else None


@contextlib.contextmanager
def weights_only_loads():
    """DeepSpeed reads checkpoint files with a full unpickler (``weights_only=False``); inside this block every
    ``torch.load`` is ours instead, so a checkpoint that carries code is refused rather than run."""
    original = torch.load

    def load(f, map_location=None, *args, weights_only=None, mmap=None, **kwargs):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return original(f, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise UnsafeFileError(_unsafe_message(f, e)) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load(engine, ckpt_dir: str, module_only: bool = False, universal: Optional[str] = None,
         restore_rng: bool = True) -> Dict[str, Any]:
    """Restore model, optimizer, LR schedule and this rank's RNG (or only the model); return the engine state.

    ``universal``: the checkpoint's universal form (reshape.py) to load the DeepSpeed state from instead,
    for a run on another number of ranks or ZeRO stage (DeepSpeed's ``checkpoint.load_universal`` must be
    on). ``restore_rng=False`` keeps this rank's RNG as seeded (another layout: no such rank was saved).
    """
    ckpt_dir = os.path.abspath(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(
            f"{ckpt_dir} is not a complete checkpoint of this engine (no {COMPLETE} marker: the save was "
            f"interrupted or the folder is something else); resume from checkpoints/latest instead"
        )
    root, tag = os.path.split(os.path.abspath(universal) if universal else ckpt_dir)
    groups = getattr(engine.optimizer, "param_groups", None) or []
    decays = [g.get("weight_decay") for g in groups]
    with weights_only_loads():
        path, _ = engine.load_checkpoint(root, tag=tag, load_module_only=module_only,
                                         load_optimizer_states=not module_only,
                                         load_lr_scheduler_states=not module_only)
    if universal and not module_only:
        _repair_universal_load(engine.optimizer, decays)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
    rng_file = os.path.join(ckpt_dir, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_file) and not module_only and restore_rng:
        set_rng_state(safe_torch_load(rng_file))
    with open(os.path.join(ckpt_dir, "engine_state.json"), "r", encoding="utf-8") as f:
        return json.load(f)


def _repair_universal_load(optimizer, decays: List[Optional[float]]) -> None:
    """Two things DeepSpeed's ZeRO-3 universal loader gets wrong, put right after it ran.

    It gives every param group the settings of the first (the no-decay group of biases and norms would get
    weight decay): the groups' own weight decay is restored. It stores one ``step`` tensor in the Adam
    state of every sub-group, and torch's Adam increments it in place once per sub-group and step, so the
    bias correction would run ahead: each state gets its own copy. Both are no-ops after ZeRO-1/2 loads.
    """
    for g, wd in zip(optimizer.param_groups, decays):
        if wd is not None:
            g["weight_decay"] = wd
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.clone()


def read_state(ckpt_dir: str) -> Dict[str, Any]:
    """The engine state a checkpoint was saved with (step, epoch, position, layout, recipe)."""
    with open(os.path.join(ckpt_dir, "engine_state.json"), "r", encoding="utf-8") as f:
        return json.load(f)


def prune(root: str, keep_last: int, protect: List[str]) -> None:
    """Delete all but the newest ``keep_last`` step/epoch checkpoints; never ``best`` or protected tags."""
    if keep_last <= 0 or _rank() != 0 or not os.path.isdir(root):
        return
    tags = []
    for name in os.listdir(root):
        d = os.path.join(root, name)
        if name == "best" or os.path.islink(d) or name in protect or not is_complete(d):
            continue
        with open(os.path.join(d, "engine_state.json"), "r", encoding="utf-8") as f:
            tags.append((json.load(f)["global_step"], name))
    for _, name in sorted(tags)[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
