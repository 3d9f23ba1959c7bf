"""Aten ops and host reads per optimizer step, through the real training loop, on the CPU.

    python bench/step_ops.py                      # every shipped recipe at its real depths, tiny widths
    python bench/step_ops.py --recipe recipes/sherlock_opt2.7b.yaml --json
    python bench/step_ops.py --recipe recipes/tiny_sherlock.yaml --tiny-depths   # the embedded default as is

A GPU step whose host has to dispatch thousands of small kernels, or wait for the device, is bound by the
host. Both show on a CPU: this script runs `engine/train.py` itself (in a child process per recipe) on the
synthetic Sherlock data, with the recipe's architecture, freezing, checkpointing, precision, DeepSpeed
config and LoRA, its real layer counts (ViT, Q-Former, LLM) and tiny widths, and counts per optimizer step:

- aten ops the training process dispatches (`TorchDispatchMode`), from the first batch of a step to the
  next (data wait, inputs to the device, forward, backward, optimizer step, logging), all of them and
  those that are no view (`view`, `detach`, `t`, `slice`, ... only make a tensor header; the others are
  the kernels a GPU runs);
- host reads: the ops that make the host wait for the device on a GPU. At the dispatch level
  `_local_scalar_dense` (`.item()`, `bool()`, `float()` of a tensor), `nonzero`, `is_nonzero`, `equal`,
  `masked_select`, `unique`; at the Python level (`TorchFunctionMode`) `Tensor.tolist`, `.numpy` and `.cpu`.
  On a CPU every tensor is a host tensor, so a read of a flag the engine built on the host counts too:
  the count is an upper bound of the GPU's syncs.

Steady state is the median over the steps after the first two (the first ones build buffers and log);
log_freq is set above the run's length, so "reads" are those of a step that logs nothing, and "logged"
adds what writing a step costs (run.log_freq: 1).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ["sherlock_opt2.7b.yaml", "sherlock_opt6.7b.yaml", "sherlock_flant5xl.yaml", "sherlock_flant5xxl.yaml",
           "sherlock_vicuna7b_lora.yaml", "sherlock_vicuna13b_lora.yaml", "coco_caption_opt2.7b.yaml"]
HOST_READ_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2",
                 "nonzero_static"}
HOST_READ_METHODS = {"tolist", "numpy", "cpu"}


def op_counter():
    """(dispatch mode, function mode, counts): enter both to count aten ops and host reads of this thread."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"ops": 0, "kernels": 0, "reads": 0, "read_names": collections.Counter(),
              "kernel_names": collections.Counter()}

    def read(name: str) -> None:
        # torch.optim keeps its step counters on the host (not capturable): reading them waits for nothing.
        if any("torch/optim/" in f.filename for f in traceback.extract_stack(limit=12)):
            counts["read_names"]["host_step_counter"] += 1
            return
        counts["reads"] += 1
        counts["read_names"][name] += 1

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["ops"] += 1
            name = func._schema.name.split("::")[-1]
            if not func.is_view:  # views and detach only make a new tensor header; the rest is work
                counts["kernels"] += 1
                counts["kernel_names"][name] += 1
            if name in HOST_READ_OPS:
                read(name)
            return func(*args, **(kwargs or {}))

    class Methods(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in HOST_READ_METHODS and args and isinstance(args[0], torch.Tensor):
                read(name)
            return func(*args, **(kwargs or {}))

    return Ops(), Methods(), counts


def real_depths(arch: str, model_type: str) -> Dict[str, int]:
    """Layer counts of the zoo entry arch/model_type (the official checkpoint's config)."""
    from engine.models.blip2 import ARCHS

    cfg = ARCHS[arch].zoo[model_type].config
    text = cfg["text_config"]
    out = {"vision": cfg["vision_config"]["num_hidden_layers"], "qformer": cfg["qformer_config"]["num_hidden_layers"]}
    if text["model_type"] == "t5":
        out.update(encoder=text["num_layers"], decoder=text["num_decoder_layers"])
    else:
        out.update(llm=text["num_hidden_layers"])
    return out


def _deepen(depths: Dict[str, int]) -> None:
    """Make `model_type: tiny` build with `depths` (tiny widths, real layer counts)."""
    import engine.models.blip2 as blip2

    tiny = blip2.tiny_config

    def deep(family, instruct, tokenizer, qformer_tokenizer=None):
        cfg = tiny(family, instruct, tokenizer, qformer_tokenizer)
        cfg.vision_config.num_hidden_layers = depths["vision"]
        cfg.qformer_config.num_hidden_layers = depths["qformer"]
        if "encoder" in depths:
            cfg.text_config.num_layers = depths["encoder"]
            cfg.text_config.num_decoder_layers = depths["decoder"]
        else:
            cfg.text_config.num_hidden_layers = depths["llm"]
        return cfg

    blip2.tiny_config = deep


def recipe_options(recipe_path: str, data: str, out: str, steps: int, batch: int) -> List[str]:
    """--options that run `recipe_path`'s model setup on the synthetic Sherlock data at tiny widths."""
    from engine.config import load_recipe

    r = load_recipe(recipe_path, [], check_files=False)
    m = r.model
    opts = [f"model.arch={m.arch}", "model.model_type=tiny", "model.pretrained=null",
            f"model.freeze_vit={m.freeze_vit}", f"model.freeze_qformer={m.freeze_qformer}",
            f"model.freeze_llm={m.freeze_llm}", f"model.use_grad_checkpoint={m.use_grad_checkpoint}",
            f"model.max_txt_len={min(m.max_txt_len, 32)}", f"model.prompt={json.dumps(m.prompt)}",
            f"run.deepspeed={r.run.deepspeed}", f"run.precision={r.run.precision}",
            f"run.grad_clip={r.run.grad_clip}", f"run.accum_grad_iters={r.run.accum_grad_iters}"]
    for key in ("checkpoint_qformer", "checkpoint_llm"):
        if hasattr(m, key):
            opts.append(f"model.{key}={getattr(m, key)}")
    if m.lora is not None:
        opts += [f"model.lora.r={m.lora.r}", f"model.lora.alpha={m.lora.alpha}",
                 f"model.lora.dropout={m.lora.dropout}"]
    n = batch * r.run.accum_grad_iters * (steps + 1)
    return opts + [f"run.output_dir={out}", f"datasets.sherlock.root={data}", f"datasets.sherlock.synthetic={n}",
                   "datasets.sherlock.synthetic_val=8", f"run.batch_size_train={batch}", "run.num_workers=1",
                   f"run.max_steps={steps}", "run.max_epoch=1", "run.val_freq=0", "run.warmup_steps=1",
                   "run.log_freq=100000", "run.save_every_steps=0"]


def child(args) -> int:
    """Run engine/train.py in this process with the counters on; print one JSON line."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    sys.path.insert(0, ROOT)
    from engine import train
    from engine.config import load_recipe
    from engine.trainer import loop

    r = load_recipe(args.recipe, [], check_files=False)
    if not args.tiny_depths:
        _deepen(real_depths(r.model.arch, r.model.model_type))
    dispatch, function, counts = op_counter()
    marks: List[Dict[str, Any]] = []
    step = loop.Trainer.train_step

    def counted(self, batch):
        if self.micro_in_epoch % self.run.accum_grad_iters == 0:  # the first micro-batch of an optimizer step
            marks.append({"ops": counts["ops"], "kernels": counts["kernels"], "reads": counts["reads"],
                          "names": dict(counts["read_names"]), "kernel_names": dict(counts["kernel_names"])})
        return step(self, batch)

    loop.Trainer.train_step = counted
    fit = loop.Trainer.fit

    def fit_counted(self):
        with dispatch, function:
            fit(self)

    loop.Trainer.fit = fit_counted
    with tempfile.TemporaryDirectory() as tmp:
        options = recipe_options(args.recipe, os.path.join(tmp, "data"), os.path.join(tmp, "run"), args.steps,
                                 args.batch)
        base = os.path.join(ROOT, "recipes", "tiny_sherlock.yaml")
        code = train.main(["--recipe", base, "--options", *options, *args.options])
    if code != 0 or len(marks) < 4:
        print(json.dumps({"recipe": args.recipe, "error": f"exit code {code}, {len(marks)} steps"}))
        return 1
    per_step = [{"ops": b["ops"] - a["ops"], "kernels": b["kernels"] - a["kernels"], "reads": b["reads"] - a["reads"],
                 "names": {k: v - a["names"].get(k, 0) for k, v in b["names"].items() if v - a["names"].get(k, 0)},
                 "kernel_names": {k: v - a["kernel_names"].get(k, 0) for k, v in b["kernel_names"].items()
                                  if v - a["kernel_names"].get(k, 0)}}
                for a, b in zip(marks, marks[1:])]
    steady = per_step[2:]
    row = {"recipe": os.path.basename(args.recipe), "depths": None if args.tiny_depths else real_depths(
        r.model.arch, r.model.model_type), "batch": args.batch,
        "ops_per_step": int(statistics.median(s["ops"] for s in steady)),
        "kernel_ops_per_step": int(statistics.median(s["kernels"] for s in steady)),
        "reads_per_step": int(statistics.median(s["reads"] for s in steady)),
        "reads_by_op": max(steady, key=lambda s: s["reads"])["names"],
        "kernels_by_op": dict(sorted(steady[-1]["kernel_names"].items(), key=lambda kv: -kv[1])),
        "steps": [{"ops": s["ops"], "kernels": s["kernels"], "reads": s["reads"]} for s in per_step]}
    print("STEP_OPS " + json.dumps(row))
    return 0


def measure(recipe: str, steps: int = 6, batch: int = 2, tiny_depths: bool = False, options=(),
            timeout: int = 900) -> Dict[str, Any]:
    """One recipe in a child process (the training loop owns its process: distributed init, signals)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--recipe", recipe, "--steps", str(steps),
           "--batch", str(batch)] + (["--tiny-depths"] if tiny_depths else [])
    if options:
        cmd += ["--options", *options]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("STEP_OPS "):
            return json.loads(line[len("STEP_OPS "):])
    raise RuntimeError(f"{recipe}: no result (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", action="append", help="recipe(s) to count (default: every shipped one)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6; the first 2 are "
                                                        "not counted)")
    p.add_argument("--batch", type=int, default=2, help="micro batch (default 2)")
    p.add_argument("--tiny-depths", action="store_true", help="keep the tiny model's 2 layers per part")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--by-op", type=int, default=0, metavar="N",
                   help="also list the N most frequent non-view ops of a steady-state step")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--options", nargs="*", default=[], help="more --options for engine/train.py")
    args = p.parse_args(argv)
    if args.child:
        args.recipe = args.recipe[0]
        return child(args)
    recipes = args.recipe or [os.path.join(ROOT, "recipes", n) for n in RECIPES]
    rows = [measure(r, args.steps, args.batch, args.tiny_depths, args.options) for r in recipes]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'recipe':<30} {'ops/step':>9} {'non-view':>9} {'reads/step':>11}  reads by op")
        for row in rows:
            print(f"{row['recipe']:<30} {row['ops_per_step']:>9,} {row['kernel_ops_per_step']:>9,} "
                  f"{row['reads_per_step']:>11}  {row['reads_by_op']}")
            for name, n in list(row["kernels_by_op"].items())[:args.by_op]:
                print(f"    {name:<40} {n:>7,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
