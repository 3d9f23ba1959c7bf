"""COCO captions in LAVIS's annotation layout (the Karpathy split).

``coco_karpathy_train.json`` is a list of ``{"image", "caption", "image_id"}``,
one record per caption; ``coco_karpathy_val.json`` and ``coco_karpathy_test.json``
hold one record per image with all its captions, ``{"image", "caption": [...]}``.
``image`` is relative to the images root (``val2014/COCO_val2014_000000184613.jpg``).
A training sample is one caption; an evaluation sample is one image, scored
against all its captions.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .errors import BadRecord
from .records import DirIndex, RecordDataset, config_from, read_json_list, resolve
from .region import Box
from .schemas import CocoCaptionConfig
from .store import CachedColumns, cached_columns, duplicate_rows, id_hashes, text_columns, texts

SPLITS = ("train", "val", "test")
DOWNLOAD_HINT = (
    "The images are COCO 2014's train2014/ and val2014/ (https://cocodataset.org/#download); the annotations "
    "are LAVIS's Karpathy-split files coco_karpathy_{train,val,test}.json "
    "(https://storage.googleapis.com/sfr-vision-language-research/datasets/coco_karpathy_train.json, and _val, _test)."
)


class _Item(NamedTuple):
    index: int                    # position in the JSON file
    path: str
    boxes: Tuple[Box, ...]        # always empty: COCO captions describe the whole image
    sample_id: str
    image_id: str
    caption: str                  # the training target (evaluation: the first caption)
    references: Tuple[str, ...]   # every caption of the image


def image_id_of(image: str) -> str:
    """LAVIS's id for a record without one: the number at the end of the file name (``...000000184613.jpg``)."""
    stem = os.path.splitext(os.path.basename(image))[0]
    tail = stem.split("_")[-1]
    return str(int(tail)) if tail.isdigit() else stem


def _captions(rec: dict, is_list: bool) -> Tuple[List[str], List[Tuple[str, str]]]:
    cap = rec.get("caption")
    want = "a list of captions" if is_list else "a caption string"
    if isinstance(cap, str):
        cap = [cap] if cap.strip() else []
    if not isinstance(cap, list) or not cap:
        return [], [("missing_target", f"caption is missing or empty (fix: give {want}, or drop the record)")]
    empty = [k for k, c in enumerate(cap) if not isinstance(c, str) or not c.strip()]
    if empty:
        return [], [("missing_target", f"caption{'s' if len(empty) > 1 else ''} {empty} of the list "
                                       f"{'are' if len(empty) > 1 else 'is'} empty or not text "
                                       f"(fix: give the caption text or drop it)")]
    return [c.strip() for c in cap], []


#: Bump when the parsed columns change meaning: caches of older versions are parsed again.
CACHE_VERSION = 1


