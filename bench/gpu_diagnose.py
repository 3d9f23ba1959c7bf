"""One-run diagnosis of the training step on a GPU (run by `bench/gpu_throughput.py --diagnose`).

One process builds the recipe's model at real size with random weights directly on the GPU, in the run's
dtype, wraps it in DeepSpeed with the recipe's filled config, and then sweeps micro batch {8, 32, 64, auto}
x LLM activation checkpointing {off, on} x torch.compile of the repeated layers {off, on} (compile last: it
cannot be undone). For every row, over a few timed steps after warm-up:

- phases, timed with CUDA events: data wait (the next batch from a DataLoader over synthetic samples with the
  recipe's num_workers and the trainer's collate), input building (the copies to the device), ViT, Q-Former and
  LLM forward (hooks on the three modules), backward, optimizer step;
- host syncs per step (torch.cuda.set_sync_debug_mode: every synchronising call warns once) and kernels per
  step (torch.profiler, one step);
- samples/s, model TFLOP/s and MFU (engine/memory.py's FLOP count), peak allocated memory.

It also prints, once, the attention implementation, the dtype and the activation checkpointing of each part.
`--tiny` runs the same sweep on the tiny model on the CPU (timers instead of CUDA events, aten host reads
instead of sync warnings, non-view aten ops instead of kernels), which is how its logic is tested.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.dirname(os.path.abspath(__file__))):  # the engine, and bench/ (step_ops)
    if _path not in sys.path:
        sys.path.insert(0, _path)

PARTS = ("vision", "qformer", "llm")
PHASES = ("data_wait", "inputs", "vision", "qformer", "llm", "backward", "step")


class Clock:
    """Named intervals; CUDA events on a GPU (read once per step), perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.torch = cuda, torch
        self.marks: Dict[str, List[Any]] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.setdefault(name, []).append(event)
        else:
            self.marks.setdefault(name, []).append(time.perf_counter())

    def seconds(self, start: str, end: str) -> float:
        a, b = self.marks[start][-1], self.marks[end][-1]
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def reset(self) -> None:
        self.marks.clear()


def describe(model) -> Dict[str, Dict[str, Any]]:
    """Attention implementation, parameter dtype and activation checkpointing of each part."""
    hf = model.hf
    parts = {"vision": hf.vision_model, "qformer": hf.qformer, "llm": hf.language_model}
    out = {}
    for name, module in parts.items():
        params = list(module.parameters())
        out[name] = {
            "attention": getattr(getattr(module, "config", None), "_attn_implementation", None),
            "dtype": str(params[0].dtype) if params else None,
            "checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in module.modules()),
            "trainable": any(p.requires_grad for p in params),
        }
    return out


def _set_llm_checkpointing(model, on: bool) -> None:
    lm = model.hf.language_model
    enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.x names
    if on and enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable
        disable()


def _hooks(model, clock: Clock):
    hf = model.hf
    handles = []
    for name, module in (("vision", hf.vision_model), ("qformer", hf.qformer), ("llm", hf.language_model)):
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: clock.mark(f"{n}_start")))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: clock.mark(f"{n}_end")))
    return handles


def _samples(n: int, image_size: int, prompt: str):
    import torch

    words = ("a red circle left of a small blue square near the top of the picture " * 8).split()
    return [{"image": torch.randint(0, 255, (3, image_size, image_size), dtype=torch.uint8),
             "prompt": prompt, "text_output": " ".join(words[i % 7:i % 7 + 8 + i % 11])} for i in range(n)]


