r"""Merge LoRA adapters into their base model and write a Hugging Face folder.

    python tools/merge_lora.py runs/vicuna7b-lora/checkpoints/best out/merged
    python tools/merge_lora.py runs/vicuna7b-lora/checkpoints/best/adapter out/merged \
        --base /data/hf/instructblip-vicuna-7b

CKPT_OR_ADAPTER is
  * a checkpoint of this engine (checkpoints/<tag>, checkpoints/latest, checkpoints/best, or the run
    folder for its latest complete checkpoint; the one resolved is printed): its ZeRO shards are
    consolidated (fp32) and the adapters merged into the weights (as tools/export_hf.py does by default);
  * an adapter folder (a checkpoint's adapter/, or OUT_DIR/adapter of `export_hf.py --keep-adapter`):
    loaded with peft onto the base and merged with merge_and_unload. The base is --base (a Hugging Face
    folder) or else the recipe's model.pretrained; the recipe is the folder's recipe.yaml, the
    checkpoint it sits in, or --recipe.
OUT_DIR is written as by tools/export_hf.py (safetensors, tokenizer, processor, recipe.yaml,
export_info.json).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="CKPT_OR_ADAPTER",
                   help="engine checkpoint (folder, checkpoints/latest, checkpoints/best or run folder) or adapter "
                        "folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder; must not exist or be empty (see --force)")
    p.add_argument("--base", help="Hugging Face folder of the base model (default: the recipe's model.pretrained); "
                                  "for a checkpoint, only when its base moved (checked against its fingerprint)")
    p.add_argument("--recipe", help="adapter folder only: recipe YAML (a training recipe or a run's config.yaml) "
                                    "when the folder carries none")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.checkpoints.paths import CheckpointNotFound, resolve_checkpoint
    from engine.config import ConfigError, load_yaml
    from engine.checkpoints.common import ExportError
    from engine.checkpoints.lora import is_adapter_folder
    from engine.export import export_checkpoint, merge_adapter

    try:
        if is_adapter_folder(args.source):
            recipe = load_yaml(args.recipe) if args.recipe else None
            info = merge_adapter(args.source, args.out_dir, base=args.base, recipe=recipe, dtype=args.dtype,
                                 force=args.force)
        else:
            try:
                ckpt = resolve_checkpoint(args.source)
            except CheckpointNotFound as e:
                raise ExportError(f"{e}; nor is it an adapter folder (with adapter_info.json or "
                                  f"adapter_config.json)") from None
            print(ckpt.describe(), flush=True)
            if args.recipe:
                raise ExportError("--recipe applies to adapter folders; a checkpoint carries its own")
            info = export_checkpoint(ckpt.folder, args.out_dir, merge=True, dtype=args.dtype, force=args.force,
                                     base=args.base)
            if "lora" not in info:
                print(f"note: {ckpt.folder} has no LoRA adapters; exported the weights as they are",
                      file=sys.stderr)
    except (ExportError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lora = info.get("lora") or (info.get("merge") or {}).get("merged_layers")
    print(f"merged LoRA: {lora}")
    print(f"wrote {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
