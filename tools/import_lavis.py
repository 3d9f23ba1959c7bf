r"""Import a LAVIS BLIP-2 checkpoint (from LAVIS or its Sherlock fork) as a Hugging Face folder.

    python tools/import_lavis.py lavis_out/checkpoint_best.pth out/imported \
        --arch blip2_opt --model_type caption_coco_opt2.7b --base /data/hf/blip2-opt-2.7b-coco

LAVIS_PTH is LAVIS's checkpoint_*.pth (its `model` state dict is used) or a bare state dict. LAVIS
saves only the parameters a run trained (often the Q-Former, query_tokens and the projection); the
rest is kept from the base: --base (a Hugging Face folder of the arch/model_type, e.g. the official
checkpoint the LAVIS run started from), or the seeded tiny model for --model_type tiny. Every key is
accounted for: imported, dropped (with the reason), kept from the base, or unmapped (an error unless
--allow-unmapped). The file is read with torch.load(weights_only=True): a pickle holding other Python
objects is refused.

OUT_DIR is written as by tools/export_hf.py (safetensors, tokenizer, processor, recipe.yaml,
export_info.json with the full key report). recipe.yaml keeps the LAVIS run (from the config in the .pth):
the prompt exactly as LAVIS applied it (a text processor's, trailing space included), max_txt_len,
max_output_txt_len, the image size, the dataset sections and the generation settings. The tied embedding
copies a LAVIS runner file holds for a frozen LLM (OPT's lm_head, T5's embed_tokens) never overwrite the
base's; a base vocabulary extended for <image> keeps its added rows.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHS = ["blip2_opt", "blip2_t5", "blip2_vicuna_instruct", "blip2_t5_instruct"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lavis_pth", metavar="LAVIS_PTH", help="LAVIS checkpoint_*.pth or a state dict (.pth/.safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder; must not exist or be empty (see --force)")
    p.add_argument("--arch", required=True, choices=ARCHS, help="LAVIS arch of the checkpoint")
    p.add_argument("--model_type", required=True, help="zoo entry, e.g. pretrain_opt2.7b, caption_coco_opt2.7b, tiny")
    p.add_argument("--base", help="Hugging Face folder that supplies every weight the LAVIS file lacks "
                                  "(required except for --model_type tiny)")
    p.add_argument("--allow-unmapped", action="store_true",
                   help="import even if some keys have no counterpart (they are still listed)")
    p.add_argument("--region", default="highlight", choices=["highlight", "crop", "blackout_others", "none"],
                   help="region mode the LAVIS run was trained with (recorded in recipe.yaml for tools/infer.py)")
    p.add_argument("--text", default="inference", choices=["inference", "clue_inference", "clue_in_prompt"],
                   help="Sherlock text mode the LAVIS run was trained with")
    p.add_argument("--prompt", help="model prompt (default: the LAVIS config's as LAVIS applied it: a text "
                                    "processor's prompt, else the model's; else the zoo default)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.checkpoints.common import ExportError
    from engine.checkpoints.lavis import LavisImportError, import_checkpoint, summary
    from engine.models import WeightsNotFoundError

    if args.base is None and args.model_type != "tiny":
        print(f"error: --base is required for --model_type {args.model_type}: the Hugging Face folder of the model "
              f"the LAVIS run started from (LAVIS checkpoints hold only the trained weights)", file=sys.stderr)
        return 2
    try:
        report = import_checkpoint(args.lavis_pth, args.out_dir, arch=args.arch, model_type=args.model_type,
                                   base=args.base, allow_unmapped=args.allow_unmapped, region=args.region,
                                   text=args.text, prompt=args.prompt, dtype=args.dtype, force=args.force)
    except (LavisImportError, ExportError, WeightsNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in summary(report):
        print(line)
    print(f"wrote {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
