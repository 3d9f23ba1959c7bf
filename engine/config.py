"""The typed recipe: YAML -> dataclasses, ``--options`` overrides, validation.

A recipe has three sections, named as in LAVIS so old recipes keep working:
``model`` (what to build), ``datasets`` (one entry per registered dataset) and
``run`` (how to train). Priority is: zoo defaults < recipe < ``--options``.

Every problem found (unknown key, wrong type, value outside its choices,
contradiction between keys or with the DeepSpeed config) is collected first and
raised together as one :class:`ConfigError`, each naming the dotted key, the
value, what is allowed and the closest valid key. Nothing is built before the
recipe is known to be good.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

import yaml

from engine.deepspeed_config import check_ds_config
from engine.problems import ConfigError, Problem, fmt, project_path, suggest  # noqa: F401  (importable from here)
from engine.typed import build_dataclass, coerce, field_docs  # noqa: F401  (field_docs: importable from here)
from engine.registry import DATASETS, MODELS, PROCESSORS, TASKS



def doc(text: str, default: Any = dataclasses.MISSING, **kw) -> Any:
    """A dataclass field with a one-line doc (shown by --help and docs/recipes.md)."""
    if isinstance(default, (list, dict)):
        value = default
        kw["default_factory"] = lambda: type(value)(value)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata={"help": text}, **kw)


# --------------------------------------------------------------------------- schema


@dataclass
class LoraConfig:
    r: int = doc("LoRA rank.", 16)
    alpha: int = doc("LoRA scaling numerator (lora_alpha); the update is scaled by alpha / r.", 32)
    dropout: float = doc("Dropout on the LoRA input.", 0.05)
    target: Optional[List[str]] = doc(
        "Module names to adapt; null = the family default (OPT/LLaMA: q_proj, v_proj; T5: q, v).", None
    )
    on: List[Literal["llm", "qformer", "vision"]] = doc(
        "Which parts get adapters. The vision tower only when named here.", ["llm"]
    )


@dataclass
class ModelConfig:
    arch: str = doc("Registered model name, e.g. blip2_opt, blip2_t5, blip2_vicuna_instruct, blip2_t5_instruct.")
    model_type: str = doc("Zoo entry of the arch (e.g. pretrain_opt2.7b, caption_coco_opt2.7b, tiny).")
    pretrained: Optional[str] = doc(
        "Local folder with the Hugging Face checkpoint of model_type; 'random' builds the real "
        "architecture with random weights (memory/throughput studies), drawn in run.precision on each "
        "rank's device: the seed, precision and device type (CPU or CUDA) decide them. A tiny type builds "
        "seeded random weights (fp32 on the host, the same everywhere) unless this names a folder (e.g. "
        "one written by tools/export_hf.py).",
        None,
    )
    load_finetuned: bool = doc("Start from `finetuned` (a checkpoint of this engine) instead of `pretrained`.", False)
    finetuned: Optional[str] = doc("Folder of a finetuned checkpoint, used when load_finetuned is true.", None)
    freeze_vit: bool = doc("Keep the vision tower frozen (BLIP-2 default).", True)
    freeze_qformer: bool = doc("Freeze the Q-Former, query tokens and language projection.", False)
    freeze_llm: bool = doc("Keep the language model frozen (BLIP-2 default; LoRA adapters still train).", True)
    use_grad_checkpoint: bool = doc("As LAVIS: activation checkpointing of the ViT's layers when the ViT trains "
                                    "(freeze_vit: false); a frozen ViT keeps no activations and is never "
                                    "recomputed, so then this changes nothing.", False)
    checkpoint_qformer: bool = doc("Activation checkpointing of the Q-Former's layers when it trains: less memory, "
                                   "its forward runs twice. An explicit choice; tools/plan_memory.py suggests it "
                                   "only when the batch does not fit otherwise.", False)
    checkpoint_llm: bool = doc("Activation checkpointing of the LLM's layers (backward always runs through them, "
                               "frozen or not): saves the most memory, costs a second LLM forward (~25% more "
                               "FLOPs). An explicit choice; tools/plan_memory.py suggests it only when the batch "
                               "does not fit otherwise.", False)
    prompt: str = doc("Text put before the target; the same prompt is used for label masking and generation.", "")
    max_txt_len: int = doc("As LAVIS: BLIP-2 (OPT, Flan-T5): the most text tokens per sample (OPT: bos + prompt + "
                           "target + end; T5: prompt and target each). InstructBLIP: the most prompt tokens (its "
                           "start is cut), also for the Q-Former.", 32)
    max_output_txt_len: int = doc("InstructBLIP, as LAVIS: the most target tokens (end token included; Vicuna: LAVIS "
                                  "counts a bos it drops). BLIP-2 archs ignore it.", 256)
    image_size: Optional[int] = doc(
        "Input resolution of the ViT; null = the checkpoint's (caption_coco_* 364, others 224, tiny 64). Another "
        "size interpolates the position embeddings once, in the weights (exports keep the new size). The image "
        "processors default to it and must agree with it.", None)
    lora: Optional[LoraConfig] = doc("LoRA adapters via peft; null = full finetuning of the unfrozen parts.", None)
    adapter: Optional[str] = doc("A saved LoRA adapter folder (peft format) loaded on top of the model, e.g. for "
                                 "evaluation.", None)
    load_in_8bit: bool = doc("Load the language model in 8 bit (bitsandbytes, CUDA only).", False)
    load_in_4bit: bool = doc("Load the language model in 4 bit nf4 + double quant (QLoRA; CUDA only).", False)
    trust_remote_code: bool = doc("Allow code shipped with a checkpoint to run. Off unless you trust it.", False)


@dataclass
class RunConfig:
    task: str = doc("Registered task: captioning or sherlock_retrieval.", "captioning")
    deepspeed: str = doc("DeepSpeed config (ds_configs/*.json); relative paths resolve against the project root.",
                         "ds_configs/zero2.json")
    lr_sched: Literal["linear_warmup_cosine_lr", "linear_warmup_step_lr", "constant_lr",
                      "linear_warmup_cosine_lr_per_step"] = doc(
        "Learning-rate schedule. LAVIS's two (linear_warmup_cosine_lr, linear_warmup_step_lr) as LAVIS: linear "
        "warmup over the first warmup_steps iterations of the first epoch only, then one value per epoch (cosine "
        "over max_epoch, or init_lr * lr_decay_rate^epoch). linear_warmup_cosine_lr_per_step: warmup, then a "
        "cosine to min_lr over the run's optimizer steps (smooth; this engine's own).", "linear_warmup_cosine_lr"
    )
    init_lr: float = doc("Peak learning rate, reached at the end of warmup.", 1e-5)
    min_lr: float = doc("Final learning rate of the cosine schedule.", 0.0)
    warmup_lr: Optional[float] = doc("Learning rate at the first iteration; rises linearly to init_lr over "
                                     "warmup_steps. null = init_lr (LAVIS's default: no warmup).", None)
    warmup_steps: int = doc("Iterations of linear warmup (LAVIS's schedules: data iterations of the first epoch; "
                            "linear_warmup_cosine_lr_per_step: optimizer steps).", 0)
    lr_decay_rate: float = doc("Per-epoch multiplier of linear_warmup_step_lr.", 0.9)
    weight_decay: float = doc("AdamW weight decay, as LAVIS: on every trained parameter of 2+ dimensions "
                              "(query_tokens included) except biases and norms.", 0.05)
    adam_betas: List[float] = doc("AdamW betas.", [0.9, 0.999])
    grad_clip: float = doc("Clip the global gradient norm to this value; 0 = off (LAVIS does not clip).", 0.0)
    max_epoch: int = doc("Number of epochs.", 1)
    max_steps: Optional[int] = doc("Stop after this many optimizer steps (null or 0 = run all epochs).", None)
    batch_size_train: int = doc("Training batch size per GPU (DeepSpeed's train_micro_batch_size_per_gpu), or "
                                "'auto': the largest the memory planner fits on the device, checked on a GPU by "
                                "one forward and backward (engine/trainer/auto_batch.py), with accum_grad_iters "
                                "filling run.global_batch_size.", 8)
    global_batch_size: Optional[int] = doc("Samples per optimizer step over all ranks (micro batch x accumulation x "
                                           "ranks). Needed by batch_size_train: auto; with a number there it "
                                           "must agree.", None)
    batch_size_eval: int = doc("Evaluation batch size per GPU.", 8)
    accum_grad_iters: int = doc("Micro-batches per optimizer step (gradient accumulation).", 1)
    num_workers: int = doc("DataLoader worker processes per rank.", 2)
    compile: bool = doc("torch.compile each repeated layer (ViT, Q-Former and LLM blocks) before training; the "
                        "first steps compile. Off until measured on a GPU (docs/benchmarks.md).", False)
    precision: Literal["bf16", "fp16", "fp32"] = doc(
        "Training precision. fp16 needs a GPU and is refused for Flan-T5.", "bf16"
    )
    seed: int = doc("Random seed (model init, data order, augmentation); each rank adds its rank.", 42)
    output_dir: str = doc("Folder for config.yaml, logs, TensorBoard (tb/), checkpoints/ and predictions/.",
                          "runs/default")
    overwrite_output_dir: bool = doc("Allow writing into a non-empty output_dir that holds another run.", False)
    resume_ckpt_path: Optional[str] = doc("Checkpoint to resume from: a checkpoint folder, checkpoints/latest, "
                                          "checkpoints/best or a run folder (its newest complete checkpoint); or "
                                          "use --resume for the latest of run.output_dir.", None)
    allow_recipe_change: bool = doc("On resume, accept changed schedule/data keys (architecture keys never change).",
                                    False)
    evaluate: bool = doc("Only evaluate (no training).", False)
    train_splits: List[str] = doc("Dataset splits used for training.", ["train"])
    valid_splits: List[str] = doc("Splits evaluated every val_freq epochs; the first chooses the best checkpoint.",
                                  ["val"])
    test_splits: List[str] = doc("Splits evaluated once at the end with the best checkpoint.", [])
    val_freq: int = doc("Evaluate every this many epochs (0 = never during training).", 1)
    max_eval_samples: Optional[int] = doc("Evaluate on at most this many samples per split (null = all).", None)
    num_beams: int = doc("Beam size for generation.", 5)
    max_len: int = doc("Maximum generation length, counted as length_counting says.", 30)
    min_len: int = doc("Minimum generation length, counted as length_counting says.", 1)
    length_counting: Literal["lavis", "new_tokens"] = doc(
        "How max_len/min_len count. lavis: as LAVIS's generate() (OPT, Vicuna: a leading bos counts in both, so "
        "max_len 30 = 29 new tokens; Flan-T5: max_len counts new tokens, min_len also the decoder start). "
        "new_tokens: both count generated tokens only.", "lavis")
    repetition_penalty: float = doc("Generation repetition penalty (1.0 = none).", 1.0)
    length_penalty: float = doc("Beam-search length penalty (1.0 = none).", 1.0)
    best_metric: Optional[str] = doc(
        "Metric (or sum, e.g. CIDEr+Bleu_4) that selects checkpoints/best; null = the task's default "
        "(captioning: CIDEr+Bleu_4 as LAVIS, sherlock_retrieval: p_at_1).", None)
    spice: bool = doc("Also compute SPICE (needs Stanford CoreNLP jars; skipped with a message when absent).", False)
    retrieval_group_size: Optional[int] = doc(
        "sherlock_retrieval: rank within groups of this many samples when records carry no split_idx.", None)
    patience: Optional[int] = doc("Stop after this many evaluations without a better best_metric (null = never).",
                                  None)
    log_freq: int = doc("Every this many optimizer steps, write the steps since the last write (steps.jsonl and "
                        "TensorBoard: one entry per step) and a line to the log file.", 10)
    save_every_steps: int = doc("Also save a checkpoint every this many optimizer steps (0 = epoch ends only).", 0)
    keep_last: int = doc("Keep only this many step/epoch checkpoints (0 = keep all; best is never pruned).", 0)
    save_frozen: bool = doc("Also write the frozen weights into every checkpoint (a full model, readable without the "
                            "base); by default a checkpoint holds what trained and names its base (model.pretrained "
                            "or the seeded tiny/random weights) with a fingerprint.", False)
    max_bad_samples: int = doc("Skip up to this many bad records per dataset split (counted and logged) instead of "
                               "failing; a dataset's own max_bad_samples takes precedence. During training, also "
                               "how many images that turn unreadable a rank replaces (bad_samples.jsonl) before "
                               "the run stops.", 0)
    max_bad_steps: int = doc("Stop (after saving the last good state) when this many optimizer steps in a row had a "
                             "non-finite loss; each such step is skipped and logged to bad_steps.jsonl.", 5)
    dist_timeout_s: int = doc("Seconds one collective may wait for the other ranks before the run fails (bounds the "
                              "hang when a rank dies; rank 0's metric computation and the slowest save must fit).",
                              900)
    train_dataset_ratios: Optional[Dict[str, float]] = doc(
        "With several datasets: dataset name -> share of each training epoch (null = every sample once).", None)


@dataclass
class ProcessorSpec:
    """One processor: a registered name plus its keyword arguments."""

    name: str
    kwargs: Dict[str, Any]


@dataclass
class DatasetSpec:
    name: str
    options: Any  # the dataset's own schema dataclass instance
    vis_processor: Dict[str, ProcessorSpec]  # keys: train, eval
    text_processor: Dict[str, ProcessorSpec]


@dataclass
class Recipe:
    model: ModelConfig
    datasets: Dict[str, DatasetSpec]
    run: RunConfig
    source: str = ""  # the file it came from, for messages
    # run.batch_size_train: auto was asked for: the planner (engine/memory.py resolve_auto_batch) sets the micro
    # batch and accumulation once the device is known; the schema itself never builds or plans.
    auto_batch: bool = False

    def to_dict(self) -> dict:
        out = {"model": _plain(self.model), "datasets": {}, "run": _plain(self.run)}
        for name, ds in self.datasets.items():
            d = _plain(ds.options)
            for kind in ("vis_processor", "text_processor"):
                procs = getattr(ds, kind)
                if procs:
                    d[kind] = {split: {"name": p.name, **p.kwargs} for split, p in procs.items()}
            out["datasets"][name] = d
        return out


def _plain(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


# Keys LAVIS recipes carry that this engine no longer needs: accepted with a one-line warning.
LAUNCHER_KEYS = {
    "device": "the deepspeed launcher picks the device",
    "world_size": "the deepspeed launcher sets it (--num_gpus / --hostfile)",
    "dist_url": "the deepspeed launcher sets the rendezvous",
    "distributed": "the deepspeed launcher decides; one process is also fine",
    "amp": "use run.precision: bf16 | fp16 | fp32",
    "gpu": "the deepspeed launcher picks the device",
}
MODEL_SUPERSEDED = {
    "vit_precision": "the vision tower follows run.precision",
    "opt_model": "the language model comes with model.pretrained",
    "t5_model": "the language model comes with model.pretrained",
    "llm_model": "the language model comes with model.pretrained",
    "num_query_token": "fixed by the checkpoint's config",
    "drop_path_rate": "fixed by the checkpoint's config",
    "apply_lemmatizer": "not supported; predictions are used as generated",
}
DATASET_SUPERSEDED = {
    "data_type": "images are the only data type",
    "build_info": "give the dataset's root and file keys directly",
}


# --------------------------------------------------------------------------- loading


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (a recipe can never construct Python objects) with YAML 1.2 booleans.

    YAML 1.1 also reads on/off/yes/no as booleans, which turns `lora: {on: [llm]}` into a `True:`
    key; here only true/false (any case) are booleans.
    """


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe file not found: {path} (ls recipes/ lists the shipped recipes)")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=RecipeLoader)  # safe: no !!python tags
        except yaml.YAMLError as e:
            raise ConfigError([Problem("<yaml>", f"not valid YAML: {e}")], path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("<top>", "a recipe must be a mapping with model, datasets and run")], path)
    return data


