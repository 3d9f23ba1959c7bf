"""Measure the per-layer activation costs the memory planner uses (engine/memory.py, LAYER_BYTES).

    python bench/calibrate_activations.py                 # OPT-2.7b, Flan-T5-XL, Vicuna-7B widths (CPU, ~2 min)
    python bench/calibrate_activations.py --families opt

Builds each family at its real width with 1 and then 2 LLM layers (and 1 / 2 ViT
layers for the vision tower), runs one bf16 training forward on CPU and adds up
the tensors autograd saves for backward (each storage once, parameters excluded),
per part. The difference between 2 and 1 layers is one layer's cost, printed as
bytes per token per unit of hidden width: the unit of LAYER_BYTES. Run it again
after upgrading transformers or torch, and on a GPU machine to see what SDPA's
GPU kernels save (they may keep less than the CPU ones).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import defaultdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

from engine.models import blip2  # noqa: E402
from engine.models.lora import apply_lora  # noqa: E402
from engine.models.tokenizer import IMAGE_TOKEN, local_tokenizer  # noqa: E402

FAMILIES = {"opt": ("blip2_opt", "pretrain_opt2.7b"), "t5": ("blip2_t5", "pretrain_flant5xl"),
            "llama": ("blip2_vicuna_instruct", "vicuna7b")}
MODES = {"through": {}, "train": {"freeze_llm": False},
         "lora": {"lora": {"r": 16, "alpha": 32, "dropout": 0.05}}}
BATCH, MAX_TXT = 2, 32


def build(arch: str, model_type: str, llm_layers: int, vit_layers: int, device: str, freeze_vit=True,
          freeze_llm=True, lora=None):
    spec = blip2.ARCHS[arch]
    cfg = copy.deepcopy(spec.zoo[model_type].config)
    cfg["vision_config"]["num_hidden_layers"] = vit_layers
    for key in ("num_hidden_layers", "num_layers", "num_decoder_layers"):
        if key in cfg["text_config"]:
            cfg["text_config"][key] = llm_layers
    tokenizer = local_tokenizer(spec.family)
    config = (InstructBlipConfig if spec.instruct else Blip2Config)(
        **cfg, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    cls = InstructBlipForConditionalGeneration if spec.instruct else Blip2ForConditionalGeneration
    hf = blip2.random_model(cls, config, torch.float32, 0)
    parts = apply_lora({"llm": hf.language_model, "qformer": hf.qformer, "vision": hf.vision_model},
                       spec.family, lora) if lora else []
    blip2.set_trainable(hf, freeze_vit, False, freeze_llm, parts)
    hf = hf.to(device=device, dtype=torch.bfloat16)
    qtok = local_tokenizer("qformer") if spec.instruct else None
    return blip2.VisionLanguageModel(hf, tokenizer, family=spec.family, instruct=spec.instruct,
                                     max_txt_len=MAX_TXT, qformer_tokenizer=qtok, freeze_vit=freeze_vit).train()


def saved_bytes(model, device: str):
    """Bytes autograd keeps for backward, per part, and the number of LLM / image tokens."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, current = {}, ["other"]
    hooks = []
    for name in ("vision_model", "qformer", "language_model"):
        mod = getattr(model.hf, name)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n)))
        hooks.append(mod.register_forward_hook(lambda m, a, o: current.__setitem__(0, "other")))

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (current[0], storage.nbytes())
        return t

    words = ("red blue green square circle left right top " * 20).split()
    target = " ".join(words[:60])  # longer than max_txt_len: every sample is truncated to it
    images = torch.randn(BATCH, 3, 224, 224, device=device)
    prompts = ["Inference: "] * BATCH
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, prompts, [target] * BATCH)
    for h in hooks:
        h.remove()
    out = defaultdict(int)
    for part, n in seen.values():
        out[part] += n
    inputs = model.build_inputs(prompts, [target] * BATCH)
    tokens = inputs["input_ids"].numel() + (inputs["labels"].numel() if not model.decoder_only else 0)
    return out, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from engine.memory import LAYER_BYTES

    for family in args.families:
        arch, model_type = FAMILIES[family]
        for mode, kw in MODES.items():
            one, tokens = saved_bytes(build(arch, model_type, 1, 1, args.device, **kw), args.device)
            two, _ = saved_bytes(build(arch, model_type, 2, 1, args.device, **kw), args.device)
            hidden = blip2.ARCHS[arch].zoo[model_type].config["text_config"].get("hidden_size") or \
                blip2.ARCHS[arch].zoo[model_type].config["text_config"]["d_model"]
            per = (two["language_model"] - one["language_model"]) / tokens / hidden
            planned = LAYER_BYTES[family].get(mode, float("nan"))
            print(f"{family:6} {mode:8} {per:7.1f} B/token/layer/width  (planner: {planned})", flush=True)
    one, _ = saved_bytes(build("blip2_opt", "pretrain_opt2.7b", 1, 1, args.device, freeze_vit=False), args.device)
    two, _ = saved_bytes(build("blip2_opt", "pretrain_opt2.7b", 1, 2, args.device, freeze_vit=False), args.device)
    vit = (two["vision_model"] - one["vision_model"]) / (BATCH * 257) / 1408
    print(f"vision train    {vit:7.1f} B/token/layer/width  (planner: {LAYER_BYTES['vision']['train']})")
    print(f"qformer (OPT-2.7b, batch {BATCH}): {one['qformer'] / 2 ** 20:.1f} MiB; "
          f"loss: {one['other'] / 2 ** 20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
