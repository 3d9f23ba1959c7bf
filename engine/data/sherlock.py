"""The Sherlock dataset (Hessel et al. 2022, https://github.com/allenai/sherlock).

A record is an image, a region in it (one or more boxes), a clue (what is
visible in the region) and an abductive inference (what is probably true).
The model sees the image with the region drawn in and learns to write the
inference. Files, record format and URL -> file mapping are those of the
official release and baselines.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .errors import BadRecord, DatasetError, warn_records
from .processors import BlipCaptionProcessor
from .records import (MOSTLY_OUTSIDE, RecordDataset, config_from, identity, inside_fraction, is_number,
                      mostly_outside_problem, parse_boxes, read_json_list, resolve)
from .store import CachedColumns, cached_columns, duplicate_rows, id_hashes, text_columns, texts
from .region import Box
from .schemas import TEXT_MODES, SherlockConfig
from .synthetic import make_tiny_sherlock

SPLITS = ("train", "val", "test")
DOWNLOAD_HINT = (
    "Get the Sherlock annotations from https://github.com/allenai/sherlock (sherlock_dataset/), "
    "the VCR images from https://visualcommonsense.com (vcr1images/) and the Visual Genome images "
    "from https://homes.cs.washington.edu/~ranjay/visualgenome/api.html (vg/images/VG_100K, VG_100K_2)."
)


def url_to_path(url: str, vcr_root: str, vg_root: str) -> str:
    """The official mapping: a URL containing ``VG_`` -> ``<vg_root>/<last 2 URL parts>``,
    any other -> ``<vcr_root>/<last 2 URL parts>``."""
    parts = url.strip().rstrip("/").split("/")
    if len(parts) < 2 or not parts[-1] or not parts[-2]:
        raise ValueError(f"image url {url!r} has fewer than two path parts")
    return os.path.join(vg_root if "VG_" in url else vcr_root, parts[-2], parts[-1])


def image_id_of(url: str) -> str:
    """``<folder>/<file>`` of the URL, e.g. ``VG_100K/2337.jpg``: stable across machines."""
    return "/".join(url.strip().rstrip("/").split("/")[-2:])


def load_records(file: str, split: str = "") -> List[Any]:
    """Read a Sherlock JSON file (a list of records), with errors that say how to fix it."""
    return read_json_list(
        file, f"Sherlock {split} file" if split else "Sherlock file",
        missing_fix="set root (or the split's *_file) to where the data is. " + DOWNLOAD_HINT,
        malformed_fix="the file is probably truncated or was edited; download it again from "
                      "https://github.com/allenai/sherlock (a Sherlock file is a JSON list of records).")


class _Item(NamedTuple):
    """What a sample needs of a record (made on demand from the record columns)."""

    index: int          # position in the JSON file
    path: str
    boxes: Tuple[Box, ...]
    clue: str
    inference: str
    instance_id: str
    image_id: str
    split_idx: int

    @property
    def sample_id(self) -> str:
        return self.instance_id


#: Bump when the parsed columns change meaning: caches of older versions are parsed again.
CACHE_VERSION = 1
CLUE_PROBLEM = ("missing_target", "inputs.clue is missing or empty, and the text mode uses the clue "
                                  "(fix: add the clue, or use text: inference)")


def _parse_record(rec: Any) -> Tuple[dict, List[Tuple[str, str]]]:
    """One record -> (fields, [(kind, problem), ...]); each problem says its fix. Independent of where the
    images are and of the text mode (an empty clue is reported as CLUE_PROBLEM, which only counts when the
    text mode uses the clue), so the result can be cached."""
    problems: List[Tuple[str, str]] = []
    out = dict(instance_id="", image_id="", is_vg=False, boxes=[], clue="", inference="", split_idx=-1,
               width=float("nan"), height=float("nan"))
    if not isinstance(rec, dict):
        return out, [("malformed", f"is a JSON {type(rec).__name__}, not an object (fix: remove it)")]
    inputs = rec.get("inputs")
    targets = rec.get("targets")
    iid = rec.get("instance_id")
    if not isinstance(iid, (str, int)) or isinstance(iid, bool) or iid == "":
        problems.append(("malformed", "instance_id is missing or empty (fix: give every record a unique "
                                      "instance_id)"))
    else:
        out["instance_id"] = str(iid)
    url = None
    if not isinstance(inputs, dict):
        problems.append(("malformed", "inputs is missing (fix: records need inputs.image.url, inputs.bboxes, "
                                      "inputs.clue)"))
    else:
        image = inputs.get("image")
        width = height = None
        if isinstance(image, dict):
            url = image.get("url")
            width, height = image.get("width"), image.get("height")
        if not isinstance(url, str) or not url.strip():
            problems.append(("malformed", "inputs.image.url is missing or empty (fix: give the image URL as in "
                                          "the release)"))
            url = None
        if is_number(width) and is_number(height) and width > 0 and height > 0:
            out["width"], out["height"] = float(width), float(height)
        boxes, box_problems = parse_boxes(inputs.get("bboxes"), "inputs.bboxes", size=(width, height),
                                          required=True)
        out["boxes"] = boxes
        problems += box_problems
        clue = inputs.get("clue", "")
        out["clue"] = clue.strip() if isinstance(clue, str) else ""
        if not out["clue"]:
            problems.append(CLUE_PROBLEM)
    inference = targets.get("inference") if isinstance(targets, dict) else None
    if not isinstance(targets, dict):
        problems.append(("missing_target", "targets is missing (fix: records need targets.inference)"))
    elif not isinstance(inference, str) or not inference.strip():
        problems.append(("missing_target", "targets.inference is missing or empty (fix: give the inference text "
                                           "or drop the record)"))
    else:
        out["inference"] = inference.strip()
    if url is not None:
        try:
            url_to_path(url, "", "")
            out["image_id"], out["is_vg"] = image_id_of(url), "VG_" in url
        except ValueError as e:
            problems.append(("malformed", f"{e} (fix: use the release's URLs, which end in <folder>/<file>.jpg)"))
    split_idx = rec.get("split_idx", -1)
    out["split_idx"] = int(split_idx) if is_number(split_idx) else -1
    return out, problems


def parse_columns(file: str, split: str = "") -> Tuple[dict, Dict[str, np.ndarray]]:
    """Read a Sherlock file once into columns (see engine/data/store.py) plus the list of bad records."""
    records = load_records(file, split)
    n = len(records)
    ids, image_ids, clues, inferences = [], [], [], []
    is_vg = np.zeros(n, dtype=bool)
    ok = np.zeros(n, dtype=bool)
    split_idx = np.full(n, -1, dtype=np.int64)
    size = np.full((n, 2), np.nan, dtype=np.float64)
    box_off = np.zeros(n + 1, dtype=np.int64)
    boxes: List[Box] = []
    bad = []
    for i, rec in enumerate(records):
        f, problems = _parse_record(rec)
        ids.append(f["instance_id"])
        image_ids.append(f["image_id"])
        clues.append(f["clue"])
        inferences.append(f["inference"])
        is_vg[i], split_idx[i] = f["is_vg"], f["split_idx"]
        size[i] = (f["width"], f["height"])
        boxes += f["boxes"]
        box_off[i + 1] = len(boxes)
        ok[i] = all(p == CLUE_PROBLEM for p in problems)
        if not ok[i]:
            rid = rec.get("instance_id") if isinstance(rec, dict) else None
            bad.append([i, None if rid in (None, "") else str(rid), problems])
        records[i] = None  # free each record once read: the peak stays near the JSON's own size
    del records
    columns = {"ok": ok, "is_vg": is_vg, "split_idx": split_idx, "size": size, "box_off": box_off,
               "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "id_hash": id_hashes(ids)}
    for name, values in (("instance_id", ids), ("image_id", image_ids), ("clue", clues),
                         ("inference", inferences)):
        columns.update(text_columns(name, values))
    return {"records": n, "bad": bad}, columns


class _Records(Sequence):
    """The dataset's items: rows of the record columns, made into :class:`_Item` when indexed."""

    def __init__(self, cols: CachedColumns, rows: np.ndarray, vcr_root: str, vg_root: str):
        self.cols, self.rows, self.vcr_root, self.vg_root = cols, rows, vcr_root, vg_root
        c = cols.columns
        self._ids, self._images = texts(c, "instance_id"), texts(c, "image_id")
        self._clues, self._inferences = texts(c, "clue"), texts(c, "inference")

    def __getstate__(self):
        return {"cols": self.cols, "rows": self.rows, "vcr_root": self.vcr_root, "vg_root": self.vg_root}

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, i: int) -> _Item:
        """Record ``i`` of the file (not a row number)."""
        c = self.cols.columns
        lo, hi = c["box_off"][i], c["box_off"][i + 1]
        image_id = self._images[i]
        return _Item(index=i, path=os.path.join(self.vg_root if c["is_vg"][i] else self.vcr_root, image_id),
                     boxes=tuple(tuple(b) for b in c["boxes"][lo:hi].tolist()), clue=self._clues[i],
                     inference=self._inferences[i], instance_id=self._ids[i], image_id=image_id,
                     split_idx=int(c["split_idx"][i]))

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self.record(int(self.rows[k]))

    def __iter__(self):
        for i in self.rows.tolist():
            yield self.record(i)