def apply_options(data: Dict[str, Any], options: List[str], problems: List[Problem]) -> None:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars/lists.

    ``key=null`` (or ``key=~``) unsets a key: an optional key becomes null, any other key takes its default.
    """
    for opt in options or []:
        if "=" not in opt:
            problems.append(Problem(opt, "an option must look like section.key=value, e.g. run.init_lr=2e-5"))
            continue
        path, raw = opt.split("=", 1)
        try:
            value = yaml.load(raw, Loader=RecipeLoader) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = path.strip().split(".")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                problems.append(Problem(path, f"cannot set a key under {p}, which is {fmt(node[p])}"))
                break
            node = node[p]
        else:
            node[parts[-1]] = value


def _split_processor(spec: Any, key: str, problems: List[Problem]) -> Optional[ProcessorSpec]:
    if not isinstance(spec, dict) or "name" not in spec:
        problems.append(Problem(key, f"{fmt(spec)} should be a mapping with a `name` (a registered processor)"))
        return None
    name = spec["name"]
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if name not in PROCESSORS:
        problems.append(Problem(f"{key}.name", PROCESSORS.unknown_message(name)))
        return None
    entry = PROCESSORS.get(name)
    if "params" in entry.meta:  # declared: the processor's module (torch) is not imported to check a recipe
        params = {n: inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in entry.meta["params"]}
    else:
        sig = inspect.signature(entry.obj)
        params = {n: p for n, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    for k, v in list(kwargs.items()):
        if k not in params:
            problems.append(Problem(f"{key}.{k}", f"not an argument of processor '{name}'{suggest(k, params)} "
                                                   f"(valid: {', '.join(params)})"))
            continue
        ann = params[k].annotation
        if ann is not inspect.Parameter.empty and not isinstance(ann, str):
            kwargs[k] = coerce(v, ann, f"{key}.{k}", problems)
    return ProcessorSpec(name, kwargs)


def _dataset_spec(name: str, raw: Any, problems: List[Problem]) -> Optional[DatasetSpec]:
    key = f"datasets.{name}"
    if name not in DATASETS:
        problems.append(Problem(key, DATASETS.unknown_message(name)))
        return None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(Problem(key, f"{fmt(raw)} should be a mapping of the dataset's keys"))
        return None
    raw = dict(raw)
    procs: Dict[str, Dict[str, ProcessorSpec]] = {"vis_processor": {}, "text_processor": {}}
    for kind in procs:
        section = raw.pop(kind, None) or {}
        if not isinstance(section, dict):
            problems.append(Problem(f"{key}.{kind}", "should be a mapping with train and/or eval"))
            continue
        for split, spec in section.items():
            if split not in ("train", "eval"):
                problems.append(Problem(f"{key}.{kind}.{split}",
                                        f"unknown processor slot{suggest(split, ['train', 'eval'])} (use train, eval)"))
                continue
            p = _split_processor(spec, f"{key}.{kind}.{split}", problems)
            if p is not None:
                procs[kind][split] = p
    schema = DATASETS.get(name).meta.get("schema")
    options = build_dataclass(schema, raw, key, problems, ignored=DATASET_SUPERSEDED)
    return DatasetSpec(name, options, procs["vis_processor"], procs["text_processor"])


def parse_recipe(data: Dict[str, Any], source: str = "", options: Optional[List[str]] = None,
                 check_files: bool = True) -> Recipe:
    """Turn a recipe mapping into a validated :class:`Recipe` (or raise one ConfigError with every problem)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    problems: List[Problem] = []
    apply_options(data, options or [], problems)

    for key in data:
        if key not in ("model", "datasets", "run"):
            problems.append(Problem(key, f"unknown section{suggest(key, ['model', 'datasets', 'run'])} "
                                         f"(a recipe has model, datasets and run)"))
    raw_model = data.get("model") or {}
    raw_run = data.get("run") or {}
    raw_datasets = data.get("datasets") or {}
    for sec, val in (("model", raw_model), ("run", raw_run), ("datasets", raw_datasets)):
        if not isinstance(val, dict):
            problems.append(Problem(sec, f"{fmt(val)} should be a mapping"))
    if problems:
        raise ConfigError(problems, source)

    # Zoo defaults sit under the recipe: fill only the keys the recipe (after --options) left out.
    arch, model_type = raw_model.get("arch"), raw_model.get("model_type")
    zoo_family = None
    if arch is not None:
        if arch not in MODELS:
            problems.append(Problem("model.arch", MODELS.unknown_message(arch)))
        else:
            zoo_family = MODELS.get(arch)
            zoo = zoo_family.zoo
            if model_type is not None and model_type not in zoo:
                problems.append(Problem("model.model_type", f"{fmt(model_type)} is not a zoo entry of {arch}"
                                        f"{suggest(str(model_type), zoo)} (choose one of {', '.join(zoo)})"))
            elif model_type is not None:
                for k, v in zoo[model_type].defaults.items():
                    raw_model.setdefault(k, v)

    model = build_dataclass(ModelConfig, raw_model, "model", problems, ignored=MODEL_SUPERSEDED)
    auto_batch = raw_run.get("batch_size_train") == "auto"
    if auto_batch:  # resolved below, once the rest of the recipe is known
        raw_run = dict(raw_run, batch_size_train=1)
    run = build_dataclass(RunConfig, raw_run, "run", problems, ignored=LAUNCHER_KEYS)
    datasets = {}
    for name, raw in raw_datasets.items():
        spec = _dataset_spec(name, raw, problems)
        if spec is not None:
            datasets[name] = spec
    recipe = Recipe(model, datasets, run, source, auto_batch=auto_batch)
    if not problems:
        problems.extend(_check_global_batch(recipe, auto_batch))
    if not problems:
        problems.extend(check_recipe(recipe, zoo_family, check_files=check_files))
    if problems:
        raise ConfigError(problems, source)
    return recipe


