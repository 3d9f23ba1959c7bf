"""The Sherlock dataset (Hessel et al. 2022, https://github.com/allenai/sherlock).

A record is an image, a region in it (one or more boxes), a clue (what is
visible in the region) and an abductive inference (what is probably true).
The model sees the image with the region drawn in and learns to write the
inference. Files, record format and URL -> file mapping are those of the
official release and baselines.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from PIL import Image
from torch.utils.data import Dataset

from engine.registry import DATASETS, close_matches

from .errors import DatasetError, format_problems
from .processors import BlipCaptionProcessor, ImageProcessor
from .region import REGION_MODES, Box, render_region, to_box
from .synthetic import make_tiny_sherlock

log = logging.getLogger(__name__)

TEXT_MODES = ("inference", "clue_inference", "clue_in_prompt")
SPLITS = ("train", "val", "test")
DOWNLOAD_HINT = (
    "Get the Sherlock annotations from https://github.com/allenai/sherlock (sherlock_dataset/), "
    "the VCR images from https://visualcommonsense.com (vcr1images/) and the Visual Genome images "
    "from https://homes.cs.washington.edu/~ranjay/visualgenome/api.html (vg/images/VG_100K, VG_100K_2)."
)


@dataclass
class SherlockConfig:
    """Options of the ``sherlock`` dataset (``datasets.sherlock`` in a recipe)."""

    root: str = field(default="", metadata={
        "help": "Folder holding sherlock_dataset/, vcr1images/ and vg/images/ (see https://github.com/allenai/sherlock)."})
    train_file: str = field(default="sherlock_dataset/sherlock_train_v1_1.json", metadata={
        "help": "Training records: a path relative to root, or absolute."})
    val_file: str = field(default="sherlock_dataset/sherlock_val_with_split_idxs_v1_1.json", metadata={
        "help": "Validation records (with split_idx): a path relative to root, or absolute."})
    test_file: Optional[str] = field(default=None, metadata={
        "help": "Records for the 'test' split; unset uses val_file (the official test set is hidden)."})
    vcr_root: Optional[str] = field(default=None, metadata={
        "help": "Folder of the VCR images (<movie>/<frame>.jpg); unset means <root>/vcr1images."})
    vg_root: Optional[str] = field(default=None, metadata={
        "help": "Folder holding VG_100K/ and VG_100K_2/; unset means <root>/vg/images."})
    region: str = field(default="highlight", metadata={
        "help": "How the region is shown: highlight (official pink fill + green outline), crop, blackout_others, none.",
        "choices": REGION_MODES})
    crop_margin: float = field(default=0.1, metadata={
        "help": "For region=crop: margin added on each side, as a fraction of the region's width/height."})
    text: str = field(default="inference", metadata={
        "help": "Target text: inference; clue_inference ('clue: C inference: I'); clue_in_prompt (prompt 'clue: C. <prompt>').",
        "choices": TEXT_MODES})
    flip: bool = field(default=False, metadata={
        "help": "Allow random horizontal flips in training (off: Sherlock texts mention left and right)."})
    max_records: Optional[int] = field(default=None, metadata={
        "help": "Use only the first N records of each split (quick runs); unset uses all."})
    max_bad_samples: int = field(default=0, metadata={
        "help": "Skip up to this many bad records (counted in a warning) instead of failing; 0 fails on any."})
    check_images: bool = field(default=True, metadata={
        "help": "Check at start-up that every record's image file exists."})
    synthetic: Optional[int] = field(default=None, metadata={
        "help": "Generate the tiny procedural Sherlock with this many training records into root if absent."})
    synthetic_val: int = field(default=100, metadata={
        "help": "Validation records of the generated dataset (with synthetic)."})
    synthetic_seed: int = field(default=0, metadata={
        "help": "Seed of the generated dataset (with synthetic)."})
    synthetic_image_size: int = field(default=96, metadata={
        "help": "Height in pixels of the generated images (with synthetic)."})


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
    what = f"Sherlock {split} file" if split else "Sherlock file"
    if not os.path.isfile(file):
        raise DatasetError(
            f"{what} not found: {file}. Fix: set root (or the split's *_file) to where the data is. "
            + DOWNLOAD_HINT)
    try:
        with open(file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{what} {file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            f"Fix: the file is probably truncated or was edited; download it again from "
            f"https://github.com/allenai/sherlock.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {what} {file}: {e}") from None
    if not isinstance(data, list):
        raise DatasetError(
            f"{what} {file} holds a JSON {type(data).__name__}; a Sherlock file is a JSON list of records. "
            f"Fix: check that the path points at sherlock_*_v1_1.json.")
    return data


class _Item(NamedTuple):
    """What a sample needs of a record, checked and parsed once at start-up."""

    index: int          # position in the JSON file
    path: str
    boxes: Tuple[Box, ...]
    clue: str
    inference: str
    instance_id: str
    image_id: str
    split_idx: int


class _DirIndex:
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


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _parse_record(index: int, rec: Any, *, vcr_root: str, vg_root: str, need_clue: bool,
                  files: Optional[_DirIndex]) -> Tuple[Optional[_Item], List[str]]:
    """One record -> (item, []) or (None, [problem, ...]); each problem says its fix."""
    problems: List[str] = []
    if not isinstance(rec, dict):
        return None, [f"is a JSON {type(rec).__name__}, not an object (fix: remove it)"]
    inputs = rec.get("inputs")
    targets = rec.get("targets")
    iid = rec.get("instance_id")
    if not isinstance(iid, (str, int)) or isinstance(iid, bool) or iid == "":
        problems.append("instance_id is missing or empty (fix: give every record a unique instance_id)")
    url = None
    width = height = None
    boxes: List[Box] = []
    clue = ""
    if not isinstance(inputs, dict):
        problems.append("inputs is missing (fix: records need inputs.image.url, inputs.bboxes, inputs.clue)")
    else:
        image = inputs.get("image")
        if isinstance(image, dict):
            url = image.get("url")
            width, height = image.get("width"), image.get("height")
        if not isinstance(url, str) or not url.strip():
            problems.append("inputs.image.url is missing or empty (fix: give the image URL as in the release)")
            url = None
        raw_boxes = inputs.get("bboxes")
        if not isinstance(raw_boxes, list) or not raw_boxes:
            problems.append("inputs.bboxes is missing or empty (fix: give at least one "
                            "{left, top, width, height} box)")
        else:
            for k, b in enumerate(raw_boxes):
                try:
                    vals = ([b[k] for k in ("left", "top", "width", "height")] if isinstance(b, dict)
                            else list(b))
                    if len(vals) != 4 or not all(_is_number(v) for v in vals):
                        raise TypeError
                    box = to_box(vals)
                except (KeyError, TypeError, ValueError):
                    problems.append(f"inputs.bboxes[{k}] = {b!r} is not a {{left, top, width, height}} box "
                                    f"of numbers (fix: correct or remove it)")
                    continue
                l, t, w, h = box
                if w <= 0 or h <= 0:
                    problems.append(f"inputs.bboxes[{k}] has width {w:g} and height {h:g}; both must be > 0 "
                                    f"(fix: correct or remove the box)")
                    continue
                if _is_number(width) and _is_number(height) and width > 0 and height > 0 and (
                        l >= width or t >= height or l + w <= 0 or t + h <= 0):
                    problems.append(f"inputs.bboxes[{k}] = {b!r} lies outside the {width:g}x{height:g} image "
                                    f"(fix: correct the box or inputs.image.width/height)")
                    continue
                boxes.append(box)
        clue = inputs.get("clue", "")
        if not isinstance(clue, str):
            clue = ""
        if need_clue and not clue.strip():
            problems.append("inputs.clue is missing or empty, and the text mode uses the clue "
                            "(fix: add the clue, or use text: inference)")
    inference = targets.get("inference") if isinstance(targets, dict) else None
    if not isinstance(targets, dict):
        problems.append("targets is missing (fix: records need targets.inference)")
    elif not isinstance(inference, str) or not inference.strip():
        problems.append("targets.inference is missing or empty (fix: give the inference text or drop the record)")
    path = None
    if url is not None:
        try:
            path = url_to_path(url, vcr_root, vg_root)
        except ValueError as e:
            problems.append(f"{e} (fix: use the release's URLs, which end in <folder>/<file>.jpg)")
        if path is not None and files is not None and not files.exists(path):
            problems.append(f"image file not found: {path} (fix: check root, vcr_root and vg_root, or download the image again)")
    if problems:
        return None, problems
    split_idx = rec.get("split_idx", -1)
    item = _Item(index=index, path=path, boxes=tuple(boxes), clue=clue.strip(),
                 inference=inference.strip(), instance_id=str(iid), image_id=image_id_of(url),
                 split_idx=int(split_idx) if _is_number(split_idx) else -1)
    return item, []


def _identity(text: str) -> str:
    return text


class SherlockDataset(Dataset):
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

    def __init__(self, ann_file: str, *, vcr_root: str, vg_root: str, vis_processor: Callable,
                 text_processor: Optional[Callable] = None, prompt: str = "", split: str = "train",
                 is_train: bool = False, region: str = "highlight", text: str = "inference",
                 flip: bool = False, crop_margin: float = 0.1, max_records: Optional[int] = None,
                 max_bad_samples: int = 0, check_images: bool = True):
        if region not in REGION_MODES:
            raise ValueError(f"region={region!r}: choose one of {', '.join(REGION_MODES)}")
        if text not in TEXT_MODES:
            raise ValueError(f"text={text!r}: choose one of {', '.join(TEXT_MODES)}")
        self.ann_file = ann_file
        self.vcr_root, self.vg_root = vcr_root, vg_root
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.prompt = prompt
        self.split = split
        self.is_train = is_train
        self.region = region
        self.text = text
        self.flip = flip
        self.crop_margin = crop_margin
        self.items: List[_Item] = self._load(max_records, max_bad_samples, check_images)

    # -- loading and checks --------------------------------------------------
    def _load(self, max_records, max_bad_samples, check_images) -> List[_Item]:
        records = load_records(self.ann_file, self.split)
        if max_records is not None:
            records = records[: max(0, int(max_records))]
        if not records:
            raise DatasetError(f"{self.ann_file} has no records. Fix: use the full file from "
                               f"https://github.com/allenai/sherlock, or raise max_records.")
        files = _DirIndex() if check_images else None
        need_clue = self.text != "inference"
        items: List[_Item] = []
        bad: List[str] = []
        for i, rec in enumerate(records):
            item, problems = _parse_record(i, rec, vcr_root=self.vcr_root, vg_root=self.vg_root,
                                           need_clue=need_clue, files=files)
            if item is not None:
                items.append(item)
                continue
            iid = rec.get("instance_id", "?") if isinstance(rec, dict) else "?"
            bad.append(f"record {i} (instance_id {iid}): " + "; ".join(problems))
        if bad:
            no_image_found = files is not None and files.missing > 0 and files.found == 0
            self._report(bad, len(records), no_image_found, max_bad_samples)
        return items

    def _report(self, bad: List[str], total: int, no_image_found: bool, max_bad_samples: int) -> None:
        if 0 < len(bad) <= max_bad_samples:
            log.warning("%s", format_problems(
                self.ann_file, bad, show=3,
                fix=f"Skipping these {len(bad)} of {total} records (max_bad_samples={max_bad_samples})."))
            return
        hints = []
        if no_image_found:
            hints.append(f"No image was found: the images are looked up under vcr_root={self.vcr_root} "
                         f"and vg_root={self.vg_root}; set root, vcr_root or vg_root. " + DOWNLOAD_HINT)
        if max_bad_samples:
            hints.append(f"{len(bad)} bad records is more than max_bad_samples={max_bad_samples}.")
        else:
            hints.append(f"Fix the records, or set max_bad_samples to at least {len(bad)} "
                         f"to skip them (they are counted in a warning).")
        raise DatasetError(format_problems(self.ann_file, bad, fix="\n".join(hints)))

    def verify_images(self) -> List[str]:
        """Open and decode every image; returns one problem line per unreadable image.

        Slow (reads all the data): for ``tools/check_dataset.py``, not start-up.
        """
        problems, seen = [], set()
        for it in self.items:
            if it.path in seen:
                continue
            seen.add(it.path)
            try:
                with Image.open(it.path) as im:
                    im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
                problems.append(f"record {it.index} (instance_id {it.instance_id}): cannot decode "
                                f"{it.path}: {e}")
        return problems

    # -- samples -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def _texts(self, it: _Item) -> Tuple[str, str, str]:
        tp = self.text_processor
        if isinstance(tp, BlipCaptionProcessor):
            clean, lead = tp.pre_caption, tp.prompt
        else:
            clean, lead = (tp or _identity), ""
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

    def ground_truth(self) -> Dict[str, List[str]]:
        """``sample_id -> references`` for caption metrics."""
        return {a["sample_id"]: a["references"] for a in map(self.annotation, range(len(self)))}

    def load_image(self, index: int) -> Image.Image:
        it = self.items[index]
        try:
            with Image.open(it.path) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - report any decoder failure with its record
            raise DatasetError(
                f"cannot read image {it.path} of record {it.index} (instance_id {it.instance_id}) in "
                f"{self.ann_file}: {e}. Fix: download the image again; tools/check_dataset.py lists "
                f"every unreadable image.") from e

    def __getitem__(self, index: int) -> Dict[str, Any]:
        it = self.items[index]
        image, boxes = render_region(self.load_image(index), it.boxes, self.region, margin=self.crop_margin)
        if isinstance(self.vis_processor, ImageProcessor):
            tensor = self.vis_processor(image, region=boxes, flip=None if self.flip else False)
        else:  # a plain callable(image) from elsewhere
            tensor = self.vis_processor(image)
        sample = {"image": tensor}
        sample.update(self.annotation(index))
        return sample

    def __repr__(self) -> str:
        return (f"SherlockDataset(split={self.split!r}, records={len(self)}, file={self.ann_file!r}, "
                f"region={self.region!r}, text={self.text!r})")


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def _config_from(options: Dict[str, Any]) -> SherlockConfig:
    names = [f.name for f in dataclasses.fields(SherlockConfig)]
    unknown = [k for k in options if k not in names]
    if unknown:
        parts = []
        for k in unknown:
            near = close_matches(k, names)
            parts.append(f"{k!r}" + (f" (did you mean {', '.join(map(repr, near))}?)" if near else ""))
        raise TypeError(f"unknown sherlock option(s) {', '.join(parts)}; valid: {', '.join(names)}")
    return SherlockConfig(**options)


@DATASETS.register("sherlock", schema=SherlockConfig)
def build_sherlock(*, split: str, is_train: bool, vis_processor: Callable,
                   text_processor: Optional[Callable] = None, prompt: str = "",
                   **options: Any) -> SherlockDataset:
    """Build one split (``train``, ``val`` or ``test``) from ``SherlockConfig`` fields."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    cfg = _config_from(options)
    if cfg.synthetic is not None:
        make_tiny_sherlock(cfg.root, num_train=cfg.synthetic, num_val=cfg.synthetic_val,
                           seed=cfg.synthetic_seed, image_size=cfg.synthetic_image_size)
    file = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file or cfg.val_file}[split]
    return SherlockDataset(
        _resolve(cfg.root, file),
        vcr_root=cfg.vcr_root or os.path.join(cfg.root, "vcr1images"),
        vg_root=cfg.vg_root or os.path.join(cfg.root, "vg", "images"),
        vis_processor=vis_processor, text_processor=text_processor, prompt=prompt, split=split,
        is_train=is_train, region=cfg.region, text=cfg.text, flip=cfg.flip,
        crop_margin=cfg.crop_margin, max_records=cfg.max_records,
        max_bad_samples=cfg.max_bad_samples, check_images=cfg.check_images)
