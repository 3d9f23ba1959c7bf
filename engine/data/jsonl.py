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
from collections.abc import Sequence
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .errors import BadRecord, DatasetError
from .records import DirIndex, RecordDataset, config_from, parse_boxes, read_jsonl, resolve
from .region import Box
from .schemas import JsonlConfig
from .store import CachedColumns, cached_columns, duplicate_rows, id_hashes, text_columns, texts

SPLITS = ("train", "val", "test")
FORMAT = ('one JSON object per line: {"image": "<path>", "text": "<target>", optional "boxes": '
          '[[left, top, width, height], ...], "prompt": "...", "id": "..."}')


class _Item(NamedTuple):
    index: int              # line number in the file (1-based)
    path: str
    boxes: Tuple[Box, ...]
    sample_id: str
    image_id: str
    text: str
    prompt: Optional[str]


#: Bump when the parsed columns change meaning: caches of older versions are parsed again.
CACHE_VERSION = 1


def parse_columns(file: str, split: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Read a JSONL file once into columns: per non-blank line its number, image, id, text, prompt and boxes."""
    lines = read_jsonl(file, f"JSONL {split} file",
                       missing_fix=f"set root or the split's *_file; the format is {FORMAT}.")
    name = os.path.basename(file)
    m = len(lines)
    ok, has_prompt = np.zeros(m, dtype=bool), np.zeros(m, dtype=bool)
    line_no = np.zeros(m, dtype=np.int64)
    images, ids, targets, prompts = [], [], [], []
    box_off = np.zeros(m + 1, dtype=np.int64)
    boxes: List[Box] = []
    bad = []
    for k, (n, rec, error) in enumerate(lines):
        line_no[k] = n
        image = sid = text = prompt = ""
        if error is not None:
            bad.append([k, None, [("malformed", f"{error} (fix: write {FORMAT})")]])
        elif not isinstance(rec, dict):
            bad.append([k, None, [("malformed", f"is a JSON {type(rec).__name__}, not an object (fix: write "
                                                f"{FORMAT})")]])
        else:
            rid = rec.get("id")
            problems: List[Tuple[str, str]] = []
            if rid is not None and (not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == ""):
                problems.append(("malformed", f"id {rid!r} is not a string or integer (fix: give a unique id "
                                              f"or leave it out)"))
            raw_image = rec.get("image")
            if not isinstance(raw_image, str) or not raw_image.strip():
                problems.append(("malformed", "image is missing or empty (fix: give the image path, relative "
                                              "to root or absolute)"))
            else:
                image = raw_image.strip()
            raw_text = rec.get("text")
            if not isinstance(raw_text, str) or not raw_text.strip():
                problems.append(("missing_target", "text is missing or empty (fix: give the target text or drop "
                                                   "the line)"))
            raw_prompt = rec.get("prompt")
            if raw_prompt is not None and not isinstance(raw_prompt, str):
                problems.append(("malformed", f"prompt {raw_prompt!r} is not a string (fix: give text or leave it "
                                              f"out)"))
            rec_boxes, box_problems = parse_boxes(rec.get("boxes"), "boxes")
            problems += box_problems
            if problems:
                bad.append([k, rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else
                            (None if rid is None else repr(rid)), problems])
            else:
                ok[k] = True
                sid = str(rid) if rid is not None else f"{name}:{n}"
                text = raw_text.strip()
                has_prompt[k] = raw_prompt is not None
                prompt = raw_prompt or ""
                boxes += rec_boxes
        images.append(image)
        ids.append(sid)
        targets.append(text)
        prompts.append(prompt)
        box_off[k + 1] = len(boxes)
        lines[k] = None
    del lines
    columns = {"ok": ok, "line": line_no, "has_prompt": has_prompt, "box_off": box_off,
               "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "id_hash": id_hashes(ids)}
    for col, values in (("image", images), ("id", ids), ("text", targets), ("prompt", prompts)):
        columns.update(text_columns(col, values))
    return {"records": m, "bad": bad}, columns


class _Items(Sequence):
    """The dataset's items: rows of the record columns, made into :class:`_Item` when indexed."""

    def __init__(self, cols: CachedColumns, rows: np.ndarray, root: str):
        self.cols, self.rows, self.root = cols, rows, root
        c = cols.columns
        self._images, self._ids = texts(c, "image"), texts(c, "id")
        self._texts, self._prompts = texts(c, "text"), texts(c, "prompt")

    def __getstate__(self):
        return {"cols": self.cols, "rows": self.rows, "root": self.root}

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        k = int(self.rows[j])
        c = self.cols.columns
        lo, hi = c["box_off"][k], c["box_off"][k + 1]
        image = self._images[k]
        boxes = tuple(tuple(b) for b in c["boxes"][lo:hi].tolist())
        return _Item(int(c["line"][k]), resolve(self.root, image), boxes, self._ids[k], image, self._texts[k],
                     self._prompts[k] if c["has_prompt"][k] else None)

    def __iter__(self):
        for j in range(len(self)):
            yield self[j]


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
        # Parsed once into columns cached beside the file; later starts map them (engine/data/store.py).
        cols = cached_columns(self.ann_file, "jsonl", CACHE_VERSION,
                              lambda: parse_columns(self.ann_file, self.split))
        c, meta = cols.columns, cols.meta
        total = meta["records"] if max_records is None else min(meta["records"], max(0, int(max_records)))
        problems: Dict[int, List[Tuple[str, str]]] = {}  # by position among the non-blank lines
        bad_ids: Dict[int, Any] = {}
        for k, rid, probs in meta["bad"]:
            if k < total:
                problems[k], bad_ids[k] = [tuple(p) for p in probs], rid
        keep = np.array(c["ok"][:total])
        images = texts(c, "image")
        hints = []
        if check_images:
            files = DirIndex()
            for k, image in enumerate(images.all()[:total]):
                path = resolve(self.root, image) if image else None
                if path is not None and not files.exists(path):
                    problems.setdefault(k, []).append((
                        "missing_image", f"image file not found: {path} (fix: check root and the image path)"))
                    keep[k] = False
            if files.missing > 0 and files.found == 0:
                hints.append(f"No image was found: image paths are relative to root={self.root!r}; set root.")
        lines, ids = c["line"], texts(c, "id")
        bad = [self.bad(int(lines[k]), bad_ids[k] if k in bad_ids else ids[k], problems[k])
               for k in sorted(problems)]
        #: The record cache this dataset maps (None when it could not be written).
        self.records_cache = cols.path
        self.accept(_Items(cols, np.flatnonzero(keep), self.root), bad, total=total,
                    max_bad_samples=max_bad_samples, hints=hints)

    def duplicate_ids(self) -> List[BadRecord]:
        """A record per item whose id an earlier item already has (found on the id hashes)."""
        items: _Items = self.items
        c = items.cols.columns
        ids = texts(c, "id")
        return [self.bad(int(c["line"][b]), ids[b], [(
                    "duplicate_id", f"{self.id_name} {ids[b]} is also used by {self.unit} {int(c['line'][a])} "
                                    f"(fix: give every record its own {self.id_name})")])
                for a, b in duplicate_rows(c["id_hash"], items.rows, ids)]

    def annotation(self, index: int) -> Dict[str, Any]:
        it = self.items[index]
        target, lead = self.texts(it.text)
        return {"prompt": self.prompt if it.prompt is None else it.prompt, "text_output": lead + target,
                "sample_id": it.sample_id, "image_id": it.image_id, "references": [it.text], "split_idx": -1}


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