def _check_global_batch(recipe: Recipe, auto: bool) -> List[Problem]:
    """batch_size_train: auto needs run.global_batch_size, a multiple of this run's ranks (WORLD_SIZE, as the
    launcher sets it; the planner picks the micro batch later: engine/memory.py resolve_auto_batch); a number
    must agree with run.global_batch_size when both are given."""
    r = recipe.run
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if r.global_batch_size is None:
        if auto:
            return [Problem("run.global_batch_size", "run.batch_size_train: auto needs the samples per optimizer "
                                                     "step over all ranks; set e.g. run.global_batch_size: 64")]
        return []
    if r.global_batch_size < 1 or r.global_batch_size % world:
        return [Problem("run.global_batch_size", f"{r.global_batch_size} is not a positive multiple of the "
                                                 f"{world} rank(s) of this run")]
    if not auto:
        made = r.batch_size_train * r.accum_grad_iters * world
        if made != r.global_batch_size:
            return [Problem("run.global_batch_size", f"{r.global_batch_size}, but run.batch_size_train "
                                                     f"{r.batch_size_train} x run.accum_grad_iters "
                                                     f"{r.accum_grad_iters} x {world} rank(s) = {made}; make them "
                                                     f"agree, or set run.batch_size_train: auto")]
        return []
    return []


