"""A tiny, procedurally drawn dataset in the real Sherlock format.

Each image is a plain background with 2-4 shapes (circle, square, triangle)
in four colours, one shape per cell of a 2x2 grid. One shape is the record's
region. The clue names what is visible ("a red thing"); the inference is a
fixed sentence chosen by the colour *and* shape inside the box (12 sentences),
so a model has to look at the highlighted region to get it right, and a tiny
model learns it in a few hundred steps on CPU.

The files follow the official release exactly (records, file names, folder
layout, URLs of both the VCR and the Visual Genome kind), so the synthetic data
goes through the same loading and checking code as the real data.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .errors import DatasetError
from .store import locked

log = logging.getLogger(__name__)

TRAIN_FILE = "sherlock_dataset/sherlock_train_v1_1.json"
VAL_FILE = "sherlock_dataset/sherlock_val_with_split_idxs_v1_1.json"
# Written last, into sherlock_dataset/: the dataset is complete once it exists.
SPEC_FILE = "sherlock_dataset/.tiny_sherlock.json"
# Every top-level folder the generator creates carries this file, so it only
# ever replaces folders it made itself.
OWNER_MARK = ".tiny_sherlock"
TOP_DIRS = ("vcr1images", "vg", "sherlock_dataset")

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((236, 236, 236), (196, 196, 196), (168, 188, 208), (212, 196, 168), (120, 120, 130))
OBJECT = {"circle": "ball", "square": "box", "triangle": "kite"}
# colour -> sentence about the object: the inference depends on both.
SITUATION = {
    "red": "someone is about to play with the {obj}",
    "green": "the {obj} was left here by a child",
    "blue": "the {obj} belongs to the people at the beach",
    "yellow": "the {obj} is a present for a birthday party",
}

VCR_URL = "http://s3-us-west-2.amazonaws.com/ai2-rowanz/vcr1images/{movie}/{file}"
VG_URL = "https://cs.stanford.edu/people/rak248/{folder}/{n}.jpg"


def inference_for(colour: str, shape: str) -> str:
    return SITUATION[colour].format(obj=OBJECT[shape])


def _url_for(index: int) -> str:
    """Image ``index`` -> a URL; every 4 images: 2 VCR, 1 VG_100K, 1 VG_100K_2."""
    kind = index % 4
    if kind < 2:
        movie_no = 1 + index // 100
        movie = f"lsmdc_{movie_no:04d}_Synthetic_Scenes"
        sec = index % 100
        # Like VCR's names: dots in the time stamps and '@' before the frame number.
        file = f"{movie_no:04d}_Synthetic_Scenes_00.01.{sec:02d}.000-00.01.{sec:02d}.500@{index % 7}.jpg"
        return VCR_URL.format(movie=movie, file=file)
    folder = "VG_100K" if kind == 2 else "VG_100K_2"
    return VG_URL.format(folder=folder, n=1000 + index)


def _local_path(root: str, url: str) -> str:
    tail = url.split("/")[-2:]
    base = os.path.join(root, "vg", "images") if "VG_" in url else os.path.join(root, "vcr1images")
    return os.path.join(base, *tail)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _scene(rng: np.random.Generator, index: int, image_size: int):
    """Draw one image and its record (without split_idx)."""
    url = _url_for(index)
    H = image_size
    W = image_size * 4 // 3 if "VG_" not in url else image_size  # VCR frames are wide
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(image)
    cw, ch = W // 2, H // 2
    n = int(rng.integers(2, 5))
    cells = rng.permutation(4)[:n]
    target = int(rng.integers(n))
    colour_names = list(COLOURS)
    record_box = None
    for k, cell in enumerate(cells.tolist()):
        side = int(min(cw, ch) * rng.uniform(0.5, 0.8))
        cx0, cy0 = (cell % 2) * cw, (cell // 2) * ch
        x0 = cx0 + int(rng.integers(0, cw - side + 1))
        y0 = cy0 + int(rng.integers(0, ch - side + 1))
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colour_names[rng.integers(len(colour_names))]
        _draw_shape(draw, shape, (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[colour])
        if k == target:
            pad = 2  # a little room around the shape, as real boxes have
            l, t = max(0, x0 - pad), max(0, y0 - pad)
            r, b = min(W, x0 + side + pad), min(H, y0 + side + pad)
            record_box = {"left": l, "top": t, "width": r - l, "height": b - t}
            target_shape, target_colour = shape, colour
    instance_id = hashlib.md5(f"tiny-sherlock-{index}".encode()).hexdigest()
    record = {
        "inputs": {
            "image": {"url": url, "width": W, "height": H},
            "bboxes": [record_box],
            "clue": f"a {target_colour} thing",
            "confidence": float(rng.integers(1, 4)),
            "obs_idx": 0,
        },
        "targets": {"inference": inference_for(target_colour, target_shape)},
        "instance_id": instance_id,
    }
    return image, record


def _write(dest: str, num_train: int, num_val: int, seed: int, image_size: int) -> None:
    """Write the whole dataset into the empty folder ``dest``."""
    rng = np.random.default_rng(seed)
    splits = {TRAIN_FILE: range(num_train), VAL_FILE: range(num_train, num_train + num_val)}
    made_dirs = set()
    for file, indices in splits.items():
        records = []
        for j, index in enumerate(indices):
            image, record = _scene(rng, index, image_size)
            path = _local_path(dest, record["inputs"]["image"]["url"])
            folder = os.path.dirname(path)
            if folder not in made_dirs:
                os.makedirs(folder, exist_ok=True)
                made_dirs.add(folder)
            image.save(path, format="JPEG", quality=92)
            if file == VAL_FILE:
                # The official validation file splits records into groups for
                # retrieval scoring; groups of 25 here (about 1000 there).
                record["split_idx"] = j // 25
            records.append(record)
        os.makedirs(os.path.join(dest, os.path.dirname(file)), exist_ok=True)
        with open(os.path.join(dest, file), "w") as f:
            json.dump(records, f)
    for top in TOP_DIRS:
        os.makedirs(os.path.join(dest, top), exist_ok=True)
        open(os.path.join(dest, top, OWNER_MARK), "w").close()


def _read_spec(root: str):
    try:
        with open(os.path.join(root, SPEC_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_tiny_sherlock(root: str, num_train: int = 1200, num_val: int = 100, seed: int = 0,
                       image_size: int = 96) -> str:
    """Generate the tiny Sherlock under ``root`` unless it is already there; returns ``root``.

    Writes ``root/sherlock_dataset/{sherlock_train_v1_1.json,
    sherlock_val_with_split_idxs_v1_1.json}``, ``root/vcr1images/...`` and
    ``root/vg/images/VG_100K{,_2}/...``. The output is the same for the same
    arguments. Safe to call from several processes at once (DeepSpeed ranks):
    one generates into a temporary folder under a file lock and moves it into
    place, the spec file last; the others wait and then find it complete.
    Never overwrites folders it did not create.
    """
    if not root:
        raise DatasetError("the synthetic Sherlock needs a folder: set root to a writable path")
    spec = {"num_train": int(num_train), "num_val": int(num_val), "seed": int(seed),
            "image_size": int(image_size), "format": 1}
    if _read_spec(root) == spec:
        return root
    os.makedirs(root, exist_ok=True)
    with locked(os.path.join(root, ".tiny_sherlock.lock")):
        found = _read_spec(root)
        if found == spec:
            return root  # another process finished it while we waited
        if found is not None:
            raise DatasetError(
                f"{root} holds a synthetic Sherlock made with {found}, not {spec}. "
                f"Fix: delete {root} to regenerate it, or choose another root.")
        for top in TOP_DIRS:
            path = os.path.join(root, top)
            if os.path.exists(path) and not os.path.exists(os.path.join(path, OWNER_MARK)):
                raise DatasetError(
                    f"cannot generate the synthetic Sherlock in {root}: {path} exists and was not "
                    f"made by the generator (real data?). Fix: to use the data that is there, add "
                    f"--options datasets.sherlock.synthetic=null (or delete `synthetic:` from the recipe's "
                    f"datasets.sherlock); to generate, point root at an empty or new folder.")
        log.info("generating the synthetic Sherlock (%d train, %d val) in %s", num_train, num_val, root)
        tmp = tempfile.mkdtemp(prefix=".tiny_sherlock-", dir=root)
        try:
            _write(tmp, num_train, num_val, seed, image_size)
            # Images first, the JSON folder last; leftovers of an interrupted run
            # (ours, marked, with no spec file) are replaced.
            for top in TOP_DIRS:
                dst = os.path.join(root, top)
                if os.path.exists(dst):
                    shutil.rmtree(dst)
                os.rename(os.path.join(tmp, top), dst)
            with open(os.path.join(root, SPEC_FILE + ".tmp"), "w") as f:
                json.dump(spec, f)
            os.replace(os.path.join(root, SPEC_FILE + ".tmp"), os.path.join(root, SPEC_FILE))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
