"""Checking every split of every dataset of a recipe before training (``tools/check_dataset.py``).

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

import logging
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

from .errors import KINDS, WARNING_KINDS, BadRecord, DatasetError, count_kinds, describe_counts


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
    """What :func:`check_recipe_datasets` found: per-split summaries and every bad record."""

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


def _splits(recipe) -> List[str]:
    r = recipe.run
    return list(dict.fromkeys(list(r.train_splits) + list(r.valid_splits) + list(r.test_splits)))


def check_recipe_datasets(recipe, full_decode: bool = False, log=None) -> Report:
    """Scan every split (run.train/valid/test_splits) of every dataset of ``recipe``.

    ``log(str)``, when given, hears progress (one line per split).
    """
    from engine.build import build_dataset

    report = Report(full_decode=full_decode)
    train = set(recipe.run.train_splits)
    for name in recipe.datasets:
        seen: Dict[str, str] = {}
        for split in _splits(recipe):
            if log:
                log(f"checking {name}/{split} ...")
            data_log = logging.getLogger("engine.data")
            level = data_log.level
            data_log.setLevel(logging.ERROR)  # the skip warnings would repeat what the report says
            try:
                # Every bad record lands in ds.bad_records (and in the report) instead of failing the build.
                ds = build_dataset(recipe, name, split, is_train=split in train, max_bad_samples=sys.maxsize,
                                   check_images=True)
            except (DatasetError, ValueError, OSError) as e:
                file = getattr(e, "filename", None) or f"datasets.{name} ({split})"
                report.splits.append(SplitSummary(name, split, file, note="could not be read"))
                report.bad.append(BadRecord(file, "file", "", "", [("missing_file", str(e))]))
                continue
            finally:
                data_log.setLevel(level)
            file = getattr(ds, "ann_file", "?")
            if file in seen:
                report.splits.append(SplitSummary(name, split, file, note=f"same file as {seen[file]}"))
                continue
            seen[file] = split
            images = len({r[2] for r in ds.image_refs()}) if hasattr(ds, "image_refs") else 0
            summary = SplitSummary(name, split, file, records=len(ds) + len(getattr(ds, "bad_records", [])),
                                   images=images)
            report.splits.append(summary)
            report.bad += list(getattr(ds, "bad_records", []))
            if hasattr(ds, "duplicate_ids"):
                report.bad += ds.duplicate_ids()
            if hasattr(ds, "verify_images"):
                strict = getattr(ds, "strict_boxes", False)
                for b in ds.verify_images(decode=full_decode):
                    warning = not strict and all(k in WARNING_KINDS for k in b.kinds)
                    (report.warnings if warning else report.bad).append(b)
    return report

