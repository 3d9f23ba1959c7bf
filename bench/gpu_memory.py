"""GPU memory, speed and MFU of every real recipe at real size, next to the memory planner's prediction.

    python bench/gpu_memory.py                                   # every recipe in recipes/ but tiny_*
    python bench/gpu_memory.py --recipes recipes/sherlock_opt2.7b.yaml --steps 5
    python bench/gpu_memory.py --write                           # also rewrite docs/memory.md and the
                                                                 # "GPU memory" section of docs/benchmarks.md

Needs one CUDA GPU; without one it says so and exits with status 2. Each recipe
runs in its own process (a fresh CUDA context, and an out-of-memory error stays
in its row) with the GPU capped at --cap-gb (24 GiB by default) by
torch.cuda.set_per_process_memory_fraction, so an 80 GB card behaves like a
24 GB one. The model is the recipe's real architecture with random weights
(model.pretrained=random: no download), built and trained by the engine's own
code: engine.build.build_model, the recipe's filled DeepSpeed config,
deepspeed.initialize with the trainer's parameter groups and LR schedule, and
the trainer's step (engine(image, prompt, text_output), backward, step). The
batches are random images at the recipe's resolution with targets long enough
to fill max_txt_len, the planner's worst case. Data loading and checkpoint
saving are left out: this measures the GPU.

Reported per recipe: peak memory allocated by PyTorch (what the planner's
"allocated" predicts) and reserved, the device's memory in use (nvidia-smi's
view, with the CUDA context), samples/s over the timed steps after warm-up, and
MFU = model FLOPs per sample x samples/s / the GPU's peak dense bf16 FLOP/s.
Model FLOPs per sample (engine.memory.train_flops_per_sample) count 2 per matmul
weight per token for the forward, 2 more where gradients flow back through the
layer, 2 more where the weight itself trains (a frozen ViT under no gradient: 2;
a frozen LLM that the Q-Former's gradients pass through: 4; trained parts: 6);
tokens are image patches + [CLS] for the ViT, query (+ instruction) tokens for
the Q-Former, query + max_txt_len tokens for the LLM. Recomputation by gradient
checkpointing and the attention-score matmuls are not counted.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## GPU memory"
MEASURED = "## Measured on a GPU"
# Peak dense bf16 tensor FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("A6000", 155e12)]


def peak_flops(name: str):
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


def default_recipes():
    return [p for p in sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
            if not os.path.basename(p).startswith("tiny")]


# --------------------------------------------------------------------------- one recipe (a subprocess)


def failure_line(lines) -> str:
    """The line that says why a worker failed: the last exception line of its output, else its last line."""
    for line in reversed(lines):
        head = line.split(":", 1)[0].strip()
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def worker(args) -> dict:
    import torch

    out = {"recipe": os.path.relpath(args.worker, ROOT), "status": "ok"}
    cuda = args.device == "cuda"  # "cpu" only checks the code path (tests), it measures nothing useful
    if cuda and not torch.cuda.is_available():
        return dict(out, status="no CUDA GPU")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    import deepspeed

    from engine.build import build_model
    from engine.config import load_recipe
    from engine.deepspeed_config import fill_ds_config, normalize_cuda_arch_list, zero_stage
    from engine.trainer.optim import lr_scheduler_factory, param_groups

    recipe = load_recipe(args.worker, ["model.pretrained=random", *args.options], check_files=False)
    m, r = recipe.model, recipe.run
    if m.load_in_4bit or m.load_in_8bit:
        return dict(out, status="skipped: 8/4-bit weights need a real checkpoint (pretrained: random cannot)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        total_mem = torch.cuda.get_device_properties(device).total_memory
        cap = min(args.cap_gb * 2 ** 30, total_mem)
        torch.cuda.set_per_process_memory_fraction(cap / total_mem, device)
        out.update(device=torch.cuda.get_device_name(device), cap_gb=cap / 2 ** 30)
    out["batch"] = r.batch_size_train

    from engine.trainer.topology import init_distributed

    init_distributed()
    normalize_cuda_arch_list()  # engine/train.py does the same: DeepSpeed cannot parse e.g. 9.0a
    ds_config = fill_ds_config(recipe, world_size=1, on_cpu=not cuda)
    hf_ds = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # partition while building, as engine/train.py does
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[r.precision]
    t0 = time.perf_counter()
    # As engine/train.py builds it: in the run's dtype, on the GPU under ZeRO-1/2 (partitioned under ZeRO-3).
    model = build_model(recipe, dtype=dtype, device=str(device) if cuda and hf_ds is None else None)
    total = args.warmup + args.steps
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, r.weight_decay),
                                           config=ds_config, lr_scheduler=lr_scheduler_factory(recipe, total, total))
    out["build_s"] = time.perf_counter() - t0
    b = r.batch_size_train
    gen = torch.Generator(device=device).manual_seed(0)
    words = ("a red circle left of a small blue square near the top of the " * 40).split()
    targets = [" ".join(words[i:i + 4 * m.max_txt_len]) for i in range(b)]  # truncated to max_txt_len
    prompts = [m.prompt] * b
    times = []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    try:
        for step in range(total):
            image = torch.randn(b, 3, m.image_size, m.image_size, generator=gen, device=device, dtype=dtype)
            sync()
            start = time.perf_counter()
            loss = engine(image=image, prompt=prompts, text_output=targets)
            engine.backward(loss)
            engine.step()
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        out["loss"] = float(loss.detach())
    except torch.cuda.OutOfMemoryError:
        out["status"] = f"out of memory at {args.cap_gb:g} GiB"
    if cuda:
        free, dev_total = torch.cuda.mem_get_info(device)
        out.update(peak_alloc_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30,
                   peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 2 ** 30,
                   device_used_gb=(dev_total - free) / 2 ** 30)
    if times:
        step_s = sum(times) / len(times)
        out.update(step_s=step_s, samples_per_s=b / step_s)
    del hf_ds
    torch.distributed.destroy_process_group()
    return out


# --------------------------------------------------------------------------- docs


def replace_section(path: str, heading: str, body: str) -> None:
    """Replace (or append) the section `heading` of a markdown file; the other sections stay."""
    from bench.report import write_section

    write_section(path, heading, f"{heading}\n\n{body.strip()}\n")


def table(rows) -> str:
    head = ("| recipe | status | batch | peak allocated GiB | planner allocated GiB | planner error | "
            "device used GiB | planner GPU GiB | samples/s | MFU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def f(key, fmt):
            return fmt.format(r[key]) if r.get(key) is not None else "-"
        lines.append("| " + " | ".join([r["recipe"], r["status"], str(r.get("batch", "-")),
                                        f("peak_alloc_gb", "{:.2f}"), f("plan_alloc_gb", "{:.2f}"),
                                        f("plan_error", "{:+.0%}"), f("device_used_gb", "{:.2f}"),
                                        f("plan_gpu_gb", "{:.2f}"), f("samples_per_s", "{:.2f}"),
                                        f("mfu", "{:.1%}")]) + " |")
    return "\n".join(lines)


def report(rows, args) -> str:
    from bench.report import machine

    device = next((r["device"] for r in rows if r.get("device")), "unknown GPU")
    when = datetime.date.today().isoformat()
    return (f"Measured {when} on one GPU ({machine(device)}), memory capped at {args.cap_gb:g} GiB, "
            f"random-init real-size models, {args.warmup} warm-up + {args.steps} timed steps per recipe "
            f"(`python bench/gpu_memory.py{' --write' if args.write else ''}`). "
            f"Planner error = measured peak allocated / predicted allocated - 1. MFU: model FLOPs per sample "
            f"(bench/gpu_memory.py explains the count) x samples/s / the GPU's peak dense bf16 FLOP/s.\n\n"
            + table(rows))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", help="recipes to measure (default: every recipe but tiny_*)")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="applied to every recipe")
    p.add_argument("--cap-gb", type=float, default=24.0, help="GPU memory cap in GiB (default 24)")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per recipe (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per recipe (default 900)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s, if not in the table")
    p.add_argument("--write", action="store_true",
                   help="rewrite the measured section of docs/memory.md and 'GPU memory' in docs/benchmarks.md")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(args)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU here. bench/gpu_memory.py measures GPU memory and speed; run it on a machine "
              "with a GPU. The planner's predictions need no GPU: python tools/plan_memory.py --all --gpus 1 8",
              file=sys.stderr)
        return 2
    from engine.config import load_recipe
    from engine.memory import plan

    rows = []
    for path in args.recipes or default_recipes():
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--out", out,
                   "--cap-gb", str(args.cap_gb), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.options:
                cmd += ["--options", *args.options]
            try:
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
                if os.path.exists(out):
                    row = json.load(open(out))
                else:
                    lines = (proc.stderr + proc.stdout).strip().splitlines()
                    row = {"recipe": os.path.relpath(path, ROOT), "status": f"failed: {failure_line(lines)[:160]}",
                           "log_tail": lines[-40:]}
            except subprocess.TimeoutExpired:
                row = {"recipe": os.path.relpath(path, ROOT), "status": f"timed out after {args.timeout} s"}
        recipe = load_recipe(path, ["model.pretrained=random", *args.options], check_files=False)
        predicted = plan(recipe, gpus=1, gpu_mem_gb=args.cap_gb, suggest=False)
        row.update(plan_alloc_gb=predicted.gpu_alloc_gb, plan_gpu_gb=predicted.gpu_gb)
        if row.get("peak_alloc_gb"):
            row["plan_error"] = row["peak_alloc_gb"] / predicted.gpu_alloc_gb - 1
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(row.get("device", ""))
        if row.get("samples_per_s") and peak:
            flops = predicted.flops_per_sample
            row.update(flops_per_sample=flops, mfu=flops * row["samples_per_s"] / peak)
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = report(rows, args)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    if args.write:
        replace_section(os.path.join(ROOT, "docs", "memory.md"), MEASURED, text)
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), SECTION,
                        "Peak GPU memory, speed and MFU of each recipe on one GPU capped at 24 GiB, with the "
                        "memory planner's error: see docs/memory.md for the planner.\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
