"""The one error type for bad data, and the format every dataset check uses."""
from __future__ import annotations

from typing import List, Sequence

#: How many problems an error message lists before it only gives the count.
SHOW_FIRST = 10


class DatasetError(ValueError):
    """A dataset file, record or image is missing or malformed.

    The message always names the file (and, for a record, its index and id),
    says what is wrong and how to fix it.
    """


def format_problems(file: str, problems: Sequence[str], *, what: str = "records",
                    fix: str = "", show: int = SHOW_FIRST) -> str:
    """``N bad records in FILE`` + the first ``show`` problems, one a line + the fix."""
    lines: List[str] = [f"{len(problems)} bad {what} in {file}:"]
    lines += [f"  - {p}" for p in problems[:show]]
    if len(problems) > show:
        lines.append(f"  ... and {len(problems) - show} more")
    if fix:
        lines.append(fix)
    return "\n".join(lines)
