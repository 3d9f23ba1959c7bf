"""Will a recipe fit? Predict per-GPU and CPU memory of training it, before any weights are read.

    python tools/plan_memory.py --recipe recipes/sherlock_vicuna13b_lora.yaml --gpu-mem 24
    python tools/plan_memory.py --recipe R --gpus 8 --options model.use_grad_checkpoint=false --json
    python tools/plan_memory.py --all --gpu-mem 24 --gpus 1 8      # the table of docs/memory.md

The model is built on the meta device (no memory, no download); parameters are
counted per part and the ZeRO stage, offload, batch, image size, text length and
checkpointing of the recipe give the prediction (engine/memory.py explains the
model), and the disk size of one checkpoint. When it does not fit, the changes that would make it fit are listed.
Exit status: 0 fits, 1 does not fit, 2 the recipe is invalid.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

if __package__ in (None, ""):
    # Run as a script from anywhere: import the package from the repository root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import ConfigError, load_recipe  # noqa: E402
from engine.memory import resolve_auto_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table(paths, gpu_counts, gpu_mem: float) -> str:
    """A markdown table: one row per recipe, predicted GiB per GPU for each GPU count."""
    from engine.memory import plan

    def gpus(n):
        return f"{n} GPU{'s' if n > 1 else ''}"

    def count(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    head = ["recipe", "ZeRO", "params (trainable)", "batch/GPU"] + [f"GPU GiB, {gpus(n)}" for n in gpu_counts] \
        + [f"CPU GiB, {gpus(n)}" for n in gpu_counts] + ["checkpoint GiB (frozen weights written twice)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in paths:
        recipe = load_recipe(path, check_files=False)
        resolve_auto_batch(recipe, gpu_counts[0], gpu_mem)
        plans = [plan(recipe, gpus=n, gpu_mem_gb=gpu_mem, suggest=False) for n in gpu_counts]
        p = plans[0]
        zero = f"{p.stage}" + (" + opt offload" if p.offload_optimizer else "") + (
            " + param offload" if p.offload_param else "")
        params = f"{count(p.params['all']['total'])} ({count(p.params['all']['trainable'])})"
        gb = [f"{q.gpu_gb:.1f}" + ("" if q.fits else " (does not fit)") for q in plans]
        cpu = [f"{q.cpu_gb:.0f}" for q in plans]
        disk = f"{p.checkpoint_gb['this']:.2f} ({p.checkpoint_gb['frozen_written_twice']:.2f})"
        rows.append("| " + " | ".join([os.path.relpath(path, ROOT), zero, params, str(p.workload.batch), *gb,
                                       *cpu, disk]) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="recipe YAML")
    p.add_argument("--all", action="store_true", help="every recipe in recipes/, as a markdown table")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="override recipe keys")
    p.add_argument("--gpu-mem", type=float, default=24.0, help="GiB of memory per GPU (default 24)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPUs per node (--all: one column each)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if not args.recipe and not args.all:
        p.error("give --recipe R or --all")

    from engine.memory import format_plan, plan

    if args.all:
        paths = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
        print(table(paths, args.gpus, args.gpu_mem))
        return 0
    try:
        recipe = load_recipe(args.recipe, args.options, check_files=False)
        resolve_auto_batch(recipe, args.gpus[0], args.gpu_mem)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = plan(recipe, gpus=args.gpus[0], gpu_mem_gb=args.gpu_mem, nodes=args.nodes)
    print(json.dumps(result.to_json()) if args.json else format_plan(result))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
