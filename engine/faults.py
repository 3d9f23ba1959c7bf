"""Faults: the exception of a run that stopped on purpose, and test-only fault injection.

Fault injection is switched on by the ENGINE_FAULT environment variable.

The fault suite uses it to prove the engine's guarantees (a crash in the middle of a
save, a full disk) without timing luck. Unset in normal runs: every check is one
dictionary lookup. Format: ``ENGINE_FAULT=<name>:<arg>[,<name>:<arg>...]``.
"""
from __future__ import annotations

import os
from typing import Optional


def fault(name: str) -> Optional[str]:
    """The argument of fault ``name`` if it is switched on, else None."""
    spec = os.environ.get("ENGINE_FAULT")
    if not spec:
        return None
    for item in spec.split(","):
        key, _, arg = item.partition(":")
        if key.strip() == name:
            return arg.strip()
    return None


class RunStopped(Exception):
    """The run stopped early on purpose (a signal, a fault limit) after saving a resumable checkpoint;
    ``code`` is the process's exit code (README: exit codes)."""

    INTERRUPTED, FAULT_LIMIT = 4, 5

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
