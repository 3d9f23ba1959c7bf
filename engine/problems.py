"""What a recipe check reports: one :class:`Problem` per bad key, raised together as a :class:`ConfigError`.

The bottom of the config layer: engine/config.py (the schema) and engine/deepspeed_config.py (the
DeepSpeed config check) both report through it, so neither imports the other's caller.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, List


@dataclass
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(ValueError):
    def __init__(self, problems: List[Problem], source: str = ""):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} problem(s){where}:"] + [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def project_path(path: str) -> str:
    """Resolve a path from a recipe: as given if it exists, else relative to the project root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidate = os.path.join(root, path)
    return candidate if os.path.exists(candidate) else path


def suggest(key: str, valid) -> str:
    """"; did you mean 'x'?" for the closest of `valid`, or nothing."""
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{near[0]}'?" if near else ""


def fmt(v: Any) -> str:
    """A value as a message shows it (strings quoted)."""
    return repr(v) if not isinstance(v, str) else f"'{v}'"
