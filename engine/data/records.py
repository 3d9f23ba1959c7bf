"""What every image-text dataset shares: reading annotation files, checking records, loading images.

A dataset subclasses :class:`RecordDataset`: it parses its own file format into
items (each with ``index``, ``path``, ``boxes`` and ``sample_id``) and bad
records, hands both to :meth:`RecordDataset.accept`, and implements
:meth:`annotation`. Everything else (the start-up report, skipping with
``max_bad_samples``, image loading with reduced-size JPEG decoding, region
rendering, the image processor call, full-decode checks for
``tools/check_dataset.py``) lives here once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from engine.registry import close_matches

from engine.faults import fault
from .errors import BadRecord, DatasetError, ImageReadError, settle_bad_records
from .processors import BlipCaptionProcessor, ImageProcessor
from .region import REGION_MODES, Box, region_frame, render_region, to_box

#: The keys every dataset's samples have (mixing several datasets keeps only these).
SAMPLE_KEYS = ("image", "prompt", "text_output", "sample_id", "image_id", "references", "split_idx")


def resolve(root: str, path: str) -> str:
    """``path`` if absolute (or no root), else ``root/path``."""
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def read_json_list(file: str, what: str, *, missing_fix: str, malformed_fix: str) -> List[Any]:
    """A JSON file holding a list, or a DatasetError naming the file and the fix."""
    if not os.path.isfile(file):
        raise DatasetError(f"{what} not found: {file}. Fix: {missing_fix}")
    try:
        with open(file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{what} {file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
                           f"Fix: {malformed_fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {what} {file}: {e}. Fix: {malformed_fix}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{what} {file} holds a JSON {type(data).__name__}, not a list of records. "
                           f"Fix: {malformed_fix}")
    return data


def read_jsonl(file: str, what: str, *, missing_fix: str) -> List[Tuple[int, Any, Optional[str]]]:
    """``(line number, record, None)`` per non-blank line, or ``(line, None, error)`` for a malformed one."""
    if not os.path.isfile(file):
        raise DatasetError(f"{what} not found: {file}. Fix: {missing_fix}")
    out = []
    try:
        with open(file, "r", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    out.append((n, json.loads(line), None))
                except json.JSONDecodeError as e:
                    out.append((n, None, f"not valid JSON (column {e.colno}: {e.msg})"))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {what} {file}: {e}. Fix: save it as UTF-8 JSON lines") from None
    return out


class DirIndex:
    """File-exists checks by listing each folder once (fast on network file systems)."""

    def __init__(self):
        self._dirs: Dict[str, frozenset] = {}
        self.found = self.missing = 0

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._dirs:
            try:
                self._dirs[folder] = frozenset(os.listdir(folder))
            except OSError:
                self._dirs[folder] = frozenset()
        hit = name in self._dirs[folder]
        self.found += hit
        self.missing += not hit
        return hit


def parse_boxes(raw: Any, key: str, *, size: Optional[Tuple[Any, Any]] = None,
                required: bool = False) -> Tuple[List[Box], List[Tuple[str, str]]]:
    """``[{left, top, width, height}]`` or ``[[l, t, w, h]]`` -> boxes and ``(kind, problem)`` pairs.

    ``size`` (width, height), when known, flags boxes wholly outside the image.
    """
    problems: List[Tuple[str, str]] = []
    if raw is None and not required:
        return [], problems
    if not isinstance(raw, list) or (required and not raw):
        what = "missing or empty" if required else "not a list"
        problems.append(("bad_box", f"{key} is {what} (fix: give a list of [left, top, width, height] boxes)"))
        return [], problems
    boxes: List[Box] = []
    W, H = size if size is not None else (None, None)
    for k, b in enumerate(raw):
        try:
            vals = [b[n] for n in ("left", "top", "width", "height")] if isinstance(b, dict) else list(b)
            if len(vals) != 4 or not all(is_number(v) for v in vals):
                raise TypeError
            box = to_box(vals)
        except (KeyError, TypeError, ValueError):
            problems.append(("bad_box", f"{key}[{k}] = {b!r} is not a [left, top, width, height] box of numbers "
                                        f"(fix: correct or remove it)"))
            continue
        l, t, w, h = box
        if w <= 0 or h <= 0:
            problems.append(("bad_box", f"{key}[{k}] has width {w:g} and height {h:g}; both must be > 0 "
                                        f"(fix: correct or remove the box)"))
            continue
        if is_number(W) and is_number(H) and W > 0 and H > 0 and (l >= W or t >= H or l + w <= 0 or t + h <= 0):
            problems.append(("box_outside", f"{key}[{k}] = {b!r} lies outside the {W:g}x{H:g} image "
                                            f"(fix: correct the box or the image size)"))
            continue
        boxes.append(box)
    return boxes, problems


def box_outside(box: Box, size: Tuple[int, int]) -> bool:
    """True when no part of ``box`` lies inside an image of ``size``."""
    l, t, w, h = box
    W, H = size
    return l >= W or t >= H or l + w <= 0 or t + h <= 0


#: A box with less than this share of its area inside the image is reported (a small overhang is clipped quietly).
MOSTLY_OUTSIDE = 0.5


def inside_fraction(boxes: np.ndarray, width, height) -> np.ndarray:
    """Share of each box's area (``[k, 4]`` left, top, width, height) inside a ``width`` x ``height`` image;
    ``width``/``height`` may be arrays of one size per box (NaN where unknown gives NaN)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    l, t, w, h = boxes.T
    iw = np.clip(np.minimum(l + w, width) - np.maximum(l, 0.0), 0.0, None)
    ih = np.clip(np.minimum(t + h, height) - np.maximum(t, 0.0), 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        return iw * ih / (w * h)


def mostly_outside_problem(k: int, box: Box, fraction: float, width, height, where: str = "") -> Tuple[str, str]:
    """The ``box_mostly_outside`` problem of box ``k`` (a warning unless the dataset is strict about boxes)."""
    l, t, w, h = box
    return ("box_mostly_outside",
            f"box {k} = ({l:g}, {t:g}, {w:g}, {h:g}) has {100 * fraction:.1f}% of its area inside the "
            f"{width:g}x{height:g} image{where} (fix: correct the box or the image size; training clips it to "
            f"the image)")


def config_from(schema, options: Dict[str, Any], dataset: str):
    """Instantiate a dataset's schema dataclass from builder keyword arguments; unknown keys say "did you mean"."""
    names = [f.name for f in dataclasses.fields(schema)]
    unknown = [k for k in options if k not in names]
    if unknown:
        parts = []
        for k in unknown:
            near = close_matches(k, names)
            parts.append(f"{k!r}" + (f" (did you mean {', '.join(map(repr, near))}?)" if near else ""))
        raise TypeError(f"unknown {dataset} option(s) {', '.join(parts)}; valid: {', '.join(names)}")
    return schema(**options)


def identity(text: str) -> str:
    return text


class RecordDataset(Dataset):
    """Base of the image-text datasets: items -> samples ``{"image", "prompt", "text_output", ...}``.

    Subclasses set ``items`` through :meth:`accept` and implement :meth:`annotation`.
    Items are tuples with at least ``index`` (record index or line number),
    ``path`` (image file), ``boxes`` (region, may be empty) and ``sample_id``.
    """

    #: How a record's position is named in messages ("record 3", "line 4").
    unit = "record"
    #: Name of the id shown next to it.
    id_name = "id"

    def __init__(self, ann_file: str, *, vis_processor: Optional[Callable], text_processor: Optional[Callable] = None,
                 prompt: str = "", split: str = "train", is_train: bool = False, region: str = "none",
                 flip: bool = False, crop_margin: float = 0.1):
        if region not in REGION_MODES:
            raise ValueError(f"region={region!r}: choose one of {', '.join(REGION_MODES)}")
        self.ann_file = ann_file
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.prompt = prompt
        self.split = split
        self.is_train = is_train
        self.region = region
        self.flip = flip
        self.crop_margin = crop_margin
        self.items: List[Any] = []
        #: Records skipped at construction (within max_bad_samples); tools/check_dataset.py reports them.
        self.bad_records: List[BadRecord] = []
        #: Records kept with a warning at construction (e.g. a box mostly outside the image).
        self.warnings: List[BadRecord] = []
        #: Count a box mostly outside the image as a bad record instead of a warning.
        self.strict_boxes = False

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(type(self).__module__)

    # -- checks --------------------------------------------------------------
    def bad(self, index: int, rec_id: Any, problems: List[Tuple[str, str]]) -> BadRecord:
        return BadRecord(self.ann_file, f"{self.unit} {index}", self.id_name,
                         "?" if rec_id in (None, "") else str(rec_id), list(problems))

    def accept(self, items: List[Any], bad: List[BadRecord], *, total: int, max_bad_samples: int,
               hints: Sequence[str] = ()) -> None:
        """Keep ``items``; fail on ``bad`` records or skip them within ``max_bad_samples``."""
        if total == 0:
            raise DatasetError(f"{self.ann_file} has no records. Fix: point the dataset at the full file, "
                               f"or raise max_records.")
        settle_bad_records(self.ann_file, bad, total=total, max_bad_samples=max_bad_samples, log=self.log,
                           hints=hints)
        self.items, self.bad_records = items, list(bad)
        dups = self.duplicate_ids()
        if dups:
            first = dups[0]
            self.log.warning("%s: %d records repeat an earlier record's %s (first: %s); evaluation keys "
                             "results by id, so only one of each is scored. tools/check_dataset.py lists them.",
                             self.ann_file, len(dups), self.id_name, first)

    def duplicate_ids(self) -> List[BadRecord]:
        """A record per item whose sample_id an earlier item already has."""
        seen: Dict[str, int] = {}
        out = []
        for it in self.items:
            sid = str(it.sample_id)
            if sid in seen:
                out.append(self.bad(it.index, sid, [(
                    "duplicate_id", f"{self.id_name} {sid} is also used by {self.unit} {seen[sid]} "
                                    f"(fix: give every record its own {self.id_name})")]))
            else:
                seen[sid] = it.index
        return out

    def image_refs(self) -> Iterator[Tuple[int, str, str, Tuple[Box, ...]]]:
        """``(index, sample_id, image path, boxes)`` of every item (for checks)."""
        for it in self.items:
            yield it.index, str(it.sample_id), it.path, tuple(it.boxes)

    def verify_images(self, *, decode: bool = True) -> List[BadRecord]:
        """Open every image (``decode``: decode it fully) and check the boxes against its real size.

        Reads the file headers (and with ``decode`` all the pixels): for
        ``tools/check_dataset.py``, not start-up. One bad record per problem found;
        a box with less than half its area inside the image is a ``box_mostly_outside``
        record (a warning unless ``strict_boxes``).
        """
        out: List[BadRecord] = []
        sizes: Dict[str, Any] = {}
        for index, sid, path, boxes in self.image_refs():
            if path not in sizes:
                try:
                    with Image.open(path) as im:
                        size = im.size
                        if decode:
                            im.load()
                    sizes[path] = size
                except FileNotFoundError:
                    sizes[path] = ("missing_image", f"image file not found: {path} (fix: check the dataset's "
                                                    f"root or download the image again)")
                except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
                    sizes[path] = ("undecodable_image", f"cannot decode {path}: {e} (fix: download the image "
                                                        f"again or drop the record)")
            got = sizes[path]
            if isinstance(got, tuple) and isinstance(got[0], str):
                out.append(self.bad(index, sid, [got]))
                continue
            outside = [k for k, b in enumerate(boxes) if box_outside(b, got)]
            if outside:
                out.append(self.bad(index, sid, [(
                    "box_outside", f"box(es) {outside} lie outside the {got[0]}x{got[1]} image {path} "
                                   f"(size read from the file; fix: correct the boxes)")]))
            elif boxes:
                frac = inside_fraction(np.array(boxes), *got)
                mostly = [mostly_outside_problem(k, b, f, *got, where=f" {path} (size read from the file)")
                          for k, (b, f) in enumerate(zip(boxes, frac.tolist())) if f < MOSTLY_OUTSIDE]
                if mostly:
                    out.append(self.bad(index, sid, mostly))
        return out

    # -- samples -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def texts(self, target: str) -> Tuple[str, str]:
        """``(cleaned target, lead)``: the text processor's cleaning and its prompt (LAVIS puts it first)."""
        tp = self.text_processor
        if isinstance(tp, BlipCaptionProcessor):
            return tp.pre_caption(target), tp.prompt
        return (tp or identity)(target), ""

    def annotation(self, index: int) -> Dict[str, Any]:
        """A sample without its image (cheap: no file is read)."""
        raise NotImplementedError

    def ground_truth(self) -> Dict[str, List[str]]:
        """``sample_id -> references`` for caption metrics."""
        return {a["sample_id"]: a["references"] for a in map(self.annotation, range(len(self)))}

    def _image_error(self, it, e: Exception) -> DatasetError:
        return ImageReadError(
            f"cannot read image {it.path} of {self.unit} {it.index} ({self.id_name} {it.sample_id}) in "
            f"{self.ann_file}: {e}. Fix: download the image again; tools/check_dataset.py lists every "
            f"unreadable image.", sample_id=it.sample_id, path=it.path)

    def load_image(self, index: int) -> Image.Image:
        """The item's image, fully decoded, RGB."""
        it = self.items[index]
        try:
            with Image.open(it.path) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - report any decoder failure with its record
            raise self._image_error(it, e) from e

    def _draft_factor(self, size: Tuple[int, int], boxes: Sequence[Box]) -> int:
        proc = self.vis_processor
        if not isinstance(proc, ImageProcessor):
            return 1
        return proc.draft_factor(region_frame(size, boxes, self.region, margin=self.crop_margin))

    def load_shown_image(self, index: int) -> Tuple[Image.Image, List[Box]]:
        """The item's image with its region drawn in, and the region's boxes in that image's pixels.

        When the processor's output is much smaller than the image, a JPEG is
        decoded at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling, via
        ``Image.draft``), never below what the processor's crops need, so the
        result matches a full decode followed by the resize.
        """
        it = self.items[index]
        boxes = list(it.boxes)
        if fault("corrupt_image") == str(it.sample_id) and os.path.getsize(it.path) > 64:
            with open(it.path, "r+b") as f:  # test hook: the file goes bad after the dataset check
                f.truncate(64)
        try:
            with Image.open(it.path) as im:
                W, H = im.size
                factor = self._draft_factor((W, H), boxes) if im.format == "JPEG" else 1
                scale = 1.0
                if factor > 1:
                    im.draft("RGB", (W // factor, H // factor))
                    if im.size != (W, H):
                        sx, sy = im.size[0] / W, im.size[1] / H
                        boxes = [(l * sx, t * sy, w * sx, h * sy) for l, t, w, h in boxes]
                        scale = sx
                im.load()
                image = im if im.mode == "RGB" else im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - report any decoder failure with its record
            raise self._image_error(it, e) from e
        return render_region(image, boxes, self.region, margin=self.crop_margin, scale=scale)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image, boxes = self.load_shown_image(index)
        if isinstance(self.vis_processor, ImageProcessor):
            tensor = self.vis_processor(image, region=boxes, flip=None if self.flip else False)
        else:  # a plain callable(image) from elsewhere
            tensor = self.vis_processor(image)
        sample = {"image": tensor}
        sample.update(self.annotation(index))
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, records={len(self)}, file={self.ann_file!r}, "
                f"region={self.region!r})")
