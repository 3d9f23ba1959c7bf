"""Memory planner: will a recipe fit on the GPUs, before any weights are read?

The recipe's model is built on the meta device (``pretrained: random``, no
memory, a fraction of a second), its parameters are counted per part (vision
tower, Q-Former with query tokens and projection, LLM, LoRA) as frozen or
trainable, and the memory of one training step is predicted per GPU and per
node's CPU for the recipe's ZeRO stage and offload settings:

* model states (``zero_model_states``): DeepSpeed's own "cold" estimator
  formulas (``estimate_zero2_model_states_mem_needs``,
  ``estimate_zero3_model_states_mem_needs``), extended with frozen weights.
  DeepSpeed's estimators assume every parameter trains and, on the meta
  device, their ``_all_live`` variants see 0 parameters (they de-duplicate by
  ``data_ptr``, which is 0 there), so parameters are counted here. 16-bit
  weights cost 2 B for every parameter (0.5 B / 1 B for an LLM loaded in
  4 / 8 bit); fp32 master weights, Adam moments and fp32 gradients 16 B per
  trainable parameter plus 2 B of 16-bit gradients under ZeRO-1/2;
  partitioned over the GPUs as the stage says, moved to CPU by the offloads.
* activations (``activation_bytes``): from batch size, image tokens, query
  tokens, text length, layer counts and widths, what trains (a frozen vision
  tower with nothing trainable below it keeps no activations; a frozen LLM
  that gradients flow through keeps less than a trained one) and whether
  gradient checkpointing is on. Per-layer costs are bytes per token per unit
  of hidden width, measured with ``bench/calibrate_activations.py``.
* allowances: DeepSpeed's gradient buckets (from the ds config), ZeRO-3's
  resident small parameters and prefetch buffer, the loss's fp32 logits,
  allocator fragmentation and the CUDA context.
* disk (``checkpoint_bytes``): one checkpoint, every rank's files together: the
  trained weights (16-bit, or fp32 in fp32 runs; ZeRO-3 keeps them only in the
  optimizer files), fp32 master weights and both Adam moments (12 B per trained
  parameter), the LoRA adapter folder (fp32) and, with ``run.save_frozen``, the
  frozen weights once.

Text lengths are the worst case a recipe allows: prompt + target fill
``max_txt_len`` (decoder-only LLMs), the T5 decoder sees ``max_txt_len``
tokens, the prompt's own token count goes to the T5 encoder and the
InstructBLIP Q-Former.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from engine.build import model_image_size
from engine.config import ConfigError, Problem, Recipe, parse_recipe
from engine.deepspeed_config import load_ds_config, offloads, zero_stage
from engine.model_facts import ModelFacts, meta_model, model_facts, recipe_facts  # noqa: F401  (importable from here)

GIB = 2 ** 30
PARTS = ("vision", "qformer", "llm", "lora")

# Bytes kept for backward per token, per layer, per unit of hidden width, with 16-bit
# activations (x2 in fp32). Measured on CPU (bf16, SDPA) by bench/calibrate_activations.py
# on real-width models: "train" = the layer's weights train, "through" = frozen weights that
# gradients flow through (a frozen LLM under a trained Q-Former saves what attention,
# norms and activation functions need, but not the inputs of its frozen matmuls).
# T5 counts one encoder plus one decoder layer per token of (encoder + decoder).
LAYER_BYTES = {
    "opt": {"train": 28.1, "through": 24.1},
    "llama": {"train": 45.5, "through": 32.2},
    "t5": {"train": 100.5, "through": 82.8},
    "vision": {"train": 33.5, "through": 28.7},  # "through": scaled from OPT's ratio (not measured)
}
# Each LoRA-adapted matmul keeps its own dropout output and mask (per token, per unit of
# width); without dropout the adapters share the layer's saved input.
LORA_BYTES_DROPOUT, LORA_BYTES_NO_DROPOUT = 4.0, 2.0
# Q-Former (BERT-style, eager attention that upcasts to fp32): bytes per query token per layer
# per unit of width, and per image token per cross-attention layer per unit of width.
QFORMER_SELF_BYTES, QFORMER_CROSS_BYTES = 52.0, 14.5
# The loss keeps fp32 logits; at its peak bf16 logits, the fp32 copy and log-softmax coexist.
LOGIT_BYTES = 10.0
CUDA_CONTEXT_GB = 0.75  # CUDA context + cuBLAS/NCCL workspaces: outside PyTorch's allocator
FRAGMENTATION = 0.08  # reserved beyond allocated by the caching allocator
PROCESS_CPU_GB = 2.0  # Python, torch, CUDA host side, data loader per rank

# 4-bit nf4 with double quantisation: 4 bits + an 8-bit absmax per 64 weights + an fp32
# scale per 256 absmax blocks; 8-bit: 1 byte + an fp32 scale per row (negligible).
QUANT_BYTES = {4: 0.5 + 1 / 64 + 4 / (64 * 256), 8: 1.0}


# --------------------------------------------------------------------------- ZeRO model states


def zero_model_states(*, total: int, trainable: int, stage: int, gpus_per_node: int = 1, nodes: int = 1,
                      offload_optimizer: bool = False, offload_param: bool = False, largest_layer: int = 0,
                      weight_bytes: Optional[float] = None, precision: str = "bf16", zero_init: bool = True,
                      additional_buffer_factor: float = 1.5, build_bytes: float = 4) -> Tuple[int, int]:
    """(cpu_bytes, gpu_bytes) of weights, gradients and optimizer states; DeepSpeed's cold formulas
    generalised to frozen parameters.

    `total` parameters, of which `trainable` go to the optimizer; `weight_bytes` is the memory of
    all weights in the run's precision (default 2 B/param in bf16/fp16, 4 in fp32). CPU memory is
    per node, GPU memory per GPU. `build_bytes` per parameter is what each rank holds while it builds
    the model before DeepSpeed partitions it (4: fp32, DeepSpeed's assumption; the engine builds in the run's
    precision, straight onto the GPU under ZeRO-1/2: `plan` passes one tensor's worth). With every parameter trainable in 16-bit and the default
    `build_bytes` this equals `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`.
    """
    total_gpus = gpus_per_node * nodes
    wbytes = (2 if precision != "fp32" else 4) * total if weight_bytes is None else weight_bytes
    # Per trainable parameter: fp32 master (none in fp32), fp32 gradient, Adam moments.
    opt = 16 if precision != "fp32" else 12
    grad16 = 2 if precision != "fp32" else 0  # 16-bit gradients ZeRO-1/2 keep on the GPU
    buf = additional_buffer_factor
    if stage <= 2:
        if offload_optimizer:
            gpu = wbytes
            cpu = max(build_bytes * total_gpus * total, opt * trainable) * buf
        else:
            # Stage 2 partitions gradients and optimizer states, stage 1 only the optimizer states.
            if stage == 2:
                gpu = wbytes + int((grad16 + opt) * trainable / total_gpus)
            elif stage == 1:
                gpu = wbytes + int(grad16 * trainable + opt * trainable / total_gpus)
            else:
                gpu = wbytes + (grad16 + opt) * trainable
            cpu = total * build_bytes * gpus_per_node * buf  # every rank materialises the model once
        return int(cpu), int(gpu)
    largest = 4 * largest_layer  # the biggest module, gathered for its forward/backward
    per_node = 1 / nodes
    if offload_optimizer and offload_param:
        gpu = largest
        states = (wbytes + opt * trainable) * per_node
    elif offload_optimizer:
        gpu = largest + int(wbytes / total_gpus)
        states = opt * trainable * per_node
    elif offload_param:
        gpu = largest + int(opt * trainable / total_gpus)
        states = wbytes * per_node
    else:
        gpu = largest + int((wbytes + opt * trainable) / total_gpus)
        states = None
    if states is None:
        cpu = (largest_layer if zero_init else total) * build_bytes * gpus_per_node * buf
    elif zero_init:
        cpu = states * buf
    else:
        cpu = max(build_bytes * gpus_per_node * total, states) * buf
    return int(cpu), int(gpu)


# --------------------------------------------------------------------------- activations


@dataclass
class Workload:
    """The per-GPU shape of one training micro-step."""

    batch: int
    image_size: int
    max_txt_len: int
    grad_checkpoint: bool  # the ViT's layers, when it trains (model.use_grad_checkpoint, as LAVIS)
    precision: str = "bf16"
    checkpoint_qformer: bool = False  # model.checkpoint_qformer
    checkpoint_llm: bool = False  # model.checkpoint_llm


def _tokens(f: ModelFacts, w: Workload) -> Dict[str, int]:
    n_img = (w.image_size // f.vision["patch"]) ** 2 + 1  # patches + [CLS]
    prompt = min(f.prompt_tokens, w.max_txt_len)
    out = {"image": n_img, "query": f.num_query_tokens + (prompt + 2 if f.instruct else 0)}
    if f.decoder_only:
        out.update(llm=f.num_query_tokens + w.max_txt_len, encoder=0, decoder=0)
    else:
        out.update(llm=0, encoder=f.num_query_tokens + prompt + 1, decoder=w.max_txt_len)
    return out


def _modes(f: ModelFacts) -> Dict[str, str]:
    """How each part runs in backward: train | lora | through (frozen, gradients pass) | none (no graph)."""
    vision = "train" if f.trains["vision"] else ("lora" if f.lora_modules["vision"] else "none")
    below = vision != "none"
    qformer = "train" if f.trains["qformer"] else ("lora" if f.lora_modules["qformer"] else
                                                    ("through" if below else "none"))
    below = below or qformer != "none"
    llm = "train" if f.trains["llm"] else ("lora" if f.lora_modules["llm"] else ("through" if below else "none"))
    return {"vision": vision, "qformer": qformer, "llm": llm}


def activation_bytes(f: ModelFacts, w: Workload) -> Dict[str, int]:
    """Predicted activation memory of one micro-batch (forward peak into backward), per part."""
    scale = 2 if w.precision == "fp32" else 1  # calibrated with 16-bit activations
    act = 4 if w.precision == "fp32" else 2
    b = w.batch
    tok = _tokens(f, w)
    modes = _modes(f)
    lora_b = LORA_BYTES_DROPOUT if f.lora_dropout > 0 else LORA_BYTES_NO_DROPOUT
    out: Dict[str, int] = {}

    def stack(kind: str, mode: str, layers: int, hidden: int, tokens: int, lora_per_layer: float,
              checkpointed: bool) -> int:
        if mode == "none":
            return 0
        per_layer = LAYER_BYTES[kind]["train" if mode == "train" else "through"] * hidden * tokens * b * scale
        if mode == "lora":
            per_layer += lora_b * lora_per_layer * hidden * tokens * b * scale
        if checkpointed:
            # Only each layer's input is kept; backward recomputes one layer at a time
            # (its activations plus their gradients).
            return int(layers * act * hidden * tokens * b + 2 * per_layer)
        return int(layers * per_layer + per_layer)  # + one layer's gradients in flight

    # Vision tower. Without anything trainable in it, autograd records nothing: only one
    # layer's forward working set is alive at a time.
    v = f.vision
    if modes["vision"] == "none":
        out["vision"] = int(act * b * tok["image"] * (4 * v["hidden"] + 2 * v["ffn"]))
    else:
        # As LAVIS, use_grad_checkpoint checkpoints the ViT only where it trains (LoRA adapters included).
        out["vision"] = stack("vision", modes["vision"], v["layers"], v["hidden"], tok["image"],
                              f.lora_modules["vision"] / max(v["layers"], 1), w.grad_checkpoint)
    # Q-Former: query (+ instruction) tokens through every layer, image tokens as cross-attention keys.
    q = f.qformer
    if modes["qformer"] == "none":
        out["qformer"] = int(act * b * tok["query"] * (4 * q["hidden"] + 2 * q["ffn"]))
    else:
        cross_layers = math.ceil(q["layers"] / q["cross_every"])
        if w.checkpoint_qformer and modes["qformer"] == "train":
            per_layer = (QFORMER_SELF_BYTES * tok["query"] + QFORMER_CROSS_BYTES * tok["image"]) * q["hidden"] * b
            out["qformer"] = int((q["layers"] * act * tok["query"] * q["hidden"] * b
                                  + act * tok["image"] * v["hidden"] * b + 2 * per_layer) * scale)
        else:
            out["qformer"] = int((QFORMER_SELF_BYTES * q["layers"] * tok["query"]
                                  + QFORMER_CROSS_BYTES * cross_layers * tok["image"]) * q["hidden"] * b * scale)
    # LLM, and the loss on its logits.
    L = f.llm
    lora_per_layer = f.lora_modules["llm"] / max(L["layers"] + L["encoder_layers"], 1)
    if f.decoder_only:
        llm_tokens, logit_tokens = tok["llm"], tok["llm"]  # logits are computed at every position
    else:
        llm_tokens, logit_tokens = tok["encoder"] + tok["decoder"], tok["decoder"]
    out["llm"] = stack(f.family, modes["llm"], L["layers"], L["hidden"], llm_tokens, lora_per_layer,
                       w.checkpoint_llm)
    if modes["llm"] == "none":
        out["llm"] = int(act * b * llm_tokens * (4 * L["hidden"] + 2 * L["ffn"]))
    out["loss"] = int(LOGIT_BYTES * b * logit_tokens * L["vocab"])
    return out


# --------------------------------------------------------------------------- FLOPs


def train_flops_per_sample(f: ModelFacts, w: Workload) -> float:
    """Model FLOPs of one training sample: 2 per matmul weight per token forward, 2 more for the
    input gradient where gradients flow through, 2 more for the weight gradient where the weight
    trains. Recomputation (checkpointing) and attention-score matmuls are not counted."""
    tok = _tokens(f, w)
    modes = _modes(f)
    k = {"none": 2, "through": 4, "lora": 4, "train": 6}
    prompt = tok["query"] - f.num_query_tokens
    flops = k[modes["vision"]] * f.linear["vision"] * tok["image"]
    kq = k[modes["qformer"]]
    flops += kq * (f.linear["qformer_attn"] * tok["query"] + f.linear["qformer_ffn_query"] * f.num_query_tokens
                   + f.linear["qformer_ffn_text"] * prompt + f.linear["qformer_cross_kv"] * tok["image"])
    flops += kq * f.linear["projection"] * f.num_query_tokens
    kl = k[modes["llm"]]
    if f.decoder_only:
        flops += kl * (f.linear["llm"] + f.linear["lm_head"]) * tok["llm"]
    else:
        flops += kl * (f.linear["llm_encoder"] + f.linear["llm_cross_kv"]) * tok["encoder"]
        flops += kl * (f.linear["llm_decoder"] + f.linear["lm_head"]) * tok["decoder"]
    lora = f.params["lora"]["trainable"]
    if lora:
        per_token = {"vision": tok["image"], "qformer": tok["query"], "llm": tok["llm"] or tok["decoder"]}
        n = sum(f.lora_modules.values()) or 1
        flops += 6 * sum(lora * f.lora_modules[p] / n * per_token[p] for p in f.lora_modules)
    return float(flops)


# --------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    recipe: str
    gpus: int
    nodes: int
    gpu_mem_gb: float
    stage: int
    offload_optimizer: bool
    offload_param: bool
    precision: str
    quant_bits: int
    workload: Workload
    params: Dict[str, Dict[str, int]]
    breakdown_gb: Dict[str, float]  # per GPU
    gpu_alloc_gb: float  # what torch.cuda.max_memory_allocated should report
    gpu_gb: float  # + fragmentation + CUDA context: what the card must hold
    cpu_gb: float  # per node
    flops_per_sample: float
    checkpoint_gb: Dict[str, float] = field(default_factory=dict)  # one checkpoint on disk (checkpoint_bytes)
    suggestions: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.gpu_gb <= self.gpu_mem_gb

    def to_json(self) -> Dict[str, Any]:
        return {
            "recipe": self.recipe, "gpus": self.gpus, "nodes": self.nodes, "gpu_mem_gb": self.gpu_mem_gb,
            "zero_stage": self.stage, "offload_optimizer": self.offload_optimizer,
            "offload_param": self.offload_param, "precision": self.precision, "quant_bits": self.quant_bits,
            "batch_size": self.workload.batch, "image_size": self.workload.image_size,
            "max_txt_len": self.workload.max_txt_len, "grad_checkpoint": self.workload.grad_checkpoint,
            "checkpoint_qformer": self.workload.checkpoint_qformer, "checkpoint_llm": self.workload.checkpoint_llm,
            "params": {k: dict(self.params[k]) for k in (*PARTS, "all")},
            "breakdown_gb": {k: round(v, 3) for k, v in self.breakdown_gb.items()},
            "gpu_alloc_gb": round(self.gpu_alloc_gb, 2), "gpu_gb": round(self.gpu_gb, 2),
            "cpu_gb": round(self.cpu_gb, 2), "fits": self.fits,
            "flops_per_sample": self.flops_per_sample,
            "checkpoint_gb": {k: round(v, 3) for k, v in self.checkpoint_gb.items()},
            "suggestions": self.suggestions,
        }


def checkpoint_bytes(f: ModelFacts, *, stage: int, precision: str, quant_bits: int = 0, lora: bool = False,
                     save_frozen: bool = False, frozen_twice: bool = False) -> Dict[str, int]:
    """Bytes of one checkpoint on disk, all ranks' files together, by what they hold.

    ``frozen_twice``: the layout before checkpoints left the frozen weights out, for comparison: DeepSpeed
    wrote them in the module's state dict (ZeRO-1/2: whole; ZeRO-3: empty placeholders) and again as
    ``frozen_param_fragments``."""
    wb = 4 if precision == "fp32" else 2
    total, trainable = f.params["all"]["total"], f.params["all"]["trainable"]
    frozen = total - trainable
    frozen_bytes = wb * frozen
    if quant_bits:
        frozen_bytes -= (wb - QUANT_BYTES[quant_bits]) * f.quantizable
    out = {"trained_weights": wb * trainable if stage <= 2 else 0,
           "optimizer": 12 * trainable,
           "adapter": 4 * trainable if lora else 0,
           "frozen_weights": 0}
    if frozen_twice:
        out["frozen_weights"] = frozen_bytes * (2 if stage <= 2 else 1)
    elif save_frozen:
        out["frozen_weights"] = frozen_bytes
    out["total"] = sum(out.values())
    return out


def _ds_settings(recipe: Recipe) -> Dict[str, Any]:
    ds = load_ds_config(recipe.run.deepspeed)
    z = ds.get("zero_optimization") or {}
    off = offloads(ds)
    return dict(stage=zero_stage(ds), offload_optimizer=off["optimizer"], offload_param=off["param"],
                overlap_comm=bool(z.get("overlap_comm", False)),
                reduce_bucket=float(z.get("reduce_bucket_size", 5e8)),
                prefetch_bucket=float(z.get("stage3_prefetch_bucket_size", 5e7)),
                max_live=float(z.get("stage3_max_live_parameters", 1e9)),
                persistence=float(z.get("stage3_param_persistence_threshold", 1e5)))


def plan(recipe: Recipe, gpus: int = 1, gpu_mem_gb: float = 24.0, nodes: int = 1, suggest: bool = True,
         facts: Optional[ModelFacts] = None) -> MemoryPlan:
    """Predict per-GPU and per-node CPU memory of training `recipe` on `gpus` GPUs per node."""
    if gpus < 1 or nodes < 1:
        raise ValueError(f"gpus={gpus}, nodes={nodes}: both must be at least 1")
    f = facts or recipe_facts(recipe)
    m, r = recipe.model, recipe.run
    ds = _ds_settings(recipe)
    total, trainable = f.params["all"]["total"], f.params["all"]["trainable"]
    wb = 4 if r.precision == "fp32" else 2
    bits = 4 if m.load_in_4bit else (8 if m.load_in_8bit else 0)
    weight_bytes = wb * total
    if bits:
        weight_bytes -= (wb - QUANT_BYTES[bits]) * f.quantizable
    cpu_states, gpu_states = zero_model_states(
        total=total, trainable=trainable, stage=ds["stage"], gpus_per_node=gpus, nodes=nodes,
        offload_optimizer=ds["offload_optimizer"], offload_param=ds["offload_param"],
        largest_layer=f.largest_layer, weight_bytes=weight_bytes, precision=r.precision,
        # Under ZeRO-1/2 engine/train.py builds (loads, or draws random weights) straight onto each rank's GPU in
        # the run's precision: the host holds one tensor at a time. ZeRO-3 partitions while building.
        build_bytes=(wb * f.largest_layer if ds["stage"] <= 2 else weight_bytes) / total)
    work = Workload(batch=r.batch_size_train, image_size=model_image_size(recipe), max_txt_len=m.max_txt_len,
                    grad_checkpoint=m.use_grad_checkpoint, precision=r.precision,
                    checkpoint_qformer=m.checkpoint_qformer, checkpoint_llm=m.checkpoint_llm)
    acts = activation_bytes(f, work)
    if ds["stage"] <= 2:
        buckets = ds["reduce_bucket"] * (2 if ds["overlap_comm"] else 1) * wb if trainable else 0
        resident = 0
    else:
        # The layer running now and the one being prefetched are gathered in full.
        gathered = min(ds["max_live"], 2 * f.largest_block)
        buckets = (ds["reduce_bucket"] + ds["prefetch_bucket"] + gathered) * wb
        resident = wb * sum(n for n in f.param_sizes if n <= ds["persistence"])
    breakdown = {"model_states": gpu_states, "resident_small_params": resident, "ds_buffers": buckets,
                 **{f"act_{k}": v for k, v in acts.items()}}
    if bits:
        # A quantised matmul dequantises its weight into a 16-bit copy for each call.
        breakdown["dequant_buffer"] = 2 * wb * f.largest_layer
    alloc = sum(breakdown.values())
    gpu = alloc * (1 + FRAGMENTATION) + CUDA_CONTEXT_GB * GIB
    cpu = cpu_states + PROCESS_CPU_GB * GIB * gpus
    result = MemoryPlan(
        recipe=recipe.source, gpus=gpus, nodes=nodes, gpu_mem_gb=float(gpu_mem_gb), stage=ds["stage"],
        offload_optimizer=ds["offload_optimizer"], offload_param=ds["offload_param"], precision=r.precision,
        quant_bits=bits, workload=work, params=f.params,
        breakdown_gb={k: v / GIB for k, v in breakdown.items()}, gpu_alloc_gb=alloc / GIB, gpu_gb=gpu / GIB,
        cpu_gb=cpu / GIB, flops_per_sample=train_flops_per_sample(f, work))
    disk = dict(stage=ds["stage"], precision=r.precision, quant_bits=bits, lora=m.lora is not None)
    result.checkpoint_gb = {
        "this": checkpoint_bytes(f, **disk, save_frozen=r.save_frozen)["total"] / GIB,
        "trained_only": checkpoint_bytes(f, **disk)["total"] / GIB,
        "with_frozen": checkpoint_bytes(f, **disk, save_frozen=True)["total"] / GIB,
        "frozen_written_twice": checkpoint_bytes(f, **disk, frozen_twice=True)["total"] / GIB}
    if suggest and not result.fits:
        result.suggestions = suggestions(recipe, gpus, gpu_mem_gb, nodes)
    return result


# --------------------------------------------------------------------------- what would make it fit


def _with(recipe: Recipe, options: List[str]) -> Optional[Recipe]:
    """The recipe with --options applied, or None when that combination is not a valid recipe."""
    try:
        return parse_recipe(copy.deepcopy(recipe.to_dict()), source=recipe.source, options=options,
                            check_files=False)
    except ConfigError:
        return None


def _candidates(recipe: Recipe) -> List[Tuple[str, List[str]]]:
    m, r = recipe.model, recipe.run
    ds = _ds_settings(recipe)
    quant = m.load_in_4bit or m.load_in_8bit
    out: List[Tuple[str, List[str]]] = []
    # Recomputation costs time; offered only here, i.e. when the batch does not fit as the recipe stands.
    if not m.use_grad_checkpoint and not m.freeze_vit:
        out.append(("ViT activation checkpointing", ["model.use_grad_checkpoint=true"]))
    if not m.checkpoint_llm:
        out.append(("LLM activation checkpointing (a second LLM forward, ~25% more FLOPs)",
                    ["model.checkpoint_llm=true"]))
    if not m.checkpoint_qformer and not m.freeze_qformer:
        out.append(("Q-Former activation checkpointing", ["model.checkpoint_qformer=true"]))
    if ds["stage"] <= 2 and not ds["offload_optimizer"]:
        out.append(("ZeRO-2 with optimizer offload", ["run.deepspeed=ds_configs/zero2_offload.json"]))
    if ds["stage"] < 3 and not quant:
        out.append(("ZeRO-3", ["run.deepspeed=ds_configs/zero3.json"]))
    if not (ds["stage"] == 3 and ds["offload_param"]) and not quant:
        out.append(("ZeRO-3 with optimizer and parameter offload", ["run.deepspeed=ds_configs/zero3_offload.json"]))
    if not m.freeze_llm and m.lora is None:
        out.append(("LoRA on a frozen LLM", ["model.freeze_llm=true", "model.lora.r=16"]))
    if not m.freeze_vit:
        out.append(("a frozen vision tower", ["model.freeze_vit=true"]))
    if not quant and ds["stage"] < 3 and (m.freeze_llm or m.lora is not None):
        out.append(("4-bit LLM (QLoRA, CUDA + bitsandbytes)", ["model.load_in_4bit=true"]))
    b = r.batch_size_train
    while b > 1:
        b //= 2
        accum = r.accum_grad_iters * (r.batch_size_train // b)
        out.append((f"batch {b} x {accum} accumulation steps (same effective batch)",
                    [f"run.batch_size_train={b}", f"run.accum_grad_iters={accum}"]))
    return out


def suggestions(recipe: Recipe, gpus: int, gpu_mem_gb: float, nodes: int = 1) -> List[Dict[str, Any]]:
    """Single changes that make the recipe fit (predicted GB each); if none does, the shortest
    cumulative sequence of them that does."""
    out = []
    candidates = _candidates(recipe)
    for what, options in candidates:
        changed = _with(recipe, options)
        if changed is None:
            continue
        p = plan(changed, gpus, gpu_mem_gb, nodes, suggest=False)
        if p.fits:
            out.append({"change": what, "options": options, "gpu_gb": round(p.gpu_gb, 2),
                        "cpu_gb": round(p.cpu_gb, 2), "fits": True})
    if out:
        return out
    options: List[str] = []
    whats: List[str] = []
    for what, more in candidates:
        changed = _with(recipe, options + more)
        if changed is None:
            continue
        options, whats = options + more, whats + [what]
        p = plan(changed, gpus, gpu_mem_gb, nodes, suggest=False)
        if p.fits:
            return [{"change": " + ".join(whats), "options": options, "gpu_gb": round(p.gpu_gb, 2),
                     "cpu_gb": round(p.cpu_gb, 2), "fits": True}]
    if nodes * gpus < 64:
        return [{"change": f"no single setting fits {gpu_mem_gb:g} GB per GPU; more GPUs with ZeRO-3, "
                           f"or larger GPUs", "options": [], "fits": False}]
    return []


# --------------------------------------------------------------------------- text


def _checkpointed(w: Workload) -> str:
    parts = (("ViT", w.grad_checkpoint), ("Q-Former", w.checkpoint_qformer), ("LLM", w.checkpoint_llm))
    return ", ".join(name for name, on in parts if on) or "none"


def format_plan(p: MemoryPlan) -> str:
    def num(n: int) -> str:
        return f"{n / 1e6:,.1f}M" if n < 1e9 else f"{n / 1e9:,.3f}B"

    lines = [f"recipe {p.recipe}: {p.gpus} GPU(s) x {p.nodes} node(s), ZeRO-{p.stage}"
             + (", optimizer offload" if p.offload_optimizer else "")
             + (", parameter offload" if p.offload_param else "")
             + f", {p.precision}" + (f", {p.quant_bits}-bit LLM" if p.quant_bits else "")
             + f", batch {p.workload.batch}/GPU, image {p.workload.image_size}px, max_txt_len "
               f"{p.workload.max_txt_len}, activation checkpointing: {_checkpointed(p.workload)}",
             "", f"  {'part':<8} {'total':>12} {'trainable':>12}"]
    for part in (*PARTS, "all"):
        n = p.params[part]
        lines.append(f"  {part:<8} {num(n['total']):>12} {num(n['trainable']):>12}")
    lines.append("")
    lines.append("  per GPU (GiB):")
    for k, v in p.breakdown_gb.items():
        lines.append(f"    {k:<24} {v:8.2f}")
    lines.append(f"    {'allocated (peak)':<24} {p.gpu_alloc_gb:8.2f}")
    lines.append(f"    {'+ fragmentation, CUDA':<24} {p.gpu_gb - p.gpu_alloc_gb:8.2f}")
    lines.append(f"  GPU peak {p.gpu_gb:.1f} GiB of {p.gpu_mem_gb:g}: "
                 + ("fits" if p.fits else "does NOT fit"))
    lines.append(f"  CPU peak {p.cpu_gb:.1f} GiB per node (model load, offloaded states, {p.gpus} process(es))")
    if p.checkpoint_gb:
        c = p.checkpoint_gb
        other = "with the frozen weights (run.save_frozen=true)" if c["this"] == c["trained_only"] else \
            "without the frozen weights (run.save_frozen=false)"
        alt = c["with_frozen"] if c["this"] == c["trained_only"] else c["trained_only"]
        lines.append(f"  disk {c['this']:.2f} GiB per checkpoint ({alt:.2f} {other}; "
                     f"{c['frozen_written_twice']:.2f} when frozen weights were written twice)")
    if p.suggestions:
        lines.append("  to make it fit:")
        for s in p.suggestions:
            opts = " ".join(s["options"])
            gb = f" -> {s['gpu_gb']:.1f} GiB" if "gpu_gb" in s else ""
            lines.append(f"    - {s['change']}{gb}" + (f"   (--options {opts})" if opts else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- batch_size_train: auto

AUTO_CPU_MICRO_BATCH = 16  # without a GPU there is no memory to fill: CPU runs are tests and demos


def device_memory_gb() -> Optional[float]:
    """Total memory of this rank's GPU (LOCAL_RANK) in GiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.cuda.get_device_properties(index).total_memory / GIB


def resolve_auto_batch(recipe: Recipe, world: int, gpu_mem_gb: Optional[float]) -> None:
    """``run.batch_size_train: auto``: set the micro batch (auto_micro_batch) and the accumulation that fills
    run.global_batch_size on ``world`` ranks, in place. A recipe with a number there is left as it is. An
    impossible fit is a ConfigError naming run.batch_size_train."""
    if not recipe.auto_batch:
        return
    r = recipe.run
    try:
        micro = auto_micro_batch(recipe, world, gpu_mem_gb)
    except ValueError as e:
        raise ConfigError([Problem("run.batch_size_train", str(e))], recipe.source) from None
    r.batch_size_train, r.accum_grad_iters = micro, r.global_batch_size // world // micro
    recipe.auto_batch = False  # resolved: from here on the numbers are the recipe's


def auto_micro_batch(recipe: Recipe, gpus: int, gpu_mem_gb: Optional[float]) -> int:
    """The micro batch for ``run.batch_size_train: auto``: the largest divisor of the per-rank share of
    run.global_batch_size that the planner predicts to fit ``gpu_mem_gb`` (accumulation makes up the rest).
    Without a GPU (``gpu_mem_gb`` None) the largest divisor up to AUTO_CPU_MICRO_BATCH."""
    per_rank = recipe.run.global_batch_size // gpus
    divisors = [b for b in range(per_rank, 0, -1) if per_rank % b == 0]
    if gpu_mem_gb is None:
        return next(b for b in divisors if b <= AUTO_CPU_MICRO_BATCH)
    facts = recipe_facts(recipe)
    smallest = None
    for b in divisors:
        trial = copy.deepcopy(recipe)
        trial.run.batch_size_train, trial.run.accum_grad_iters = b, per_rank // b
        p = plan(trial, gpus, gpu_mem_gb, suggest=False, facts=facts)
        if p.fits:
            return b
        smallest = p
    raise ValueError(f"auto: not even a micro batch of 1 fits {gpu_mem_gb:.1f} GiB (predicted {smallest.gpu_gb:.1f} "
                     f"GiB); see python tools/plan_memory.py --recipe {recipe.source} --gpu-mem {gpu_mem_gb:.0f} for "
                     f"changes that fit")