def load_recipe(path: str, options: Optional[List[str]] = None, check_files: bool = True) -> Recipe:
    return parse_recipe(load_yaml(path), source=path, options=options, check_files=check_files)


# --------------------------------------------------------------------------- cross-key checks


def check_recipe(recipe: Recipe, family=None, check_files: bool = True) -> List[Problem]:
    m, r = recipe.model, recipe.run
    out: List[Problem] = []
    positive = ("batch_size_train", "batch_size_eval", "accum_grad_iters", "max_epoch", "num_beams", "max_len")
    for k in positive:
        if getattr(r, k) < 1:
            out.append(Problem(f"run.{k}", f"{getattr(r, k)} must be at least 1"))
    if r.min_len > r.max_len:
        out.append(Problem("run.min_len", f"{r.min_len} is larger than run.max_len={r.max_len}"))
    if r.init_lr <= 0:
        out.append(Problem("run.init_lr", f"{r.init_lr} must be positive"))
    if r.min_lr > r.init_lr:
        out.append(Problem("run.min_lr", f"{r.min_lr} is above run.init_lr={r.init_lr}; lower it"))
    if r.warmup_steps < 0 or r.num_workers < 0 or r.save_every_steps < 0 or r.keep_last < 0:
        out.append(Problem("run", "warmup_steps, num_workers, save_every_steps and keep_last cannot be negative"))
    if r.max_steps is not None and r.max_steps < 0:
        out.append(Problem("run.max_steps", f"{r.max_steps} cannot be negative; give a number of optimizer steps, "
                                            f"or null (or 0) to run every epoch"))
    elif r.max_steps == 0:
        r.max_steps = None  # 0 steps would train nothing: read as "no limit", like null
    if r.max_bad_steps < 1 or r.dist_timeout_s < 1:
        out.append(Problem("run", f"max_bad_steps ({r.max_bad_steps}) and dist_timeout_s ({r.dist_timeout_s}) "
                                  f"must be at least 1"))
    if not r.evaluate and len(r.train_splits) != 1:
        out.append(Problem("run.train_splits", f"{r.train_splits}: a run trains on exactly one split; to train on "
                                               f"several sources, list several datasets (and run.train_dataset_ratios)"))
    if len(r.adam_betas) != 2:
        out.append(Problem("run.adam_betas", f"{r.adam_betas} should hold two numbers, e.g. [0.9, 0.999]"))
    if r.task not in TASKS:
        out.append(Problem("run.task", TASKS.unknown_message(r.task)))
    elif r.best_metric is not None and "metric_keys" in TASKS.get(r.task).meta:
        task = TASKS.get(r.task)  # its declared metric names; the task itself is built by the trainer
        try:
            task.check_metric(r.best_metric, task.metric_keys(r))
        except (ValueError, KeyError) as e:
            out.append(Problem("run.best_metric", str(e)))
    if m.load_in_8bit and m.load_in_4bit:
        out.append(Problem("model.load_in_4bit", "load_in_8bit and load_in_4bit are both true; choose one"))
    if m.load_finetuned and not m.finetuned:
        out.append(Problem("model.finetuned", "load_finetuned is true but no finetuned folder is given"))
    if family is not None and family.meta.get("family") == "t5" and r.precision == "fp16":
        out.append(Problem("run.precision", "'fp16' overflows in Flan-T5; use bf16 (or fp32)"))
    if m.lora is None and m.freeze_vit and m.freeze_qformer and m.freeze_llm:
        out.append(Problem("model", "freeze_vit, freeze_qformer and freeze_llm are all true and there is no "
                                    "lora: nothing would train"))
    if not recipe.datasets:
        out.append(Problem("datasets", "no dataset given; add e.g. `sherlock: {root: /data/sherlock}`"))
    out.extend(_check_ratios(recipe))
    if family is not None:
        out.extend(_check_image_size(recipe))
    if r.evaluate and not r.valid_splits and not r.test_splits:
        out.append(Problem("run.evaluate", "evaluate is true but valid_splits and test_splits are empty"))
    out.extend(check_ds_config(recipe, check_files=check_files))
    return out