class SherlockDataset(RecordDataset):
    """Sherlock records -> samples ``{"image", "prompt", "text_output", "sample_id", "image_id",
    "references", "split_idx", "clue", "inference"}``.

    Text modes (``C`` = clue, ``I`` = inference, ``P`` = the model prompt;
    ``clean`` = the text processor's cleaning, e.g. ``blip_caption``'s
    ``pre_caption``, applied to each free text separately so the ``clue:`` /
    ``inference:`` markers survive; a text processor's own prompt is put in
    front of the target, as LAVIS does):

    =================  =============================  ===========================================
    text               prompt                         text_output (references: the same, raw)
    =================  =============================  ===========================================
    inference          ``P``                          ``clean(I)``
    clue_inference     ``P``                          ``"clue: " + clean(C) + " inference: " + clean(I)``
    clue_in_prompt     ``"clue: " + clean(C') + ". " + P``   ``clean(I)``
    =================  =============================  ===========================================

    where ``C'`` is the clue without a trailing full stop. ``references`` holds
    the target built from the raw texts, for caption metrics.
    """

    id_name = "instance_id"

    def __init__(self, ann_file: str, *, vcr_root: str, vg_root: str, vis_processor: Callable,
                 text_processor: Optional[Callable] = None, prompt: str = "", split: str = "train",
                 is_train: bool = False, region: str = "highlight", text: str = "inference",
                 flip: bool = False, crop_margin: float = 0.1, max_records: Optional[int] = None,
                 max_bad_samples: int = 0, check_images: bool = True, strict_boxes: bool = False):
        if text not in TEXT_MODES:
            raise ValueError(f"text={text!r}: choose one of {', '.join(TEXT_MODES)}")
        super().__init__(ann_file, vis_processor=vis_processor, text_processor=text_processor, prompt=prompt,
                         split=split, is_train=is_train, region=region, flip=flip, crop_margin=crop_margin)
        self.vcr_root, self.vg_root = vcr_root, vg_root
        self.text = text
        self.strict_boxes = strict_boxes
        self._load(max_records, max_bad_samples, check_images)

    # -- loading and checks --------------------------------------------------
    def _load(self, max_records, max_bad_samples, check_images) -> None:
        # The file is parsed once into columns cached beside it; this start maps them (engine/data/store.py).
        cols = cached_columns(self.ann_file, "sherlock", CACHE_VERSION,
                              lambda: parse_columns(self.ann_file, self.split))
        c, meta = cols.columns, cols.meta
        total = meta["records"] if max_records is None else min(meta["records"], max(0, int(max_records)))
        need_clue = self.text != "inference"
        ids = texts(c, "instance_id")
        problems: Dict[int, List[Tuple[str, str]]] = {}
        bad_ids: Dict[int, Optional[str]] = {}
        for i, rid, probs in meta["bad"]:
            if i < total:
                problems[i] = [tuple(p) for p in probs if need_clue or tuple(p) != CLUE_PROBLEM]
                bad_ids[i] = rid
        keep = np.array(c["ok"][:total])
        if need_clue:
            empty = np.flatnonzero(keep & (texts(c, "clue").lengths()[:total] == 0))
            keep[empty] = False
            for i in empty.tolist():
                problems[i] = [CLUE_PROBLEM]
        hints = []
        if check_images:
            missing, found = self._missing_images(cols, total)
            for i in missing:
                problems.setdefault(i, []).append((
                    "missing_image", f"image file not found: {self._path(cols, i)} (fix: check root, vcr_root "
                                     f"and vg_root, or download the image again)"))
            keep[missing] = False
            if missing and not found:
                hints.append(f"No image was found: the images are looked up under vcr_root={self.vcr_root} "
                             f"and vg_root={self.vg_root}; set root, vcr_root or vg_root. " + DOWNLOAD_HINT)
        warnings = []
        for i, probs in self._mostly_outside(cols, keep).items():
            if self.strict_boxes:
                problems[i] = probs
                keep[i] = False
            else:
                warnings.append(self.bad(i, ids[i], probs))
        bad = [self.bad(i, bad_ids[i] if i in bad_ids else ids[i], problems[i]) for i in sorted(problems)]
        #: The record cache this dataset maps (None when it could not be written).
        self.records_cache = cols.path
        self.accept(_Records(cols, np.flatnonzero(keep), self.vcr_root, self.vg_root), bad, total=total,
                    max_bad_samples=max_bad_samples, hints=hints)
        self.warnings = warnings
        warn_records(self.ann_file, warnings, total=total, log=self.log,
                     fix="They are kept, their boxes clipped to the image (sizes from the records' "
                         "inputs.image.width/height). Fix the boxes, or set strict_boxes: true to count such "
                         "records as bad (skipped within max_bad_samples). tools/check_dataset.py lists them all.")

    def _mostly_outside(self, cols: CachedColumns, keep: np.ndarray) -> Dict[int, List[Tuple[str, str]]]:
        """Kept records with a box less than half inside the image (sizes from the records) -> problems."""
        c = cols.columns
        total = len(keep)
        off = c["box_off"][:total + 1]
        boxes = c["boxes"][:off[-1]]
        owner = np.repeat(np.arange(total), np.diff(off))
        size = c["size"][:total]
        frac = inside_fraction(boxes, size[owner, 0], size[owner, 1])
        flagged = np.zeros(total, dtype=bool)
        flagged[owner[frac < MOSTLY_OUTSIDE]] = True  # NaN (size unknown) compares False
        out = {}
        for i in np.flatnonzero(flagged & keep).tolist():
            W, H = size[i].tolist()
            out[i] = [mostly_outside_problem(k, tuple(boxes[j].tolist()), float(frac[j]), W, H)
                      for k, j in enumerate(range(off[i], off[i + 1])) if frac[j] < MOSTLY_OUTSIDE]
        return out

    def _path(self, cols: CachedColumns, i: int) -> str:
        root = self.vg_root if cols.columns["is_vg"][i] else self.vcr_root
        return os.path.join(root, texts(cols.columns, "image_id")[i])

    def _missing_images(self, cols: CachedColumns, total: int) -> Tuple[List[int], int]:
        """Records (of the first ``total``) whose image file is not there, and how many are; each folder is
        listed once."""
        c = cols.columns
        image_ids = texts(c, "image_id").all()[:total]
        is_vg = c["is_vg"][:total].tolist()
        listed: Dict[Tuple[bool, str], frozenset] = {}
        missing, found = [], 0
        for i, (image_id, vg) in enumerate(zip(image_ids, is_vg)):
            if not image_id:
                continue
            folder, _, name = image_id.rpartition("/")
            names = listed.get((vg, folder))
            if names is None:
                try:
                    names = frozenset(os.listdir(os.path.join(self.vg_root if vg else self.vcr_root, folder)))
                except OSError:
                    names = frozenset()
                listed[(vg, folder)] = names
            if name in names:
                found += 1
            else:
                missing.append(i)
        return missing, found

    def duplicate_ids(self) -> List[BadRecord]:
        """A record per item whose instance_id an earlier item already has (found on the id hashes)."""
        items: _Records = self.items
        ids = texts(items.cols.columns, "instance_id")
        return [self.bad(b, ids[b], [("duplicate_id", f"{self.id_name} {ids[b]} is also used by {self.unit} {a} "
                                                      f"(fix: give every record its own {self.id_name})")])
                for a, b in duplicate_rows(items.cols.columns["id_hash"], items.rows, ids)]

    # -- samples -------------------------------------------------------------
    def _texts(self, it: _Item) -> Tuple[str, str, str]:
        tp = self.text_processor
        if isinstance(tp, BlipCaptionProcessor):
            clean, lead = tp.pre_caption, tp.prompt
        else:
            clean, lead = (tp or identity), ""
        prompt = self.prompt
        if self.text == "clue_inference":
            target = f"clue: {clean(it.clue)} inference: {clean(it.inference)}"
            reference = f"clue: {it.clue} inference: {it.inference}"
        else:
            target, reference = clean(it.inference), it.inference
            if self.text == "clue_in_prompt":
                prompt = f"clue: {clean(it.clue.rstrip('. '))}. {self.prompt}"
        return prompt, lead + target, reference

    def annotation(self, index: int) -> Dict[str, Any]:
        """A sample without its image (cheap: no file is read)."""
        it = self.items[index]
        prompt, target, reference = self._texts(it)
        return {"prompt": prompt, "text_output": target, "sample_id": it.instance_id,
                "image_id": it.image_id, "references": [reference], "split_idx": it.split_idx,
                "clue": it.clue, "inference": it.inference}

    def __repr__(self) -> str:
        return (f"SherlockDataset(split={self.split!r}, records={len(self)}, file={self.ann_file!r}, "
                f"region={self.region!r}, text={self.text!r})")


