"""BLIP-2 / InstructBLIP builders: a checkpoint folder (or the seeded tiny / random weights) ->
the `VisionLanguageModel` wrapper (engine/models/wrapper.py) the trainer uses.

The networks are transformers' `Blip2ForConditionalGeneration` (OPT, Flan-T5)
and `InstructBlipForConditionalGeneration` (Vicuna, Flan-T5). The builders own
loading (checked against the arch), freezing, LoRA, quantisation, the ViT's
input size and activation checkpointing.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AddedToken,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

from transformers.utils import logging as hf_logging

from engine.registry import close_matches

from .attention import use_shared_bias_attention
from .lora import apply_lora
from .norms import use_lean_rms_norms
from .parts import cast_parameters, gathered, part_of
from .quant import quantization_config
from .tokenizer import IMAGE_TOKEN, local_tokenizer
from .wrapper import TextInputs, VisionLanguageModel, text_inputs_for, vit_image_size
from .zoo import ARCHS, ArchSpec, ZooEntry, tiny_config

class CheckpointMismatchError(ValueError):
    """model.pretrained holds a checkpoint of another architecture than model.arch."""


class WeightsNotFoundError(FileNotFoundError):
    """The checkpoint folder a model needs is not there."""


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value)]
    except KeyError:
        raise ValueError(f"torch_dtype {value!r} is not one of {sorted(_DTYPES)}") from None


def _init_query_tokens(hf: nn.Module, std: float) -> None:
    # transformers initialises query_tokens to zeros (checkpoints overwrite them);
    # randomly initialised models need LAVIS's normal(0, 0.02) or all queries are identical.
    with gathered([hf.query_tokens], modifier_rank=0), torch.no_grad():
        hf.query_tokens.normal_(0.0, std)


def random_model(cls, config, dtype: torch.dtype, seed: int, device: Optional[str] = None) -> nn.Module:
    """`cls` built from `config` with random weights drawn from `seed`, made directly in `dtype` on `device`
    (None: the default device, or the caller's `torch.device` context, e.g. meta for the planner).

    The weights depend on the seed, the dtype they are drawn in and the device type (the CPU's and CUDA's
    generators differ): the same three give the same weights. `_from_config` honours a live HfDeepSpeedConfig
    (ZeRO-3 partitions while building). The seed is applied on a forked RNG so building a model does not move
    the caller's RNG."""
    target = torch.device(device) if device is not None else None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    if target is not None and target.type == "cuda" and target.index is not None and target.index not in devices:
        devices.append(target.index)
    with torch.random.fork_rng(devices=devices), (torch.device(target) if target is not None else nullcontext()):
        torch.manual_seed(seed)
        hf = cls._from_config(config, dtype=dtype)
        _init_query_tokens(hf, config.initializer_range)
        _untie_t5_head(hf)
    return hf


def _untie_t5_head(hf: nn.Module) -> None:
    """Flan-T5's LM head is its own weight (`tie_word_embeddings: false` in the official configs), but
    transformers 5 ties every T5 built from a config; give a random Flan-T5 its own head, drawn as T5
    initialises an untied one, in the head's dtype on its device (no other copy).
    (Loaded checkpoints keep their own head: transformers unties it then.)"""
    lm = hf.language_model
    cfg = hf.config.text_config
    if cfg.model_type != "t5" or getattr(cfg, "scale_decoder_outputs", True):
        return  # not T5, or an original (tied) T5
    head = lm.get_output_embeddings()
    if head.weight is not lm.get_input_embeddings().weight:
        return
    if hasattr(head.weight, "ds_id"):
        raise ValueError("a random Flan-T5 cannot be untied under ZeRO-3; build it with ZeRO-2 or load a folder")
    with torch.no_grad():
        weight = torch.empty_like(head.weight).normal_(0.0, float(cfg.initializer_factor))
    head.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
    # transformers re-ties from these when the model is moved/reloaded; the head has left the set.
    tied = getattr(lm, "_tied_weights_keys", None)
    if isinstance(tied, dict):
        lm._tied_weights_keys = {k: v for k, v in tied.items() if not k.startswith("lm_head")}


def _weights_error(arch: str, model_type: str, entry: ZooEntry, path: Optional[str], why: str) -> WeightsNotFoundError:
    if entry.hf_name is None:  # tiny: only a folder written by this engine (tools/export_hf.py) can hold its weights
        return WeightsNotFoundError(
            f"{arch}/{model_type}: {why}. A tiny model loads from a folder written by tools/export_hf.py "
            f"(or tools/import_lavis.py); leave model.pretrained unset for seeded random weights.")
    target = path or f"/data/hf/{entry.hf_name.split('/')[-1]}"
    return WeightsNotFoundError(
        f"{arch}/{model_type}: {why}. This model type loads the official checkpoint {entry.hf_name} from a local "
        f"folder (no hub access is assumed). Get it on a machine with internet access:\n"
        f"    huggingface-cli download {entry.hf_name} --local-dir {target}\n"
        f"copy the folder here and set model.pretrained: {target}. "
        f"(For memory or speed planning without weights, set model.pretrained: random.)"
    )


def _check_checkpoint(arch: str, model_type: str, entry: ZooEntry, path: Optional[str], spec: ArchSpec) -> None:
    if path is None:
        raise _weights_error(arch, model_type, entry, None, "model.pretrained is not set")
    if not os.path.isdir(path):
        raise _weights_error(arch, model_type, entry, path, f"the folder {path} does not exist")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise _weights_error(arch, model_type, entry, path, f"{path} has no config.json (not a HF checkpoint folder)")
    with open(cfg_file) as f:
        cfg = json.load(f)
    want = InstructBlipConfig.model_type if spec.instruct else Blip2Config.model_type
    text_type = (cfg.get("text_config") or {}).get("model_type")
    if cfg.get("model_type") != want or text_type != spec.family:
        raise CheckpointMismatchError(
            f"{path} holds a '{cfg.get('model_type')}' model with a '{text_type}' language model, but {arch} "
            f"needs '{want}' with '{spec.family}' (expected a copy of {entry.hf_name or 'a tiny ' + arch}); "
            f"check model.arch and model.pretrained"
        )


def _ensure_image_token(hf: nn.Module, tokenizer) -> None:
    """Older BLIP-2 checkpoints predate the `<image>` placeholder; add it, as Blip2Processor does.

    Without it transformers finds no placeholder positions and silently ignores the image.
    """
    if hf.config.image_token_index is not None:
        return
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if index >= hf.get_input_embeddings().num_embeddings:
        hf.resize_token_embeddings(len(tokenizer))
    hf.config.image_token_index = index


def _load_pretrained(cls, path: str, spec: ArchSpec, dtype, quant, trust_remote_code: bool,
                     device: Optional[str] = None):
    # With a device, the weights go from the files straight to it in `dtype` (no whole copy on the host).
    hf = cls.from_pretrained(path, local_files_only=True, dtype=dtype, quantization_config=quant,
                             trust_remote_code=trust_remote_code, device_map={"": device} if device else None)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    qformer_tokenizer = None
    if spec.instruct:
        # InstructBlipProcessor keeps the Q-Former's BERT tokenizer in this subfolder.
        if not os.path.isdir(os.path.join(path, "qformer_tokenizer")):
            raise WeightsNotFoundError(f"{path} has no qformer_tokenizer/ folder, which InstructBLIP checkpoints "
                                       f"include; download the complete checkpoint folder again")
        qformer_tokenizer = AutoTokenizer.from_pretrained(path, subfolder="qformer_tokenizer", local_files_only=True)
    _ensure_image_token(hf, tokenizer)
    return hf, tokenizer, qformer_tokenizer


def resize_vision(hf: nn.Module, image_size: int) -> None:
    """Make the ViT take `image_size` px images: its position embeddings are interpolated once, in the
    weights (bicubic, as transformers' `interpolate_pos_encoding` does at run time), and the config
    says the new size, so an exported folder runs at that size in plain transformers."""
    emb = hf.vision_model.embeddings
    patch = int(emb.patch_size)
    if image_size % patch:
        raise ValueError(f"model.image_size={image_size} is not a multiple of the ViT's patch size {patch}; "
                         f"use e.g. {image_size // patch * patch} or {(image_size // patch + 1) * patch}")
    if hasattr(emb.position_embedding, "ds_id"):
        raise ValueError(f"model.image_size={image_size} differs from the checkpoint's ViT "
                         f"({vit_image_size(hf.config)} px): its position embeddings are resized while the model "
                         f"is built, which ZeRO-3 cannot do on partitioned weights. Resize once with a ZeRO-2 "
                         f"config (train a step, or export with tools/export_hf.py) and start from that folder")
    n = (image_size // patch) ** 2
    with torch.no_grad():
        pos = emb.position_embedding.detach()
        grid = int(round((pos.shape[1] - 1) ** 0.5))
        patches = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(image_size // patch, image_size // patch), mode="bicubic",
                                align_corners=False)
        new = torch.cat([pos[:, :1].float(), patches.permute(0, 2, 3, 1).reshape(1, n, -1)], dim=1)
    requires_grad = emb.position_embedding.requires_grad
    emb.position_embedding = nn.Parameter(new.to(pos.dtype), requires_grad=requires_grad)
    emb.image_size, emb.num_patches, emb.num_positions = image_size, n, n + 1
    hf.config.vision_config.image_size = image_size


def set_trainable(hf: nn.Module, freeze_vit: bool, freeze_qformer: bool, freeze_llm: bool,
                   lora_parts: Sequence[str]) -> None:
    frozen = {"vision": freeze_vit, "qformer": freeze_qformer, "llm": freeze_llm}
    # InstructBLIP keeps only the query positions of the Q-Former's last layer, so
    # that layer's text feed-forward never reaches the output: keep it out of the
    # optimizer (it would never get a gradient).
    last = f"qformer.encoder.layer.{hf.config.qformer_config.num_hidden_layers - 1}."
    dead = (last + "intermediate.", last + "output.") if hf.config.model_type == InstructBlipConfig.model_type else ()
    for name, p in hf.named_parameters():
        part = part_of(name)
        if dead and name.startswith(dead):
            train = False
        elif part == "lora":
            train = True
        elif part == "qformer" and not name.startswith("qformer."):
            # query tokens, projection and ln_vision get no adapters; they train unless frozen
            train = not freeze_qformer
        else:
            train = not frozen[part] and part not in lora_parts  # LoRA freezes its base weights
        if p.is_floating_point():
            p.requires_grad_(train)


def _enable_checkpointing(hf: nn.Module, *, vision: bool, qformer: bool, llm: bool) -> None:
    """Activation checkpointing: each chosen stack keeps only its layers' inputs and recomputes a layer in
    backward. A part whose weights are all frozen and below which nothing trains builds no graph at all, so
    there is nothing to recompute: the ViT is checkpointed only when it trains (LAVIS's use_grad_checkpoint);
    the Q-Former and the LLM only when asked (model.checkpoint_qformer / model.checkpoint_llm)."""
    def enable(module):
        kwargs = {"use_reentrant": False}  # re-entrant checkpointing breaks when a part's inputs need no grad
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x name
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def trains(prefix):
        return any(p.requires_grad for n, p in hf.named_parameters() if n.startswith(prefix))

    if llm:
        # Backward always runs through the LLM (down to the Q-Former's soft prompt), frozen or not.
        enable(hf.language_model)
    if qformer and trains("qformer."):
        # The Q-Former's input is the query tokens (a parameter), not token ids, so
        # transformers' warning that it cannot make its input embeddings require grad is moot.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            enable(hf.qformer)
        finally:
            hf_logging.set_verbosity(level)
    if vision and (trains("vision_model.encoder.") or trains("vision_model.embeddings.")):  # not ln_vision alone
        enable(hf.vision_model)


def compile_layers(model: nn.Module, **options) -> int:
    """torch.compile every repeated layer of `model` in place (`nn.Module.compile`: parameter names and
    checkpoints stay as they are): the ViT's, the Q-Former's and the LLM's blocks, the children of each
    ModuleList of one class. Layers of one shape share their compiled code. Returns how many were compiled."""
    n = 0
    for _, stack in model.named_modules():
        if isinstance(stack, nn.ModuleList) and len(stack) > 1 and len({type(m) for m in stack}) == 1:
            for layer in stack:
                layer.compile(**options)
                n += 1
    return n


def build_vlm(arch: str, *, model_type: str, pretrained: Optional[str] = None, freeze_vit: bool = True,
              freeze_qformer: bool = False, freeze_llm: bool = True, use_grad_checkpoint: bool = False,
              checkpoint_qformer: bool = False, checkpoint_llm: bool = False,
              max_txt_len: int = 32, max_output_txt_len: Optional[int] = None, image_size: Optional[int] = None,
              lora: Optional[Dict[str, Any]] = None, load_in_8bit: bool = False,
              load_in_4bit: bool = False, torch_dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
              seed: int = 0, device: Optional[str] = None) -> VisionLanguageModel:
    """Build `arch` / `model_type`. `pretrained`: a local HF checkpoint folder, or "random" for the
    real architecture with random weights; `tiny` without a folder builds seeded random weights.
    `device`: where the weights go, in `torch_dtype`: a checkpoint's straight from its files, a random real-size
    model's drawn there (None: the host, or the caller's `torch.device` context). Seeded tiny weights are always
    drawn in fp32 on the host, so a seed gives them the same on any machine; a random real-size model's depend
    on the dtype and the device type too."""
    spec = ARCHS[arch]
    if model_type not in spec.zoo:
        near = close_matches(model_type, spec.zoo)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise ValueError(f"unknown model_type '{model_type}' for {arch}.{hint} Known: {', '.join(spec.zoo)}")
    entry = spec.zoo[model_type]
    dtype = _dtype(torch_dtype)
    if spec.family == "t5" and dtype == torch.float16:
        raise ValueError(f"{arch}: Flan-T5 overflows in fp16; use torch_dtype bf16 (or fp32) / precision: bf16")
    quant = quantization_config(load_in_8bit, load_in_4bit)
    cls = InstructBlipForConditionalGeneration if spec.instruct else Blip2ForConditionalGeneration
    qformer_tokenizer = local_tokenizer("qformer") if spec.instruct else None

    # A tiny model_type with a folder loads it like an official one (e.g. the output of tools/export_hf.py).
    if pretrained == "random" or (model_type == "tiny" and pretrained is None):
        if quant is not None:
            raise ValueError("load_in_8bit/load_in_4bit need pretrained weights (model.pretrained: <folder>)")
        tokenizer = local_tokenizer(spec.family)
        if model_type == "tiny":
            config = tiny_config(spec.family, spec.instruct, tokenizer, qformer_tokenizer)
        else:
            config_cls = InstructBlipConfig if spec.instruct else Blip2Config
            config = config_cls(**copy.deepcopy(entry.config),
                                image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        if model_type == "tiny":
            # Seeded tiny weights are drawn in fp32 on the host whatever `dtype` and `device` are, so a seed gives
            # the same weights in every precision and on every machine (tests, goldens and resume rely on it).
            hf = random_model(cls, config, torch.float32, seed)
            cast_parameters(hf, dtype)
        else:
            # The real size is drawn directly in `dtype` on `device`: never a full fp32 copy, nor one on the host
            # when a GPU is given (a 7B model in fp32 is 28 GB per rank). Its weights depend on the seed, the
            # dtype and the device type (see `random_model`).
            hf = random_model(cls, config, dtype, seed, device=device)
    else:
        _check_checkpoint(arch, model_type, entry, pretrained, spec)
        hf, tokenizer, qformer_tokenizer = _load_pretrained(cls, pretrained, spec, dtype, quant, trust_remote_code,
                                                            device)
        if quant is not None and not freeze_llm:
            raise ValueError("a quantised LLM cannot be trained; keep freeze_llm: true and add model.lora")

    if image_size is not None and int(image_size) != vit_image_size(hf.config):
        resize_vision(hf, int(image_size))
    if spec.family == "t5":
        use_shared_bias_attention(hf.language_model)  # the same attention, its mask built once per stack
    use_lean_rms_norms(hf.language_model)  # T5 / LLaMA norms: the same output, one backward per norm
    lora_parts: List[str] = []
    if lora:
        parts = {"llm": hf.language_model, "qformer": hf.qformer, "vision": hf.vision_model}
        # On the device the weights are on, so a real-size model's adapters never pass through the host (the
        # seeded tiny ones are drawn on the host with the rest of the tiny weights).
        on_device = device is not None and model_type != "tiny"
        with torch.device(device) if on_device else nullcontext():
            lora_parts = apply_lora(parts, spec.family, lora, dtype=dtype if dtype != torch.float32 else None)
    set_trainable(hf, freeze_vit, freeze_qformer, freeze_llm, lora_parts)
    if use_grad_checkpoint or checkpoint_qformer or checkpoint_llm:
        _enable_checkpointing(hf, vision=use_grad_checkpoint, qformer=checkpoint_qformer, llm=checkpoint_llm)
    model = VisionLanguageModel(hf, tokenizer, family=spec.family, instruct=spec.instruct, max_txt_len=max_txt_len,
                                qformer_tokenizer=qformer_tokenizer, freeze_vit=freeze_vit,
                                max_output_txt_len=max_output_txt_len)
    return model.train()


def build_text_inputs(arch: str, *, model_type: str, pretrained: Optional[str] = None, max_txt_len: int = 32,
                      max_output_txt_len: Optional[int] = None, trust_remote_code: bool = False) -> TextInputs:
    """The text side of the model `build_vlm` would build (tokenisation, truncation, padding and label
    masking, as the training DataLoader's collate runs it), without building the model: the checkpoint
    folder's tokenizers and config, or for `tiny` / `random` the local tokenizer with the tiny or zoo config.
    For tools that need the training loader but not the network (bench/loader_speed.py)."""
    spec = ARCHS[arch]
    if model_type not in spec.zoo:
        raise ValueError(f"unknown model_type '{model_type}' for {arch}; known: {', '.join(spec.zoo)}")
    entry = spec.zoo[model_type]
    qformer_tokenizer = local_tokenizer("qformer") if spec.instruct else None
    config_cls = InstructBlipConfig if spec.instruct else Blip2Config
    if pretrained == "random" or (model_type == "tiny" and pretrained is None):
        tokenizer = local_tokenizer(spec.family)
        if model_type == "tiny":
            config = tiny_config(spec.family, spec.instruct, tokenizer, qformer_tokenizer)
        else:
            config = config_cls(**copy.deepcopy(entry.config),
                                image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    else:
        _check_checkpoint(arch, model_type, entry, pretrained, spec)
        config = config_cls.from_pretrained(pretrained, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(pretrained, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
        if spec.instruct:
            qformer_tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="qformer_tokenizer",
                                                              local_files_only=True)
        if config.image_token_index is None:  # as _ensure_image_token does for the model
            if IMAGE_TOKEN not in tokenizer.get_vocab():
                tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
            config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if qformer_tokenizer is not None:
        qformer_tokenizer.truncation_side = "left"  # as VisionLanguageModel sets it
    return text_inputs_for(config, tokenizer, qformer_tokenizer, instruct=spec.instruct, max_txt_len=max_txt_len,
                           max_output_txt_len=max_output_txt_len)


def _make_builder(arch: str):
    def builder(**kwargs) -> VisionLanguageModel:
        return build_vlm(arch, **kwargs)

    builder.__name__ = builder.__qualname__ = f"build_{arch}"
    builder.__doc__ = f"Build a {arch} model (see `build_vlm`)."
    # Expose build_vlm's keyword arguments, so callers can inspect what a builder takes.
    sig = inspect.signature(build_vlm)
    builder.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "arch"])
    return builder


build_blip2_opt = _make_builder("blip2_opt")
build_blip2_t5 = _make_builder("blip2_t5")
build_blip2_vicuna_instruct = _make_builder("blip2_vicuna_instruct")
build_blip2_t5_instruct = _make_builder("blip2_t5_instruct")
