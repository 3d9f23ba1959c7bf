"""The one error type for bad data, and the format every dataset check uses.

A dataset reads its annotation file at construction and sorts every record into
an item or a :class:`BadRecord`. :func:`settle_bad_records` then either fails
with one :class:`DatasetError` that lists the count per kind of problem and the
first bad records (file, record index or line, id, what is wrong, the fix), or,
when ``max_bad_samples`` allows it, logs them as skipped. ``tools/check_dataset.py``
reports the same records.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, Tuple

#: How many problems an error message lists before it only gives the count.
SHOW_FIRST = 10

#: Kinds of problem, in report order, with the words used in counts.
KINDS: Dict[str, str] = {
    "missing_file": "missing or unreadable annotation file",
    "malformed": "malformed record",
    "missing_target": "empty or missing target",
    "missing_image": "missing image",
    "undecodable_image": "undecodable image",
    "bad_box": "malformed box",
    "box_outside": "box outside the image",
    "box_mostly_outside": "box mostly outside the image",
    "duplicate_id": "duplicate id",
}


#: Kinds that are warnings unless the dataset asks for strictness (``strict_boxes``): the record is kept.
WARNING_KINDS = ("box_mostly_outside",)


class DatasetError(ValueError):
    """A dataset file, record or image is missing or malformed.

    The message always names the file (and, for a record, its index and id),
    says what is wrong and how to fix it.
    """


class ImageReadError(DatasetError):
    """An image that passed the dataset check cannot be read now (the file changed during the run)."""

    def __init__(self, message: str, *, sample_id: Any, path: str):
        super().__init__(message)
        self.sample_id, self.path = sample_id, path


@dataclass
class BadRecord:
    """One record with one or more problems: ``where`` is e.g. ``record 3`` or ``line 4``."""

    file: str
    where: str
    id_name: str
    id: str
    problems: List[Tuple[str, str]] = field(default_factory=list)  # (kind, text that ends with the fix)

    @property
    def kinds(self) -> List[str]:
        return [k for k, _ in self.problems]

    def __str__(self) -> str:
        return f"{self.where} ({self.id_name} {self.id}): " + "; ".join(t for _, t in self.problems)


def count_kinds(bad: Iterable[BadRecord]) -> Dict[str, int]:
    """Records per kind of problem (a record with two kinds counts under both), in KINDS order."""
    c = Counter(k for b in bad for k in dict.fromkeys(b.kinds))
    return {k: c[k] for k in list(KINDS) + sorted(set(c) - set(KINDS)) if c[k]}


def describe_counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{n} {KINDS.get(k, k)}" for k, n in counts.items())


def format_problems(file: str, problems: Sequence[str], *, what: str = "records",
                    fix: str = "", show: int = SHOW_FIRST, counts: str = "") -> str:
    """``N bad records in FILE (counts):`` + the first ``show`` problems, one a line + the fix."""
    head = f"{len(problems)} bad {what} in {file}" + (f" ({counts})" if counts else "") + ":"
    lines: List[str] = [head]
    lines += [f"  - {p}" for p in problems[:show]]
    if len(problems) > show:
        lines.append(f"  ... and {len(problems) - show} more")
    if fix:
        lines.append(fix)
    return "\n".join(lines)


def format_bad_records(file: str, bad: Sequence[BadRecord], *, fix: str = "", show: int = SHOW_FIRST) -> str:
    return format_problems(file, [str(b) for b in bad], fix=fix, show=show,
                           counts=describe_counts(count_kinds(bad)))


def warn_records(file: str, records: Sequence[BadRecord], *, total: int, log: logging.Logger, fix: str,
                 show: int = 3) -> None:
    """One warning: how many of ``total`` records in ``file`` have a warning, the first ``show``, and ``fix``.
    The records are kept."""
    if not records:
        return
    lines = [f"{len(records)} of {total} records in {file} have warnings "
             f"({describe_counts(count_kinds(records))}):"]
    lines += [f"  - {b}" for b in records[:show]]
    if len(records) > show:
        lines.append(f"  ... and {len(records) - show} more")
    lines.append(fix)
    log.warning("%s", "\n".join(lines))


def settle_bad_records(file: str, bad: Sequence[BadRecord], *, total: int, max_bad_samples: int,
                       log: logging.Logger, hints: Sequence[str] = ()) -> None:
    """Raise one DatasetError listing ``bad``, or log them as skipped when ``max_bad_samples`` allows.

    Skipped records are dropped at construction, counted in the warning, and
    never silently mid-epoch.
    """
    if not bad:
        return
    if len(bad) <= max_bad_samples:
        log.warning("%s", format_bad_records(
            file, bad, show=3,
            fix=f"Skipping these {len(bad)} of {total} records (max_bad_samples={max_bad_samples})."))
        return
    lines = list(hints)
    if max_bad_samples:
        lines.append(f"{len(bad)} bad records is more than max_bad_samples={max_bad_samples}.")
    else:
        lines.append(f"Fix the records, or set max_bad_samples to at least {len(bad)} to skip them "
                     f"(they are counted in a warning). tools/check_dataset.py lists every problem.")
    raise DatasetError(format_bad_records(file, bad, fix="\n".join(lines)))
