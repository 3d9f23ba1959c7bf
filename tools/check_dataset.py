"""Check every split of every dataset of a recipe: files, images, targets, boxes, ids.

    python tools/check_dataset.py --recipe recipes/sherlock_opt2.7b.yaml
    python tools/check_dataset.py --recipe R --options datasets.sherlock.root=/data/sherlock --full

Reports missing annotation or image files, empty or missing targets, malformed
records and boxes, boxes outside the image (the size read from the image file),
duplicate ids and, with --full, images that do not decode; and, as warnings, boxes
with more than half their area outside the image (problems with strict_boxes: true).
Prints counts and the first records of each kind with file and index. Exit status:
0 when everything is fine (warnings included), 1 when anything is wrong, 2 when the
recipe itself is invalid.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # Run as a script from anywhere: import the package from the repository root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import ConfigError, load_recipe  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML whose datasets to check")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override recipe keys, e.g. datasets.sherlock.root=/data/sherlock")
    p.add_argument("--full", action="store_true", help="decode every image (slow: reads all the data)")
    p.add_argument("--show", type=int, default=5, help="records listed per kind of problem (default 5)")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.options, check_files=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from engine.build import check_recipe_datasets

    report = check_recipe_datasets(recipe, full_decode=args.full,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.format(show=args.show))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
