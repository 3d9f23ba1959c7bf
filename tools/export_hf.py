r"""Export a checkpoint of this engine as a Hugging Face folder.

    python tools/export_hf.py runs/opt27b/checkpoints/best out/hf-model
    python tools/export_hf.py runs/vicuna7b-lora/checkpoints/epoch2 out/vicuna --keep-adapter

CKPT_DIR is a checkpoint folder (checkpoints/<tag>), the pointer checkpoints/latest, the link
checkpoints/best, or a run's output_dir / checkpoints folder (then its latest complete checkpoint); the
checkpoint it resolved to is printed first. DeepSpeed's zero_to_fp32 consolidates the ZeRO-2/3
shards; the model is rebuilt from the recipe saved with the checkpoint and loaded strictly. The frozen
weights a checkpoint does not hold come from its base (the recipe's model.pretrained, or --base when the
base moved), which must be the one it was trained on (its fingerprint is in the checkpoint). OUT_DIR gets
config.json + model.safetensors, the tokenizer and processor (AutoProcessor loads it; InstructBLIP:
qformer_tokenizer/), recipe.yaml (the training recipe, with model.pretrained pointing at OUT_DIR) and
export_info.json (source checkpoint, step, and the dtype each part had in the checkpoint).

Load it with:
    Blip2ForConditionalGeneration.from_pretrained(OUT_DIR)          # blip2_opt, blip2_t5
    InstructBlipForConditionalGeneration.from_pretrained(OUT_DIR)   # blip2_vicuna_instruct, blip2_t5_instruct
    AutoProcessor.from_pretrained(OUT_DIR)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir", metavar="CKPT_DIR",
                   help="checkpoint folder, checkpoints/latest, checkpoints/best, or a run folder (its latest)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder; must not exist or be empty (see --force)")
    p.add_argument("--keep-adapter", action="store_true",
                   help="with LoRA: write the base weights and the peft adapter in OUT_DIR/adapter/ instead of "
                        "merging the adapter into the weights (the default)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of the saved weights (default fp32: trained parts are the fp32 master weights, "
                        "frozen parts as the run stored them, upcast without loss)")
    p.add_argument("--base", help="folder of the checkpoint's base weights, when they moved from the recipe's "
                                  "model.pretrained (checked against the checkpoint's fingerprint)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.checkpoints.paths import resolve_checkpoint
    from engine.config import ConfigError
    from engine.checkpoints.common import ExportError
    from engine.export import export_checkpoint

    try:
        ckpt = resolve_checkpoint(args.ckpt_dir)
        print(ckpt.describe(), flush=True)
        info = export_checkpoint(ckpt.folder, args.out_dir, merge=not args.keep_adapter, dtype=args.dtype,
                                 force=args.force, base=args.base)
    except (ExportError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for part, d in info["parts"].items():
        state = "trained" if d["trained_params"] == d["params"] else "frozen" if not d["trained"] else "partly"
        from_base = info.get("frozen_from") == "base"
        source = {"frozen": "base", "partly": "base + checkpoint"}.get(state, "checkpoint") if from_base else "checkpoint"
        print(f"{part:8s} {d['params']:>14,d} params  {state:7s}  {source} dtype {d['source_dtype']}, "
              f"saved as {info['saved_dtype']}")
    if "lora" in info:
        print("lora:", json.dumps(info["lora"]))
    if info.get("base") and any(d["trained_params"] < d["params"] for d in info["parts"].values()):
        print(f"frozen weights from the base {info['base']['path']} (fingerprint {info['base']['fingerprint'][:16]})")
    print(f"exported step {info.get('global_step')} of {info['source_checkpoint']} to {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
