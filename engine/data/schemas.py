"""The option schemas of the built-in datasets (``datasets.<name>`` in a recipe), one dataclass each.

Light on purpose (no numpy, PIL or torch): the recipe schema checks a recipe's dataset keys against
these before anything heavy is imported. The dataset modules build from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# How a record's region is shown (engine/data/region.py draws them).
REGION_MODES = ("highlight", "crop", "blackout_others", "none")
# Sherlock's target texts (engine/data/sherlock.py).
TEXT_MODES = ("inference", "clue_inference", "clue_in_prompt")


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
    strict_boxes: bool = field(default=False, metadata={
        "help": "Count a record whose box has more than half its area outside the image as bad (skipped within "
                "max_bad_samples, else an error); off: listed in a warning, and the box clipped to the image."})
    synthetic: Optional[int] = field(default=None, metadata={
        "help": "Generate the tiny procedural Sherlock with this many training records into root if absent; "
                "null or 0 = use the data that is in root."})
    synthetic_val: int = field(default=100, metadata={
        "help": "Validation records of the generated dataset (with synthetic; null = the default)."})
    synthetic_seed: int = field(default=0, metadata={
        "help": "Seed of the generated dataset (with synthetic)."})
    synthetic_image_size: int = field(default=96, metadata={
        "help": "Height in pixels of the generated images (with synthetic)."})


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
