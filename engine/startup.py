"""Start-up helpers of engine/train.py: the one-process environment, the output folder's rules, the start-up
clock, and how an error becomes an exit code (README: exit codes). Nothing here imports torch at load time:
engine/train.py checks the recipe before anything heavy is imported."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from typing import List, Optional, Tuple

from engine.checkpoints.paths import CheckpointNotFound, resolve_checkpoint


class UsageError(Exception):
    """A problem with the recipe, the paths or the data, found before training: exit code 2."""


def single_process_env() -> None:
    """Without the launcher, give torch.distributed a one-rank world (else DeepSpeed looks for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


FAILED_STARTS = "failed-starts"  # what starts that failed before their first step left, set aside (never deleted)
# What a start writes before its first step; a folder holding more (checkpoints, step logs) holds a run.
_START_FILES = {"config.yaml", "train.log", "tb"}


def _entries(out: str) -> List[str]:
    """The folder's entries, less the starts set aside (they hold no run)."""
    return [e for e in os.listdir(out) if e != FAILED_STARTS] if os.path.isdir(out) else []


def set_aside_failed_start(out: str, reason: str = "") -> Optional[str]:
    """After a start that failed before its first step, in a folder it began empty: move what it wrote
    (config.yaml, train.log with ``reason`` appended, tb/) to ``out/failed-starts/<UTC time>/`` so the
    corrected start can use the folder; the log stays there to read. Anything else in the folder (a
    checkpoint, step logs) means a run: nothing is moved. Returns where they went, or None."""
    entries = _entries(out)
    if not entries or not set(entries) <= _START_FILES:
        return None
    dest = os.path.join(out, FAILED_STARTS, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    n = 1
    while os.path.exists(dest):  # two failed starts within a second
        dest = os.path.join(out, FAILED_STARTS, time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{n}")
        n += 1
    os.makedirs(dest)
    logging.shutdown()  # train.log's handler lets go of the file first
    if reason and "train.log" in entries:
        with open(os.path.join(out, "train.log"), "a", encoding="utf-8") as f:
            f.write(f"start failed: {reason}\n")
    for e in entries:
        os.replace(os.path.join(out, e), os.path.join(dest, e))
    return dest


def prepare_output_dir(recipe, resume: bool, rank: int) -> str:
    """Refuse to mix two runs in one folder; return the checkpoint to resume from (or None)."""
    # Here, not at the top: the checkpoint module loads torch, and nothing heavy loads before the recipe is checked.
    from engine.trainer import checkpoint

    r = recipe.run
    out = r.output_dir
    ckpt_root = os.path.join(out, "checkpoints")
    if resume or r.resume_ckpt_path:
        path = r.resume_ckpt_path
        if path is not None:
            # What the tools take works here too: a checkpoint folder, checkpoints/latest (DeepSpeed's pointer
            # file), checkpoints/best, checkpoints/ or a run folder (its newest complete checkpoint).
            try:
                found = resolve_checkpoint(path)
            except CheckpointNotFound as e:
                raise FileNotFoundError(f"run.resume_ckpt_path: {e}") from None
            path = found.folder
        else:
            tag = checkpoint.latest_tag(ckpt_root)
            if tag is None:
                raise FileNotFoundError(f"--resume: no complete checkpoint under {ckpt_root} "
                                        f"(check run.output_dir, or start without --resume)")
            path = os.path.join(ckpt_root, tag)
        inside = os.path.realpath(path).startswith(os.path.realpath(out) + os.sep)
        if inside or r.evaluate or not _entries(out):
            return path
        raise FileExistsError(f"run.output_dir '{out}' holds another run and the checkpoint to resume ({path}) "
                              f"is not part of it; choose an empty run.output_dir")
    if _entries(out) and not r.evaluate:
        if not r.overwrite_output_dir:
            raise FileExistsError(
                f"run.output_dir '{out}' already holds a run. Resume it with --resume, choose another folder "
                f"(--options run.output_dir=...), or replace it with --options run.overwrite_output_dir=true"
            )
        if rank == 0:
            shutil.rmtree(out)
    return None


class StartupClock:
    """How long each start-up stage took, for one log line before the first step (a slow start shows its cause)."""

    def __init__(self):
        self.stages: List[Tuple[str, float]] = []
        self._mark = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, start)

    def add(self, name: str, seconds: float, start: float) -> None:
        gap = start - self._mark  # time between timed stages (imports, logging set-up) is counted, not lost
        if gap > 0.05:
            self.stages.append(("imports and set-up", gap))
        self.stages.append((name, seconds))
        self._mark = start + seconds

    def report(self) -> str:
        merged = {}
        for name, sec in self.stages:
            merged[name] = merged.get(name, 0.0) + sec
        parts = ", ".join(f"{name} {sec:.1f} s" for name, sec in merged.items())
        return f"start-up took {sum(merged.values()):.1f} s: {parts}"


def exit_now(code: int) -> int:
    """In a multi-rank run exit without running destructors (they may wait in a collective forever)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


def trainer_exit_code(e: BaseException) -> Optional[int]:
    """2 for a checkpoint file that would run code, 3 for a checkpoint that could not be saved, else None."""
    # Here, not at the top: these modules load torch, and nothing heavy loads before the recipe is checked.
    from engine.checkpoints.safe_loading import UnsafeFileError
    from engine.trainer.checkpoint import CheckpointSaveError

    if isinstance(e, UnsafeFileError):
        return 2
    if isinstance(e, CheckpointSaveError):
        return 3
    return None
