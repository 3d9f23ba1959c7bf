"""Users' own data: one JSON object per line.

    {"image": "imgs/0001.jpg", "text": "a dog catches a frisbee", "id": "0001"}
    {"image": "imgs/0002.jpg", "text": "the man is waiting for a bus", "boxes": [[10, 20, 100, 80]],
     "prompt": "What is happening? "}

``image`` is relative to ``root`` (or absolute); ``text`` is the target;
``boxes`` (optional) are ``[left, top, width, height]`` in the image's pixels
and are shown the way ``region`` says, as for Sherlock; ``prompt`` (optional)
replaces the model prompt for that record; ``id`` (optional) names the sample
(default ``<file name>:<line>``). Blank lines are skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from engine.registry import DATASETS

from .errors import DatasetError
from .records import DirIndex, RecordDataset, config_from, parse_boxes, read_jsonl, resolve
from .region import REGION_MODES, Box

SPLITS = ("train", "val", "test")
FORMAT = ('one JSON object per line: {"image": "<path>", "text": "<target>", optional "boxes": '
          '[[left, top, width, height], ...], "prompt": "...", "id": "..."}')


@dataclass
class JsonlConfig:
    """Options of the ``jsonl`` dataset (``datasets.jsonl`` in a recipe)."""

    root: str = field(default="", metadata={
        "help": "Folder the files and the records' image paths are relative to."})
    train_file: str = field(default="train.jsonl", metadata={
        "help": "Training records, one JSON object per line: relative to root, or absolute."})
    val_file: str = field(default="val.jsonl", metadata={
        "help": "Validation records: relative to root, or absolute."})
    test_file: Optional[str] = field(default=None, metadata={
        "help": "Records of the 'test' split; unset means the dataset has no test split."})
    region: str = field(default="highlight", metadata={
        "help": "How a record's boxes are shown: highlight, crop, blackout_others, none (as for sherlock).",
        "choices": REGION_MODES})
    crop_margin: float = field(default=0.1, metadata={
        "help": "For region=crop: margin added on each side, as a fraction of the region's width/height."})
    flip: bool = field(default=False, metadata={
        "help": "Allow random horizontal flips in training (off: texts may say left and right)."})
    max_records: Optional[int] = field(default=None, metadata={
        "help": "Use only the first N records of each split (quick runs); unset uses all."})
    max_bad_samples: int = field(default=0, metadata={
        "help": "Skip up to this many bad records (counted in a warning) instead of failing; 0 fails on any."})
    check_images: bool = field(default=True, metadata={
        "help": "Check at start-up that every record's image file exists."})


class _Item(NamedTuple):
    index: int              # line number in the file (1-based)
    path: str
    boxes: Tuple[Box, ...]
    sample_id: str
    image_id: str
    text: str
    prompt: Optional[str]


class JsonlDataset(RecordDataset):
    """JSON-lines records -> samples ``{"image", "prompt", "text_output", "sample_id", "image_id",
    "references", "split_idx"}`` (``references`` = ``[text]``, ``split_idx`` = -1)."""

    unit = "line"

    def __init__(self, ann_file: str, *, root: str, vis_processor: Callable,
                 text_processor: Optional[Callable] = None, prompt: str = "", split: str = "train",
                 is_train: bool = False, region: str = "highlight", flip: bool = False, crop_margin: float = 0.1,
                 max_records: Optional[int] = None, max_bad_samples: int = 0, check_images: bool = True):
        super().__init__(ann_file, vis_processor=vis_processor, text_processor=text_processor, prompt=prompt,
                         split=split, is_train=is_train, region=region, flip=flip, crop_margin=crop_margin)
        self.root = root
        self._load(max_records, max_bad_samples, check_images)

    def _load(self, max_records, max_bad_samples, check_images) -> None:
        lines = read_jsonl(self.ann_file, f"JSONL {self.split} file",
                           missing_fix=f"set root or the split's *_file; the format is {FORMAT}.")
        if max_records is not None:
            lines = lines[: max(0, int(max_records))]
        files = DirIndex() if check_images else None
        name = os.path.basename(self.ann_file)
        items: List[_Item] = []
        bad = []
        for n, rec, error in lines:
            if error is not None:
                bad.append(self.bad(n, None, [("malformed", f"{error} (fix: write {FORMAT})")]))
                continue
            if not isinstance(rec, dict):
                bad.append(self.bad(n, None, [("malformed", f"is a JSON {type(rec).__name__}, not an object "
                                                            f"(fix: write {FORMAT})")]))
                continue
            rid = rec.get("id")
            problems: List[Tuple[str, str]] = []
            if rid is not None and (not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == ""):
                problems.append(("malformed", f"id {rid!r} is not a string or integer (fix: give a unique id "
                                              f"or leave it out)"))
            image = rec.get("image")
            if not isinstance(image, str) or not image.strip():
                problems.append(("malformed", "image is missing or empty (fix: give the image path, relative "
                                              "to root or absolute)"))
                image = None
            text = rec.get("text")
            if not isinstance(text, str) or not text.strip():
                problems.append(("missing_target", "text is missing or empty (fix: give the target text or drop "
                                                   "the line)"))
            prompt = rec.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                problems.append(("malformed", f"prompt {prompt!r} is not a string (fix: give text or leave it out)"))
            boxes, box_problems = parse_boxes(rec.get("boxes"), "boxes")
            problems += box_problems
            path = resolve(self.root, image.strip()) if image else None
            if path is not None and files is not None and not files.exists(path):
                problems.append(("missing_image", f"image file not found: {path} (fix: check root and the "
                                                  f"image path)"))
            if problems:
                bad.append(self.bad(n, rid, problems))
                continue
            sid = str(rid) if rid is not None else f"{name}:{n}"
            items.append(_Item(n, path, tuple(boxes), sid, image.strip(), text.strip(), prompt))
        hints = []
        if files is not None and files.missing > 0 and files.found == 0:
            hints.append(f"No image was found: image paths are relative to root={self.root!r}; set root.")
        self.accept(items, bad, total=len(lines), max_bad_samples=max_bad_samples, hints=hints)

    def annotation(self, index: int) -> Dict[str, Any]:
        it = self.items[index]
        target, lead = self.texts(it.text)
        return {"prompt": self.prompt if it.prompt is None else it.prompt, "text_output": lead + target,
                "sample_id": it.sample_id, "image_id": it.image_id, "references": [it.text], "split_idx": -1}


@DATASETS.register("jsonl", schema=JsonlConfig)
def build_jsonl(*, split: str, is_train: bool, vis_processor: Callable,
                text_processor: Optional[Callable] = None, prompt: str = "", **options: Any) -> JsonlDataset:
    """Build one split (``train``, ``val`` or ``test``) from ``JsonlConfig`` fields."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: jsonl has the splits {', '.join(SPLITS)}")
    cfg = config_from(JsonlConfig, options, "jsonl")
    file = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}[split]
    if file is None:
        raise DatasetError("the jsonl dataset has no test split: set datasets.jsonl.test_file, or remove "
                           "'test' from run.test_splits.")
    return JsonlDataset(
        resolve(cfg.root, file), root=cfg.root, vis_processor=vis_processor, text_processor=text_processor,
        prompt=prompt, split=split, is_train=is_train, region=cfg.region, flip=cfg.flip,
        crop_margin=cfg.crop_margin, max_records=cfg.max_records, max_bad_samples=cfg.max_bad_samples,
        check_images=cfg.check_images)
