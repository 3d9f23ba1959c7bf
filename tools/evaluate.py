"""Evaluate a checkpoint without training.

    python tools/evaluate.py --recipe recipes/sherlock_opt2.7b.yaml --checkpoint runs/x/checkpoints/best
    deepspeed --num_gpus 8 tools/evaluate.py --recipe ... --checkpoint out/hf-model --split test

CHECKPOINT may be an engine checkpoint (checkpoints/<tag>, checkpoints/latest, checkpoints/best, or a run
folder for its latest complete checkpoint; the one resolved is printed), an exported Hugging Face folder
(tools/export_hf.py) or a LoRA adapter folder (adapter_config.json; the base comes from the recipe).
Predictions and metrics go to --output_dir (default runs/eval-<name>-<time>).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checkpoint_options(path: str) -> list:
    """Recipe overrides that make the engine start from ``path``."""
    from engine.checkpoints.paths import CheckpointNotFound, is_complete, resolve_checkpoint

    if not is_complete(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return [f"model.adapter={path}"]
        if os.path.isfile(os.path.join(path, "config.json")):
            return [f"model.pretrained={path}", "model.load_finetuned=false"]
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointNotFound as e:
        raise SystemExit(f"error: --checkpoint {e}; nor is it an exported Hugging Face folder (no config.json) "
                         f"or a LoRA adapter (no adapter_config.json)") from None
    print(ckpt.describe(), flush=True)
    return [f"run.resume_ckpt_path={ckpt.folder}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", nargs="+", default=["val"], help="split(s) to evaluate")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ckpt_options = checkpoint_options(os.path.normpath(args.checkpoint))
    ckpt = ckpt_options[0].split("=", 1)[1]  # the folder resolved (e.g. step200 for checkpoints/latest)
    out = args.output_dir or os.path.join("runs", f"eval-{os.path.basename(ckpt)}-{time.strftime('%Y%m%d-%H%M%S')}")
    splits = "[" + ",".join(args.split) + "]"
    options = ["run.evaluate=true", f"run.valid_splits={splits}", "run.test_splits=[]", f"run.output_dir={out}",
               *ckpt_options, *args.options]
    from engine.train import main as train_main

    return train_main(["--recipe", args.recipe, "--options", *options])


if __name__ == "__main__":
    sys.exit(main())
