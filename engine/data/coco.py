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
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from engine.registry import DATASETS

from .records import DirIndex, RecordDataset, config_from, read_json_list, resolve
from .region import Box

SPLITS = ("train", "val", "test")
DOWNLOAD_HINT = (
    "The images are COCO 2014's train2014/ and val2014/ (https://cocodataset.org/#download); the annotations "
    "are LAVIS's Karpathy-split files coco_karpathy_{train,val,test}.json "
    "(https://storage.googleapis.com/sfr-vision-language-research/datasets/coco_karpathy_train.json, and _val, _test)."
)


@dataclass
class CocoCaptionConfig:
    """Options of the ``coco_caption`` dataset (``datasets.coco_caption`` in a recipe)."""

    root: str = field(default="", metadata={
        "help": "Images root: the records' image paths (train2014/..., val2014/...) are relative to it."})
    ann_train: str = field(default="annotations/coco_karpathy_train.json", metadata={
        "help": "Training annotations (one record per caption): a path relative to root, or absolute."})
    ann_val: str = field(default="annotations/coco_karpathy_val.json", metadata={
        "help": "Validation annotations (one record per image, all its captions): relative to root, or absolute."})
    ann_test: str = field(default="annotations/coco_karpathy_test.json", metadata={
        "help": "Test annotations (same layout as ann_val): relative to root, or absolute."})
    flip: bool = field(default=True, metadata={
        "help": "Allow random horizontal flips in training (LAVIS's default)."})
    max_records: Optional[int] = field(default=None, metadata={
        "help": "Use only the first N records of each split (quick runs); unset uses all."})
    max_bad_samples: int = field(default=0, metadata={
        "help": "Skip up to this many bad records (counted in a warning) instead of failing; 0 fails on any."})
    check_images: bool = field(default=True, metadata={
        "help": "Check at start-up that every record's image file exists."})


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
        records = read_json_list(
            self.ann_file, f"COCO {self.split} annotations",
            missing_fix=f"set root (the images root) or the split's ann_* path. {DOWNLOAD_HINT}",
            malformed_fix="download the file again; LAVIS's annotations are a JSON list of "
                          "{image, caption[, image_id]} records.")
        if max_records is not None:
            records = records[: max(0, int(max_records))]
        files = DirIndex() if check_images else None
        per_image = self.split != "train"
        parsed, bad = [], []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                bad.append(self.bad(i, None, [("malformed", f"is a JSON {type(rec).__name__}, not an object "
                                                            f"(fix: remove it)")]))
                continue
            image = rec.get("image")
            problems: List[Tuple[str, str]] = []
            if not isinstance(image, str) or not image.strip():
                problems.append(("malformed", "image is missing or empty (fix: give the image path relative "
                                              "to the images root)"))
                image = None
            captions, cap_problems = _captions(rec, per_image)
            problems += cap_problems
            path = resolve(self.image_root, image.strip()) if image else None
            if path is not None and files is not None and not files.exists(path):
                problems.append(("missing_image", f"image file not found: {path} (fix: set root to the folder "
                                                  f"holding train2014/ and val2014/)"))
            if problems:
                bad.append(self.bad(i, image, problems))
                continue
            given = rec.get("image_id")
            image_id = str(given) if isinstance(given, (str, int)) and given != "" else image_id_of(image)
            parsed.append((i, path, image_id, captions))
        hints = []
        if files is not None and files.missing > 0 and files.found == 0:
            hints.append(f"No image was found under the images root {self.image_root!r}; set root. {DOWNLOAD_HINT}")
        items: List[_Item] = []
        if per_image:
            for i, path, image_id, caps in parsed:
                items.append(_Item(i, path, (), image_id, image_id, caps[0], tuple(caps)))
        else:
            by_image: Dict[str, List[str]] = defaultdict(list)
            for _, path, _, caps in parsed:
                by_image[path] += caps
            for i, path, image_id, caps in parsed:
                refs = tuple(by_image[path])
                for k, cap in enumerate(caps):
                    sid = f"{image_id}:{i}" if len(caps) == 1 else f"{image_id}:{i}.{k}"
                    items.append(_Item(i, path, (), sid, image_id, cap, refs))
        self.accept(items, bad, total=len(records), max_bad_samples=max_bad_samples, hints=hints)

    def annotation(self, index: int) -> Dict[str, Any]:
        it = self.items[index]
        target, lead = self.texts(it.caption)
        return {"prompt": self.prompt, "text_output": lead + target, "sample_id": it.sample_id,
                "image_id": it.image_id, "references": list(it.references), "split_idx": -1}


@DATASETS.register("coco_caption", schema=CocoCaptionConfig)
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
