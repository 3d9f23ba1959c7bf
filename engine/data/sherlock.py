"""The Sherlock dataset (Hessel et al. 2022, https://github.com/allenai/sherlock).

A record is an image, a region in it (one or more boxes), a clue (what is
visible in the region) and an abductive inference (what is probably true).
The model sees the image with the region drawn in and learns to write the
inference. Files, record format and URL -> file mapping are those of the
official release and baselines.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from engine.registry import DATASETS

from .errors import DatasetError
from .processors import BlipCaptionProcessor
from .records import (DirIndex, RecordDataset, config_from, identity, is_number, parse_boxes, read_json_list,
                      resolve)
from .region import REGION_MODES, Box
from .synthetic import make_tiny_sherlock

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
        "help": "Generate the tiny procedural Sherlock with this many training records into root if absent; "
                "null or 0 = use the data that is in root."})
    synthetic_val: int = field(default=100, metadata={
        "help": "Validation records of the generated dataset (with synthetic; null = the default)."})
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
    return read_json_list(
        file, f"Sherlock {split} file" if split else "Sherlock file",
        missing_fix="set root (or the split's *_file) to where the data is. " + DOWNLOAD_HINT,
        malformed_fix="the file is probably truncated or was edited; download it again from "
                      "https://github.com/allenai/sherlock (a Sherlock file is a JSON list of records).")


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

    @property
    def sample_id(self) -> str:
        return self.instance_id


def _parse_record(rec: Any, *, vcr_root: str, vg_root: str, need_clue: bool,
                  files: Optional[DirIndex]) -> Tuple[Optional[dict], List[Tuple[str, str]]]:
    """One record -> (fields, []) or (None, [(kind, problem), ...]); each problem says its fix."""
    problems: List[Tuple[str, str]] = []
    if not isinstance(rec, dict):
        return None, [("malformed", f"is a JSON {type(rec).__name__}, not an object (fix: remove it)")]
    inputs = rec.get("inputs")
    targets = rec.get("targets")
    iid = rec.get("instance_id")
    if not isinstance(iid, (str, int)) or isinstance(iid, bool) or iid == "":
        problems.append(("malformed", "instance_id is missing or empty (fix: give every record a unique "
                                      "instance_id)"))
    url = None
    boxes: List[Box] = []
    clue = ""
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
        boxes, box_problems = parse_boxes(inputs.get("bboxes"), "inputs.bboxes", size=(width, height),
                                          required=True)
        problems += box_problems
        clue = inputs.get("clue", "")
        if not isinstance(clue, str):
            clue = ""
        if need_clue and not clue.strip():
            problems.append(("missing_target", "inputs.clue is missing or empty, and the text mode uses the clue "
                                               "(fix: add the clue, or use text: inference)"))
    inference = targets.get("inference") if isinstance(targets, dict) else None
    if not isinstance(targets, dict):
        problems.append(("missing_target", "targets is missing (fix: records need targets.inference)"))
    elif not isinstance(inference, str) or not inference.strip():
        problems.append(("missing_target", "targets.inference is missing or empty (fix: give the inference text "
                                           "or drop the record)"))
    path = None
    if url is not None:
        try:
            path = url_to_path(url, vcr_root, vg_root)
        except ValueError as e:
            problems.append(("malformed", f"{e} (fix: use the release's URLs, which end in <folder>/<file>.jpg)"))
        if path is not None and files is not None and not files.exists(path):
            problems.append(("missing_image", f"image file not found: {path} (fix: check root, vcr_root and "
                                              f"vg_root, or download the image again)"))
    if problems:
        return None, problems
    split_idx = rec.get("split_idx", -1)
    return dict(path=path, boxes=tuple(boxes), clue=clue.strip(), inference=inference.strip(),
                instance_id=str(iid), image_id=image_id_of(url),
                split_idx=int(split_idx) if is_number(split_idx) else -1), []


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
                 max_bad_samples: int = 0, check_images: bool = True):
        if text not in TEXT_MODES:
            raise ValueError(f"text={text!r}: choose one of {', '.join(TEXT_MODES)}")
        super().__init__(ann_file, vis_processor=vis_processor, text_processor=text_processor, prompt=prompt,
                         split=split, is_train=is_train, region=region, flip=flip, crop_margin=crop_margin)
        self.vcr_root, self.vg_root = vcr_root, vg_root
        self.text = text
        self._load(max_records, max_bad_samples, check_images)

    # -- loading and checks --------------------------------------------------
    def _load(self, max_records, max_bad_samples, check_images) -> None:
        records = load_records(self.ann_file, self.split)
        if max_records is not None:
            records = records[: max(0, int(max_records))]
        files = DirIndex() if check_images else None
        need_clue = self.text != "inference"
        items: List[_Item] = []
        bad = []
        for i, rec in enumerate(records):
            fields, problems = _parse_record(rec, vcr_root=self.vcr_root, vg_root=self.vg_root,
                                             need_clue=need_clue, files=files)
            if fields is not None:
                items.append(_Item(index=i, **fields))
            else:
                bad.append(self.bad(i, rec.get("instance_id") if isinstance(rec, dict) else None, problems))
        hints = []
        if files is not None and files.missing > 0 and files.found == 0:
            hints.append(f"No image was found: the images are looked up under vcr_root={self.vcr_root} "
                         f"and vg_root={self.vg_root}; set root, vcr_root or vg_root. " + DOWNLOAD_HINT)
        self.accept(items, bad, total=len(records), max_bad_samples=max_bad_samples, hints=hints)

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


@DATASETS.register("sherlock", schema=SherlockConfig, prepare=prepare_sherlock)
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
        max_bad_samples=cfg.max_bad_samples, check_images=cfg.check_images)
