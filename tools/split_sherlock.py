"""Carve a dev split out of Sherlock's training file, so the validation file can be a real test split.

    python tools/split_sherlock.py --root /data/sherlock              # 1% of the training images
    python tools/split_sherlock.py --root /data/sherlock --dev-fraction 0.02

The official test set is hidden (leaderboard only). Selecting checkpoints on the
validation file and then reporting on it measures the selection, not the model,
so the shipped Sherlock recipes select on a dev split taken from the training
file and keep the official validation file untouched as their test split.

Records are assigned by image (a hash of the image's <folder>/<file>), so every
inference about one image lands on the same side and the split is the same on
every machine. Writes, next to the training file:

    sherlock_dataset/sherlock_train_minus_dev_v1_1.json   (datasets.sherlock.train_file)
    sherlock_dataset/sherlock_dev_v1_1.json               (datasets.sherlock.val_file)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

TRAIN = "sherlock_dataset/sherlock_train_v1_1.json"
TRAIN_OUT = "sherlock_dataset/sherlock_train_minus_dev_v1_1.json"
DEV_OUT = "sherlock_dataset/sherlock_dev_v1_1.json"


def image_key(record) -> str:
    url = record["inputs"]["image"]["url"]
    return "/".join(url.strip().rstrip("/").split("/")[-2:])


def in_dev(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def split(records, fraction: float):
    train, dev = [], []
    for rec in records:
        (dev if in_dev(image_key(rec), fraction) else train).append(rec)
    return train, dev


def _write(path: str, records) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f)
    os.replace(tmp, path)  # never a half-written file under the final name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the Sherlock root (holds sherlock_dataset/)")
    p.add_argument("--train-file", default=TRAIN, help=f"training records, relative to root (default {TRAIN})")
    p.add_argument("--dev-fraction", type=float, default=0.01, help="share of training images for dev (0.01)")
    args = p.parse_args(argv)
    if not 0 < args.dev_fraction < 1:
        p.error("--dev-fraction must be between 0 and 1")
    src = os.path.join(args.root, args.train_file)
    if not os.path.isfile(src):
        print(f"error: {src} not found; --root should hold sherlock_dataset/ "
              f"(https://github.com/allenai/sherlock)", file=sys.stderr)
        return 2
    with open(src, "r", encoding="utf-8") as f:
        records = json.load(f)
    try:
        train, dev = split(records, args.dev_fraction)
    except (KeyError, TypeError, AttributeError):
        print(f"error: {src} does not hold Sherlock records (inputs.image.url missing)", file=sys.stderr)
        return 2
    folder = os.path.dirname(src)
    _write(os.path.join(folder, os.path.basename(TRAIN_OUT)), train)
    _write(os.path.join(folder, os.path.basename(DEV_OUT)), dev)
    images = len({image_key(r) for r in dev})
    print(f"{len(train)} training and {len(dev)} dev records ({images} images) written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