def parse_columns(file: str, split: str, per_image: bool) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Read a COCO annotation file once into columns: per record its image, image id and captions."""
    records = read_json_list(
        file, f"COCO {split} annotations",
        missing_fix=f"set root (the images root) or the split's ann_* path. {DOWNLOAD_HINT}",
        malformed_fix="download the file again; LAVIS's annotations are a JSON list of "
                      "{image, caption[, image_id]} records.")
    n = len(records)
    ok = np.zeros(n, dtype=bool)
    images, image_ids, captions = [], [], []
    cap_off = np.zeros(n + 1, dtype=np.int64)
    bad = []
    for i, rec in enumerate(records):
        image, image_id, caps = "", "", []
        if not isinstance(rec, dict):
            bad.append([i, None, [("malformed", f"is a JSON {type(rec).__name__}, not an object (fix: remove it)")]])
        else:
            raw = rec.get("image")
            problems: List[Tuple[str, str]] = []
            if not isinstance(raw, str) or not raw.strip():
                problems.append(("malformed", "image is missing or empty (fix: give the image path relative "
                                              "to the images root)"))
            else:
                image = raw.strip()
            caps, cap_problems = _captions(rec, per_image)
            problems += cap_problems
            if problems:
                bad.append([i, raw if isinstance(raw, str) and raw else None, problems])
                caps = []
            else:
                ok[i] = True
                given = rec.get("image_id")
                image_id = str(given) if isinstance(given, (str, int)) and given != "" else image_id_of(image)
        images.append(image)
        image_ids.append(image_id)
        captions += caps
        cap_off[i + 1] = len(captions)
        records[i] = None  # free each record once read
    del records
    # Training references: every caption of the same image; records of one image share a group number.
    group = np.zeros(n, dtype=np.int64)
    seen: Dict[str, int] = {}
    for i, image in enumerate(images):
        group[i] = seen.setdefault(image, len(seen))
    columns = {"ok": ok, "cap_off": cap_off, "group": group, "id_hash": id_hashes(image_ids)}
    for name, values in (("image", images), ("image_id", image_ids), ("caption", captions)):
        columns.update(text_columns(name, values))
    return {"records": n, "bad": bad}, columns


class _Items(Sequence):
    """The dataset's items, made from the record columns when indexed: one per record (evaluation) or one
    per caption (training, with every caption of the same image among the kept records as references)."""

    def __init__(self, cols: CachedColumns, rows: np.ndarray, image_root: str, per_image: bool):
        self.cols, self.rows, self.image_root, self.per_image = cols, rows, image_root, per_image
        c = cols.columns
        self._images, self._ids, self._caps = texts(c, "image"), texts(c, "image_id"), texts(c, "caption")
        off = c["cap_off"]
        if per_image:
            self.item_rec = rows
        else:  # item -> (record, caption k); records of an image -> their group, for the references
            ncap = off[rows + 1] - off[rows]
            self.item_rec = np.repeat(rows, ncap)
            starts = np.repeat(np.cumsum(ncap) - ncap, ncap)
            self.item_cap = np.arange(len(self.item_rec)) - starts
            groups = c["group"][rows]
            order = np.argsort(groups, kind="stable")
            self.group_rows = rows[order]
            self.group_of = groups
            bounds = np.flatnonzero(np.diff(groups[order])) + 1
            self.group_start = np.concatenate([[0], bounds])
            self.group_end = np.concatenate([bounds, [len(rows)]])
            self.group_index = np.empty(int(groups.max()) + 1 if len(groups) else 0, dtype=np.int64)
            self.group_index[groups[order][self.group_start]] = np.arange(len(self.group_start))

    def __getstate__(self):
        return {"cols": self.cols, "rows": self.rows, "image_root": self.image_root, "per_image": self.per_image}

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self) -> int:
        return len(self.item_rec)

    def _captions(self, i: int) -> List[str]:
        off = self.cols.columns["cap_off"]
        return [self._caps[j] for j in range(int(off[i]), int(off[i + 1]))]

    def __getitem__(self, k) -> _Item:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        i = int(self.item_rec[k])
        path, image_id = resolve(self.image_root, self._images[i]), self._ids[i]
        caps = self._captions(i)
        if self.per_image:
            return _Item(i, path, (), image_id, image_id, caps[0], tuple(caps))
        g = self.group_index[self.cols.columns["group"][i]]
        refs = tuple(c for r in self.group_rows[self.group_start[g]:self.group_end[g]].tolist()
                     for c in self._captions(r))
        cap_k = int(self.item_cap[k])
        sid = f"{image_id}:{i}" if len(caps) == 1 else f"{image_id}:{i}.{cap_k}"
        return _Item(i, path, (), sid, image_id, caps[cap_k], refs)

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]


class CocoCaptionDataset(RecordDataset):
    """COCO caption records -> samples ``{"image", "prompt", "text_output", "sample_id", "image_id",
    "references", "split_idx"}``.

    Training: one sample per caption (``sample_id`` = ``<image_id>:<record index>``,
    ``references`` = every caption of that image in the file). Evaluation: one
    sample per image (``sample_id`` = image id, ``text_output`` = its first
    caption, ``references`` = all its captions, raw). ``split_idx`` is -1.
    """

    id_name = "image"

    def __init__(self, ann_file: str, *, image_root: str, vis_processor: Callable,
                 text_processor: Optional[Callable] = None, prompt: str = "", split: str = "train",
                 is_train: bool = False, flip: bool = True, max_records: Optional[int] = None,
                 max_bad_samples: int = 0, check_images: bool = True):
        super().__init__(ann_file, vis_processor=vis_processor, text_processor=text_processor, prompt=prompt,
                         split=split, is_train=is_train, region="none", flip=flip)
        self.image_root = image_root
        self._load(max_records, max_bad_samples, check_images)

    def _load(self, max_records, max_bad_samples, check_images) -> None:
        # Parsed once into columns cached beside the file; later starts map them (engine/data/store.py).
        per_image = self.split != "train"
        kind = "coco_per_image" if per_image else "coco_per_caption"
        cols = cached_columns(self.ann_file, kind, CACHE_VERSION,
                              lambda: parse_columns(self.ann_file, self.split, per_image))
        c, meta = cols.columns, cols.meta
        total = meta["records"] if max_records is None else min(meta["records"], max(0, int(max_records)))
        problems: Dict[int, List[Tuple[str, str]]] = {}
        bad_ids: Dict[int, Optional[str]] = {}
        for i, rid, probs in meta["bad"]:
            if i < total:
                problems[i], bad_ids[i] = [tuple(p) for p in probs], rid
        keep = np.array(c["ok"][:total])
        images = texts(c, "image")
        hints = []
        if check_images:
            files = DirIndex()
            for i, image in enumerate(images.all()[:total]):
                if not image:
                    continue
                path = resolve(self.image_root, image)
                if not files.exists(path):
                    problems.setdefault(i, []).append((
                        "missing_image", f"image file not found: {path} (fix: set root to the folder holding "
                                         f"train2014/ and val2014/)"))
                    keep[i] = False
            if files.missing > 0 and files.found == 0:
                hints.append(f"No image was found under the images root {self.image_root!r}; set root. "
                             f"{DOWNLOAD_HINT}")
        bad = [self.bad(i, bad_ids[i] if i in bad_ids else images[i], problems[i]) for i in sorted(problems)]
        #: The record cache this dataset maps (None when it could not be written).
        self.records_cache = cols.path
        self.accept(_Items(cols, np.flatnonzero(keep), self.image_root, per_image), bad, total=total,
                    max_bad_samples=max_bad_samples, hints=hints)

    def duplicate_ids(self) -> List[BadRecord]:
        """Evaluation: a record per image already given by an earlier record (training ids hold the record
        index, so they never repeat)."""
        items: _Items = self.items
        if not items.per_image:
            return []
        ids = texts(items.cols.columns, "image_id")
        return [self.bad(b, ids[b], [("duplicate_id", f"{self.id_name} {ids[b]} is also used by {self.unit} {a} "
                                                      f"(fix: give every record its own {self.id_name})")])
                for a, b in duplicate_rows(items.cols.columns["id_hash"], items.rows, ids)]

    def annotation(self, index: int) -> Dict[str, Any]:
        it = self.items[index]
        target, lead = self.texts(it.caption)
        return {"prompt": self.prompt, "text_output": lead + target, "sample_id": it.sample_id,
                "image_id": it.image_id, "references": list(it.references), "split_idx": -1}


def build_coco_caption(*, split: str, is_train: bool, vis_processor: Callable,
                       text_processor: Optional[Callable] = None, prompt: str = "",
                       **options: Any) -> CocoCaptionDataset:
    """Build one split (``train``, ``val`` or ``test``) from ``CocoCaptionConfig`` fields."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: coco_caption has the splits {', '.join(SPLITS)}")
    cfg = config_from(CocoCaptionConfig, options, "coco_caption")
    file = {"train": cfg.ann_train, "val": cfg.ann_val, "test": cfg.ann_test}[split]
    return CocoCaptionDataset(
        resolve(cfg.root, file), image_root=cfg.root, vis_processor=vis_processor,
        text_processor=text_processor, prompt=prompt, split=split, is_train=is_train, flip=cfg.flip,
        max_records=cfg.max_records, max_bad_samples=cfg.max_bad_samples, check_images=cfg.check_images)