def run_row(engine, model, recipe, batch: int, steps: int, warmup: int, cuda: bool, peak: Optional[float],
            flops_per_sample: float, counter=None) -> Dict[str, Any]:
    """Warm-up then timed steps at micro batch ``batch``; one row of the sweep."""
    import torch
    from functools import partial

    from engine.data.collate import WithTextInputs

    device = engine.device
    data = _samples(batch * (warmup + steps + 1), model.image_size, recipe.model.prompt)
    loader = iter(torch.utils.data.DataLoader(
        data, batch_size=batch, num_workers=recipe.run.num_workers, pin_memory=cuda,
        collate_fn=WithTextInputs(partial(model.text.build_inputs, lean=True))))
    clock = Clock(cuda)
    handles = _hooks(model, clock)
    rows: List[Dict[str, float]] = []
    syncs: List[int] = []
    try:
        for step in range(warmup + steps):
            clock.reset()
            clock.mark("data_start")
            b = next(loader)
            clock.mark("data_end")
            image = (b["image"].to(device, non_blocking=True).float() / 255).to(engine.module.hf.dtype)
            inputs = {k: v.to(device, non_blocking=True) for k, v in b["inputs"].items()}
            clock.mark("inputs_end")
            with (warnings.catch_warnings(record=True) if cuda else contextlib.nullcontext()) as caught:
                if cuda:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode(1)
                loss = engine(image=image, inputs=inputs)
                clock.mark("backward_start")
                engine.backward(loss)
                clock.mark("step_start")
                engine.step()
                clock.mark("step_end")
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
            if cuda:
                torch.cuda.synchronize()
            if step < warmup:
                continue
            syncs.append(len([w for w in caught if "synchroniz" in str(w.message).lower()]) if cuda else 0)
            rows.append({
                "data_wait": clock.seconds("data_start", "data_end"),
                "inputs": clock.seconds("data_end", "inputs_end"),
                **{p: clock.seconds(f"{p}_start", f"{p}_end") for p in PARTS},
                "backward": clock.seconds("backward_start", "step_start"),
                "step": clock.seconds("step_start", "step_end"),
                "total": clock.seconds("data_start", "step_end"),
            })
    finally:
        for h in handles:
            h.remove()
    phase = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    samples_per_s = batch / phase["total"]
    out = {"batch": batch, "loss": float(loss.detach()), "phases_ms": {k: v * 1e3 for k, v in phase.items()},
           "samples_per_s": samples_per_s, "tflops": flops_per_sample * samples_per_s / 1e12,
           "syncs_per_step": statistics.median(syncs) if cuda else None}  # the CPU has no device to wait for
    if peak:
        out["mfu"] = out["tflops"] / peak
    out["kernels_per_step"] = count_kernels(engine, model, recipe, batch, cuda, counter)
    if cuda:
        out["peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    return out


def count_kernels(engine, model, recipe, batch: int, cuda: bool, counter=None) -> int:
    """GPU kernels of one step (torch.profiler); on the CPU, the step's non-view aten ops."""
    import torch

    b = WithTextInputsBatch(model, recipe, batch)
    image, inputs = b(engine.device, engine.module.hf.dtype)
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loss = engine(image=image, inputs=inputs)
            engine.backward(loss)
            engine.step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    dispatch, function, counts = counter()
    with dispatch, function:
        loss = engine(image=image, inputs=inputs)
        engine.backward(loss)
        engine.step()
    return counts["kernels"]


class WithTextInputsBatch:
    """One synthetic batch as the trainer's collate makes it, on the device."""

    def __init__(self, model, recipe, batch: int):
        from engine.data.collate import WithTextInputs
        from functools import partial

        self.batch = WithTextInputs(partial(model.text.build_inputs, lean=True))(
            _samples(batch, model.image_size, recipe.model.prompt))

    def __call__(self, device, dtype):
        image = (self.batch["image"].to(device).float() / 255).to(dtype)
        return image, {k: v.to(device) for k, v in self.batch["inputs"].items()}


def diagnose(recipe_path: str, options: List[str], *, tiny: bool, batches=(8, 32, 64, "auto"), steps: int = 5,
             warmup: int = 3, compile_modes=(False, True), ckpt_modes=(False, True), cap_gb: float = 24.0,
             peak: Optional[float] = None, log=print) -> Dict[str, Any]:
    """The sweep; returns {"describe": ..., "rows": [...]}. Runs in this process (it initialises torch.distributed
    for one rank when needed)."""
    import socket

    import torch

    cuda = torch.cuda.is_available() and not tiny
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from engine.build import DTYPES, build_model
    from engine.config import load_recipe
    from engine.deepspeed_config import fill_ds_config, normalize_cuda_arch_list
    from engine.memory import Workload, auto_micro_batch, recipe_facts, train_flops_per_sample
    from engine.models import compile_layers
    from engine.trainer.auto_batch import check_micro_batch
    from engine.trainer.optim import lr_scheduler_factory, param_groups
    from engine.trainer.topology import init_distributed

    base = ["model.model_type=tiny", "model.pretrained=null"] if tiny else ["model.pretrained=random"]
    recipe = load_recipe(recipe_path, base + list(options), check_files=False)
    r = recipe.run
    if cuda:
        torch.cuda.set_device(0)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap_gb * 2 ** 30, total) / total)
    if not torch.distributed.is_initialized():
        init_distributed()
    normalize_cuda_arch_list()
    ds_config = fill_ds_config(recipe, world_size=1, on_cpu=not cuda)
    t0 = time.perf_counter()
    # As engine/train.py under ZeRO-1/2: random real-size weights drawn on the device in the run's dtype.
    model = build_model(recipe, dtype=DTYPES[r.precision], device="cuda:0" if cuda else None)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, r.weight_decay),
                                           config=ds_config, lr_scheduler=lr_scheduler_factory(recipe, 10 ** 6, 10 ** 6))
    build_s = time.perf_counter() - t0
    facts = recipe_facts(recipe)
    # `auto` as engine/train.py resolves it: the planner's choice, then measured by one forward and backward.
    auto_recipe = _with_global(recipe, 64 if tiny else 256)
    auto_recipe.run.batch_size_train = auto_micro_batch(auto_recipe, 1, None if not cuda else cap_gb)
    auto_recipe.run.accum_grad_iters = auto_recipe.run.global_batch_size // auto_recipe.run.batch_size_train
    planned = auto_recipe.run.batch_size_train
    check_micro_batch(engine, auto_recipe, 1, cap_gb if cuda else None, 2, log)
    auto = auto_recipe.run.batch_size_train
    counter = None
    if not cuda:
        from step_ops import op_counter as counter
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "build_s": build_s,
            "describe": describe(model), "auto_batch": auto, "auto_batch_planned": planned, "rows": []}
    log(f"built in {build_s:.1f} s; parts: {info['describe']}; auto micro batch {auto} (planned {planned})")
    for compiled in compile_modes:
        if compiled:
            log(f"compiling {compile_layers(model)} repeated layers")
        for ckpt in ckpt_modes:
            _set_llm_checkpointing(model, ckpt)
            for b in batches:
                size = auto if b == "auto" else int(b)
                w = Workload(batch=size, image_size=model.image_size, max_txt_len=recipe.model.max_txt_len,
                             grad_checkpoint=recipe.model.use_grad_checkpoint, precision=r.precision)
                row = {"batch_asked": b, "checkpoint_llm": ckpt, "compile": compiled}
                try:
                    row.update(run_row(engine, model, recipe, size, steps, warmup, cuda, peak,
                                       train_flops_per_sample(facts, w), counter))
                except torch.cuda.OutOfMemoryError:
                    row.update(batch=size, status="out of memory")
                    torch.cuda.empty_cache()
                info["rows"].append(row)
                log(row)
    return info


def _with_global(recipe, n: int):
    import copy

    out = copy.deepcopy(recipe)
    out.run.global_batch_size = n
    return out


def table(info: Dict[str, Any]) -> str:
    head = ("| batch | LLM ckpt | compile | samples/s | MFU | peak GiB | syncs/step | kernels/step | data wait | "
            "inputs | ViT | Q-Former | LLM fwd | backward | step (ms) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in info["rows"]:
        if "phases_ms" not in r:
            lines.append(f"| {r['batch_asked']} ({r.get('batch')}) | {r['checkpoint_llm']} | {r['compile']} | "
                         f"{r.get('status')} |" + " |" * 11)
            continue
        p = r["phases_ms"]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_alloc_gb']:.1f}" if r.get("peak_alloc_gb") is not None else "-"
        lines.append(f"| {r['batch_asked']} ({r['batch']}) | {r['checkpoint_llm']} | {r['compile']} | "
                     f"{r['samples_per_s']:.1f} | {mfu} | {peak} | {r['syncs_per_step']} | {r['kernels_per_step']} | "
                     + " | ".join(f"{p[k]:.1f}" for k in PHASES) + " |")
    return "\n".join(lines)
