"""Which checkpoint a path means: one answer for every tool that reads a checkpoint.

A user may hand a tool any of the things a run leaves behind::

    runs/x                           the run folder: its latest complete checkpoint
    runs/x/checkpoints               the same
    runs/x/checkpoints/latest        DeepSpeed's pointer file (holds a tag)
    runs/x/checkpoints/best          the link to the best checkpoint
    runs/x/checkpoints/step200       a checkpoint folder

:func:`resolve_checkpoint` turns each into the real folder of one complete
checkpoint (``COMPLETE`` written) and says how it got there, so the tools can
print what they resolved. Anything else is an error that says what was found
and what is expected.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

# The file names of a checkpoint: engine/trainer/checkpoint.py writes them, the readers here and the tools
# find them (one home for both).
COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"
ENGINE_STATE = "engine_state.json"


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE))


class CheckpointNotFound(FileNotFoundError):
    """The path names no complete checkpoint of this engine."""


@dataclass(frozen=True)
class Resolved:
    """The checkpoint folder a path meant, and how: ``given`` -> ``folder`` (``how``)."""

    given: str
    folder: str
    how: str

    def describe(self) -> str:
        if os.path.abspath(self.given) == self.folder:
            return f"checkpoint {self.folder}"
        return f"checkpoint {self.given} -> {self.folder} ({self.how})"


def _step(folder: str) -> int:
    try:
        with open(os.path.join(folder, ENGINE_STATE), "r", encoding="utf-8") as f:
            return int(json.load(f).get("global_step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1


def complete_checkpoints(root: str) -> List[str]:
    """Complete checkpoint folders under a ``checkpoints`` folder, oldest first (by step, then time saved).

    ``best`` is a link to one of them and is not listed twice."""
    out = []
    for name in os.listdir(root):
        d = os.path.join(root, name)
        if name == "best" or os.path.islink(d) or not os.path.isdir(d) or not is_complete(d):
            continue
        out.append(d)
    return sorted(out, key=lambda d: (_step(d), os.path.getmtime(os.path.join(d, COMPLETE))))


def _read_tag(pointer: str) -> str:
    with open(pointer, "r", encoding="utf-8") as f:
        return f.read().strip()


def _newest(root: str, given: str) -> Resolved:
    """The checkpoint ``root/latest`` names, or else the newest complete one under ``root``."""
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        tag = _read_tag(pointer)
        if tag and is_complete(os.path.join(root, tag)):
            return Resolved(given, os.path.realpath(os.path.join(root, tag)), "the checkpoint 'latest' names")
    found = complete_checkpoints(root)
    if not found:
        raise CheckpointNotFound(
            f"{given}: no complete checkpoint under {root} (a checkpoint counts once its {COMPLETE} file is "
            f"written; the run saved none yet, or every save was interrupted)")
    return Resolved(given, os.path.realpath(found[-1]), "the newest complete checkpoint")


def _listing(path: str) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return "nothing readable"
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"


def resolve_checkpoint(path: str) -> Resolved:
    """The complete checkpoint ``path`` means (see the module doc), or :class:`CheckpointNotFound`."""
    given = path
    path = os.path.normpath(path)
    if not os.path.lexists(path):
        raise CheckpointNotFound(f"{given} does not exist (give a checkpoint folder, checkpoints/latest, "
                                 f"checkpoints/best or the run folder)")
    if os.path.isfile(path):  # a pointer file: DeepSpeed's `latest` (or a copy of it) holds a tag
        root = os.path.dirname(os.path.abspath(path))
        tag = _read_tag(path)
        folder = os.path.join(root, tag)
        if not tag or "\n" in tag or not os.path.isdir(folder):
            raise CheckpointNotFound(f"{given} is a file but not a checkpoint pointer: it should hold the tag of a "
                                     f"checkpoint folder beside it (found {tag[:60]!r})")
        if not is_complete(folder):
            raise CheckpointNotFound(f"{given} names {folder}, which is not complete (no {COMPLETE}); give a "
                                     f"complete checkpoint, or the run folder for its newest complete one")
        return Resolved(given, os.path.realpath(folder), f"the checkpoint {os.path.basename(path)!r} names")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise CheckpointNotFound(f"{given} is neither a folder nor a checkpoint pointer")
    if is_complete(real):
        how = f"'{os.path.basename(path)}' links to it" if os.path.islink(path) else "a checkpoint folder"
        return Resolved(given, real, how)
    for root in (real, os.path.join(real, CHECKPOINTS)):
        if os.path.isfile(os.path.join(root, "latest")) or (
                os.path.basename(root) == CHECKPOINTS and os.path.isdir(root)):
            return _newest(root, given)
    if os.path.isfile(os.path.join(real, ENGINE_STATE)) or any(n.endswith("_model_states.pt")
                                                                 for n in os.listdir(real)):
        raise CheckpointNotFound(
            f"{given} is not a complete checkpoint (no {COMPLETE}: the save was interrupted); give the run "
            f"folder or checkpoints/latest for the newest complete one")
    raise CheckpointNotFound(
        f"{given} is not a checkpoint of this engine: expected a checkpoint folder (with {COMPLETE}, "
        f"{ENGINE_STATE} and DeepSpeed's *_model_states.pt), checkpoints/latest, checkpoints/best or a run folder "
        f"(with checkpoints/); found {_listing(real)}")


def try_resolve(path: str) -> Optional[Resolved]:
    """:func:`resolve_checkpoint`, or None when ``path`` names no checkpoint."""
    try:
        return resolve_checkpoint(path)
    except CheckpointNotFound:
        return None
