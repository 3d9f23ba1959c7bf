"""``python -m engine list``: what is registered (models with zoo types, datasets, processors, tasks, ds_configs)."""
from __future__ import annotations

import os
import sys

from engine.registry import DATASETS, MODELS, PROCESSORS, TASKS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["list"]:
        print("usage: python -m engine list", file=sys.stderr)
        return 2
    print("models (arch: model_types)")
    for e in MODELS:
        print(f"  {e.name}: {', '.join(e.zoo)}")
    for title, reg in (("datasets", DATASETS), ("processors", PROCESSORS), ("tasks", TASKS)):
        print(f"{title}: {', '.join(reg.names())}")
    ds_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
    if os.path.isdir(ds_dir):
        print(f"ds_configs: {', '.join(sorted(f for f in os.listdir(ds_dir) if f.endswith('.json')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
