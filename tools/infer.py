r"""Caption / infer for one image with a trained model, preparing it as training did.

    python tools/infer.py --model out/hf-model --image x.jpg --region 10,20,200,300
    python tools/infer.py --model runs/sherlock/checkpoints/best --image x.jpg --region 10,20,200,300 \
        --clue "the ground is wet"

--model is an exported folder (tools/export_hf.py, merge_lora.py, import_lavis.py: it has recipe.yaml),
an engine checkpoint (checkpoints/<tag>) or an adapter folder. The saved recipe decides how the region
is drawn (datasets.<name>.region: highlight, crop, blackout_others, none), the eval image transform,
the prompt and whether the clue goes into it (text: clue_in_prompt). Several --region boxes form one
region, as in Sherlock records. Prints the generated text on stdout (notes go to stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported folder, engine checkpoint or adapter folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--region", action="append", default=[], metavar="L,T,W,H",
                   help="a box in pixels of the image: left,top,width,height (repeat for several boxes)")
    p.add_argument("--clue", help="the clue (used when the model was trained with text: clue_in_prompt)")
    p.add_argument("--prompt", help="prompt (default: the recipe's model.prompt)")
    p.add_argument("--num_beams", type=int, help="beam size (default: the recipe's run.num_beams)")
    p.add_argument("--max_len", type=int, help="max new tokens (default: the recipe's run.max_len)")
    p.add_argument("--min_len", type=int, help="min new tokens (default: the recipe's run.min_len)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="compute dtype")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.config import ConfigError
    from engine.checkpoints.common import ExportError
    from engine.inference import generate, load_model, parse_box

    try:
        boxes = [parse_box(r) for r in args.region]
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"image not found: {args.image}")
        model, recipe = load_model(args.model, dtype=args.dtype, device=args.device)
        out = generate(model, recipe, args.image, boxes=boxes, clue=args.clue, prompt=args.prompt,
                       num_beams=args.num_beams, max_len=args.max_len, min_len=args.min_len)
    except (ExportError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in out["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"region mode {out['region_mode']}, text mode {out['text_mode']}, prompt {out['prompt']!r}", file=sys.stderr)
    print(out["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