def prepare_sherlock(**options: Any) -> None:
    """Generate the synthetic dataset if the recipe asks for one (``synthetic: N``) and it is not there yet.
    The trainer runs this on rank 0 before the other ranks build the dataset (engine/build.py)."""
    cfg = config_from(SherlockConfig, options, "sherlock")
    if cfg.synthetic is not None and cfg.synthetic < 0:
        raise DatasetError(f"datasets.sherlock.synthetic={cfg.synthetic}: give a number of training records to "
                           f"generate, or null (or 0) to use the data in root={cfg.root!r}")
    if cfg.synthetic:  # 0 reads as "no synthetic data", like null
        make_tiny_sherlock(cfg.root, num_train=cfg.synthetic, num_val=cfg.synthetic_val,
                           seed=cfg.synthetic_seed, image_size=cfg.synthetic_image_size)


def build_sherlock(*, split: str, is_train: bool, vis_processor: Callable,
                   text_processor: Optional[Callable] = None, prompt: str = "",
                   **options: Any) -> SherlockDataset:
    """Build one split (``train``, ``val`` or ``test``) from ``SherlockConfig`` fields."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    cfg = config_from(SherlockConfig, options, "sherlock")
    prepare_sherlock(**options)  # a no-op once the data is there
    file = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file or cfg.val_file}[split]
    return SherlockDataset(
        resolve(cfg.root, file),
        vcr_root=cfg.vcr_root or os.path.join(cfg.root, "vcr1images"),
        vg_root=cfg.vg_root or os.path.join(cfg.root, "vg", "images"),
        vis_processor=vis_processor, text_processor=text_processor, prompt=prompt, split=split,
        is_train=is_train, region=cfg.region, text=cfg.text, flip=cfg.flip,
        crop_margin=cfg.crop_margin, max_records=cfg.max_records,
        max_bad_samples=cfg.max_bad_samples, check_images=cfg.check_images, strict_boxes=cfg.strict_boxes)
