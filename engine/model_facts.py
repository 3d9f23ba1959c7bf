"""What the memory planner (engine/memory.py) needs to know about a recipe's model: built on the meta device
(real architecture, no memory, no weights read), its parameters counted per part (vision tower, Q-Former
with query tokens and projection, LLM, LoRA) as frozen or trainable, with the widths, depths and matmul
sizes the activation and FLOP estimates use."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

from engine.build import build_model
from engine.config import Recipe
from engine.models.parts import part_of



@dataclass
class ModelFacts:
    """What the planner needs from a built (meta) model."""

    params: Dict[str, Dict[str, int]]  # parameter_summary(): part -> {total, trainable}, plus "all"
    largest_layer: int  # most parameters held directly by one module (DeepSpeed's "largest layer")
    largest_block: int  # most parameters of one transformer layer (what ZeRO-3 gathers for a forward)
    param_sizes: List[int]  # numel of every parameter (ZeRO-3 keeps the small ones resident)
    quantizable: int  # LLM matmul weights 8/4-bit loading would quantise (all Linear but lm_head)
    linear: Dict[str, int]  # matmul weights per role, for FLOPs
    trains: Dict[str, bool]  # part -> its own (non-LoRA) weights train
    lora_modules: Dict[str, int]  # part -> number of LoRA-adapted matmuls
    lora_dropout: float
    family: str
    instruct: bool
    decoder_only: bool
    num_query_tokens: int
    vision: Dict[str, int]  # hidden, ffn, layers, patch
    qformer: Dict[str, int]  # hidden, ffn, layers, cross_every
    llm: Dict[str, int]  # hidden, ffn, layers, encoder_layers (T5), vocab
    prompt_tokens: int


def _planning_recipe(recipe: Recipe) -> Recipe:
    """The recipe with random weights and no quantisation (both are accounted for in bytes, not built)."""
    model = dataclasses.replace(recipe.model, pretrained="random", load_finetuned=False, finetuned=None,
                                load_in_8bit=False, load_in_4bit=False)
    return dataclasses.replace(recipe, model=model)


def meta_model(recipe: Recipe):
    """Build the recipe's model on the meta device: real architecture, no memory, no weights read."""
    with torch.device("meta"):
        return build_model(_planning_recipe(recipe))


def _layer_count(cfg, *names) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return int(v)
    raise AttributeError(f"{type(cfg).__name__} has none of {names}")


def model_facts(model, prompt: str = "") -> ModelFacts:
    """Count a built VisionLanguageModel (meta or real) for the planner."""
    hf = model.hf
    params = model.parameter_summary()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    sizes = [p.numel() for p in model.parameters()]
    block = max((sum(p.numel() for p in layer.parameters()) for m in model.modules() if isinstance(m, nn.ModuleList)
                 for layer in m), default=0)
    trains = {"vision": False, "qformer": False, "llm": False}
    for name, p in hf.named_parameters():
        part = part_of(name)
        if part != "lora" and p.requires_grad:
            trains[part] = True
    linear = {k: 0 for k in ("vision", "qformer_attn", "qformer_ffn_query", "qformer_ffn_text", "qformer_cross_kv",
                             "projection", "llm", "llm_encoder", "llm_decoder", "llm_cross_kv", "lm_head")}
    lora_modules = {"vision": 0, "qformer": 0, "llm": 0}
    quantizable = 0
    for name, m in hf.named_modules():
        if name.endswith((".lora_A", ".lora_B")) or ".lora_A." in name or ".lora_B." in name:
            continue
        if name.endswith(".base_layer"):  # peft wraps the adapted Linear; count it once, by its wrapper
            continue
        weight = getattr(m, "weight", None)
        is_lora = hasattr(m, "lora_A")
        if is_lora:
            owner = "vision" if name.startswith("vision_model.") else (
                "qformer" if name.startswith("qformer.") else "llm")
            lora_modules[owner] += 1
            weight = m.get_base_layer().weight
        elif not isinstance(m, nn.Linear):
            continue
        n = weight.numel()
        if name.startswith("vision_model."):
            linear["vision"] += n
        elif name.startswith("qformer."):
            if "crossattention.attention.key" in name or "crossattention.attention.value" in name:
                linear["qformer_cross_kv"] += n
            elif "_query." in name:
                linear["qformer_ffn_query"] += n
            elif ".intermediate." in name or (".output.dense" in name and "attention" not in name):
                linear["qformer_ffn_text"] += n
            else:
                linear["qformer_attn"] += n
        elif name.startswith("language_projection"):
            linear["projection"] += n
        elif name.endswith("lm_head"):
            linear["lm_head"] += n
        else:
            if model.decoder_only:
                linear["llm"] += n
            elif ".encoder." in name:
                linear["llm_encoder"] += n
            elif "EncDecAttention.k" in name or "EncDecAttention.v" in name:
                linear["llm_cross_kv"] += n
            else:
                linear["llm_decoder"] += n
            quantizable += n
    dropout = 0.0
    for m in hf.modules():
        drop = getattr(m, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict):
            for d in drop.values():
                dropout = max(dropout, float(getattr(d, "p", 0.0)))
    cfg = hf.config
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    if model.family == "t5":
        llm = dict(hidden=t.d_model, ffn=t.d_ff, layers=_layer_count(t, "num_decoder_layers", "num_layers"),
                   encoder_layers=t.num_layers, vocab=t.vocab_size)
    else:
        llm = dict(hidden=t.hidden_size, ffn=_layer_count(t, "ffn_dim", "intermediate_size"),
                   layers=t.num_hidden_layers, encoder_layers=0, vocab=t.vocab_size)
    prompt_tokens = len(model.tokenizer(prompt.strip(), add_special_tokens=False)["input_ids"]) if prompt else 0
    return ModelFacts(
        params=params, largest_layer=largest, largest_block=block, param_sizes=sizes, quantizable=quantizable,
        linear=linear, trains=trains, lora_modules=lora_modules, lora_dropout=dropout, family=model.family,
        instruct=model.instruct, decoder_only=model.decoder_only, num_query_tokens=model.num_query_tokens,
        vision=dict(hidden=v.hidden_size, ffn=v.intermediate_size, layers=v.num_hidden_layers,
                    patch=v.patch_size),
        qformer=dict(hidden=q.hidden_size, ffn=q.intermediate_size, layers=q.num_hidden_layers,
                     cross_every=q.cross_attention_frequency),
        llm=llm, prompt_tokens=prompt_tokens)


_FACTS: Dict[str, ModelFacts] = {}


def recipe_facts(recipe: Recipe) -> ModelFacts:
    """ModelFacts of the recipe's model (cached per model section: a meta build takes ~0.2 s)."""
    key = repr(sorted(dataclasses.asdict(_planning_recipe(recipe).model).items()))
    if key not in _FACTS:
        _FACTS[key] = model_facts(meta_model(recipe), recipe.model.prompt)
    return _FACTS[key]