def _check_image_size(recipe: Recipe) -> List[Problem]:
    """Every image processor must give the ViT the size it takes: the checkpoint's, or model.image_size
    (which resizes the ViT's position embeddings to it). A silent mismatch would run with wrong positions."""
    m = recipe.model
    folder = m.finetuned if m.load_finetuned else m.pretrained
    vit = MODELS.get(m.arch).checkpoint_image_size(m.model_type, folder)  # registry metadata: nothing is built
    want = m.image_size if m.image_size is not None else vit
    if want is None:
        return []
    where = (f"model.image_size={m.image_size}" if m.image_size is not None
             else f"the ViT of {m.arch}/{m.model_type}{' in ' + folder if folder and folder != 'random' else ''}")
    out = []
    for name, ds in recipe.datasets.items():
        for slot, proc in ds.vis_processor.items():
            size = proc.kwargs.get("image_size")
            if size is not None and size != want:
                out.append(Problem(
                    f"datasets.{name}.vis_processor.{slot}.image_size",
                    f"{size} px, but {where} takes {want} px. Remove image_size (the processors follow the model), "
                    f"or set model.image_size: {size} to interpolate the ViT's position embeddings to {size} px "
                    f"once (the exported model then takes {size} px)"))
    return out


def _check_ratios(recipe: Recipe) -> List[Problem]:
    ratios = recipe.run.train_dataset_ratios
    if ratios is None:
        return []
    out: List[Problem] = []
    for name, value in ratios.items():
        key = f"run.train_dataset_ratios.{name}"
        if name not in recipe.datasets:
            out.append(Problem(key, f"not a dataset of this recipe{suggest(str(name), recipe.datasets)} "
                                    f"(datasets: {', '.join(recipe.datasets) or 'none'})"))
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            out.append(Problem(key, f"{fmt(value)} should be a positive number (a share of the epoch)"))
    missing = [n for n in recipe.datasets if n not in ratios]
    if missing:
        out.append(Problem("run.train_dataset_ratios", f"no ratio for {', '.join(missing)}; give every dataset of "
                                                       f"the recipe a ratio, or remove train_dataset_ratios"))
    return out


def save_resolved(recipe: Recipe, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
