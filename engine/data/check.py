"""The report of checking every split of every dataset of a recipe before training (``tools/check_dataset.py``;
the scan itself is :func:`engine.build.check_recipe_datasets`, which builds the datasets).

Training runs the fast part of these checks at dataset construction (files
exist, records have the right shape, targets are not empty) and stops with the
same kind of report. The full check here adds, per split file:

* image headers: each image's real size, and every box checked against it
  (not against the sizes written in the JSON);
* duplicate ids (evaluation keys results by id);
* with ``full_decode``: every image decoded;
* as warnings (problems with the dataset's ``strict_boxes``): boxes with more than
  half their area outside the image, from the real image size.

Nothing is skipped: ``max_bad_samples`` does not hide records from the report.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

from .errors import KINDS, BadRecord, count_kinds, describe_counts


@dataclass
class SplitSummary:
    dataset: str
    split: str
    file: str
    records: int = 0      # records read (good + bad)
    images: int = 0       # distinct image files
    note: str = ""        # e.g. "same file as val"


@dataclass
class Report:
    """What :func:`engine.build.check_recipe_datasets` found: per-split summaries and every bad record."""

    splits: List[SplitSummary] = field(default_factory=list)
    bad: List[BadRecord] = field(default_factory=list)
    #: Records kept with a warning (a box mostly outside the image); problems only with strict_boxes.
    warnings: List[BadRecord] = field(default_factory=list)
    full_decode: bool = False

    @property
    def ok(self) -> bool:
        return not self.bad

    def counts(self) -> Dict[str, int]:
        """Bad records per kind of problem."""
        return count_kinds(self.bad)

    def by_kind(self) -> Dict[str, List[BadRecord]]:
        out: Dict[str, List[BadRecord]] = defaultdict(list)
        for b in self.bad:
            for kind in dict.fromkeys(b.kinds):
                out[kind].append(b)
        return out

    def format(self, show: int = 5) -> str:
        mode = "every image decoded" if self.full_decode else "image headers read; --full also decodes every image"
        lines = [f"Checked {len(self.splits)} split(s) ({mode}):"]
        for s in self.splits:
            what = s.note or f"{s.records} records, {s.images} images"
            lines.append(f"  {s.dataset}/{s.split}: {s.file}: {what}")
        if self.warnings:
            lines.append(f"WARNINGS: {len(self.warnings)} records kept ({describe_counts(count_kinds(self.warnings))}"
                         f"; strict_boxes: true counts them as bad)")
            lines += _listing(self.warnings, show)
        if self.ok:
            lines.append("OK: no problems found." if not self.warnings else "OK: no problems found besides the "
                                                                             "warnings.")
            return "\n".join(lines)
        lines.append(f"PROBLEMS: {len(self.bad)} bad records ({describe_counts(self.counts())})")
        lines += _listing(self.bad, show)
        return "\n".join(lines)


def _listing(records: List[BadRecord], show: int) -> List[str]:
    groups: Dict[str, List[BadRecord]] = defaultdict(list)
    for b in records:
        for kind in dict.fromkeys(b.kinds):
            groups[kind].append(b)
    lines = []
    for kind in [k for k in KINDS if k in groups] + sorted(set(groups) - set(KINDS)):
        recs = groups[kind]
        lines.append(f"{KINDS.get(kind, kind)}: {len(recs)}")
        for b in recs[:show]:
            text = "; ".join(t for k, t in b.problems if k == kind)
            where = b.file if b.where == "file" else f"{b.file} {b.where} ({b.id_name} {b.id})"
            lines.append(f"  - {where}: {text}")
        if len(recs) > show:
            lines.append(f"  ... and {len(recs) - show} more")
    return lines
