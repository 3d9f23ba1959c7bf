"""Training throughput and MFU at real size, on a CUDA GPU: engine vs bare DeepSpeed vs transformers' Trainer.

    python bench/gpu_throughput.py                               # BLIP-2 OPT-2.7b, batch 8, bf16, ZeRO-2
    python bench/gpu_throughput.py --batch 16 --write docs/benchmarks.md
    python bench/gpu_throughput.py --peak-tflops 989             # a GPU this script does not know
    python bench/gpu_throughput.py --diagnose --json diag.json --write docs/benchmarks.md   # one-run diagnosis
    python bench/gpu_throughput.py --diagnose --tiny             # the diagnosis's logic on the CPU, tiny model

--diagnose (bench/gpu_diagnose.py) builds the recipe's model on the GPU once and sweeps micro batch {8, 32, 64,
auto} x LLM checkpointing {off, on} x compile {off, on}: per-phase CUDA-event times, syncs and kernels per step,
samples/s, MFU and peak memory per row (about 5-8 minutes on one H100/H200 for OPT-2.7b).

The comparison of bench/train_throughput.py (same three loops, same protocol: one process per loop,
interleaved rounds, medians) on the real architecture: recipes/sherlock_opt2.7b.yaml with
``model.pretrained: random`` (EVA ViT-g + Q-Former + OPT-2.7b at their real sizes, random weights, so no
checkpoint is needed), ViT and OPT frozen, the Q-Former trained, the recipe's ZeRO-2 config and bf16.

MFU = model FLOPs per step / step time / the GPU's peak dense bf16 FLOP/s. The FLOPs are counted from the
model config by bench/flops.py (every matmul, 2 FLOPs per multiply-add; the backward pass counted per
matmul: input gradients where something upstream trains, weight gradients where the weight trains; see
its docstring), for the batch's real sequence length; the count is printed with the result.

Without CUDA it exits with status 2 and says so. Each loop builds its own 3.9B-parameter model directly on the
GPU in bf16 (as engine/train.py does: no copy on the host).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the engine
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench/ (when imported)
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## GPU throughput"

# Dense bf16 peak (no sparsity) in TFLOP/s, from the vendors' data sheets; matched against the device name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> Optional[float]:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def bench_spec(batch: int, grad_checkpoint: bool, deepspeed: str):
    from train_throughput import Bench

    return Bench(
        "opt2.7b",
        "BLIP-2 OPT-2.7b (3.9B parameters, random init: ViT-g and OPT-2.7b frozen, Q-Former trained), 224 px"
        + (", activation checkpointing" if grad_checkpoint else ""),
        ["model.model_type=pretrain_opt2.7b", "model.pretrained=random", "model.freeze_vit=true",
         "model.freeze_llm=true", f"model.use_grad_checkpoint={str(grad_checkpoint).lower()}"],
        batch=batch, image_size=224, deepspeed=deepspeed,
        recipe=os.path.join(ROOT, "recipes", "sherlock_opt2.7b.yaml"),
    )


INTRO = (
    "bench/train_throughput.py's comparison at real size on one GPU: recipes/sherlock_opt2.7b.yaml with "
    "`model.pretrained: random` (EVA ViT-g, Q-Former and OPT-2.7b at their real sizes, random weights), ViT and "
    "OPT frozen, Q-Former trained, bf16, ZeRO-2; the engine's loop, a bare DeepSpeed loop and transformers' "
    "Trainer, one process each, interleaved round by round.\n"
    "MFU = model FLOPs per step (counted from the config by `bench/flops.py`: every matmul at 2 FLOPs per "
    "multiply-add; backward per matmul, input gradients where something upstream trains and weight gradients "
    "where the weight trains; attention products as full T x T; recomputation not counted) / step time / the "
    "GPU's dense bf16 peak. Ratios as in the CPU table above."
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="micro batch per GPU (default 8, the recipe's)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=20, help="steps per loop per round (default 20)")
    p.add_argument("--warmup", type=int, default=10, help="steps per loop before measuring (default 10)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing (as the recipe)")
    p.add_argument("--deepspeed", default="ds_configs/zero2.json", help="DeepSpeed config (default zero2.json)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak in TFLOP/s (default: looked up from the device name)")
    p.add_argument("--write", metavar="DOC", help="rewrite the 'GPU throughput' section of this markdown file")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--workdir", default=None, help="scratch folder for the loops' logs (default: a temporary one)")
    p.add_argument("--diagnose", action="store_true", help="the one-run diagnosis sweep (bench/gpu_diagnose.py)")
    p.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "sherlock_opt2.7b.yaml"),
                   help="--diagnose: the recipe (default recipes/sherlock_opt2.7b.yaml)")
    p.add_argument("--tiny", action="store_true", help="--diagnose on the CPU with the tiny model (tests the logic)")
    p.add_argument("--cap-gb", type=float, default=24.0, help="--diagnose: GPU memory cap in GiB (default 24)")
    args = p.parse_args(argv)

    import torch

    if args.diagnose:
        return run_diagnosis(args, argv)

    if not torch.cuda.is_available():
        print("bench/gpu_throughput.py needs a CUDA GPU and torch.cuda.is_available() is False here; nothing was "
              "measured. On a CPU machine, bench/train_throughput.py runs the same comparison on smaller models.",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_tflops(name)
    if peak is None:
        print(f"the dense bf16 peak of '{name}' is not in PEAK_BF16_TFLOPS; give it with --peak-tflops "
              f"(MFU is left out until then)", file=sys.stderr)

    from report import load_average, write_section
    from train_throughput import command_line, compare, machine_line, print_result, table

    load_before = load_average()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_gpu_")
    bench = bench_spec(args.batch, args.grad_checkpoint, args.deepspeed)
    res = compare(bench, args.rounds, args.steps, args.warmup, workdir, timeout=3600)
    print(f"FLOPs per step (bench/flops.py): {res['flops_per_step'] / 1e12:.3f} TFLOP "
          f"(batch {res['batch']}, LLM sequence {res['seq_len']} tokens); peak {peak or 'unknown'} TFLOP/s")
    print_result(res, peak)
    desc, device = machine_line(load_before)
    if peak:
        desc += f"; MFU against {peak:g} TFLOP/s dense bf16"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": desc, "device": device, "peak_tflops": peak, "results": [res]}, f, indent=1)
    if args.write:
        write_section(args.write, SECTION, table([res], command_line("bench/gpu_throughput.py", argv), desc, device,
                                                 title=SECTION, intro=INTRO, peak_tflops=peak))
        print(f"wrote the '{SECTION[3:]}' section of {args.write}")
    return 0


DIAG_SECTION = "## GPU step diagnosis"


def run_diagnosis(args, argv) -> int:
    import torch

    from gpu_diagnose import diagnose, table
    from train_throughput import command_line

    if not torch.cuda.is_available() and not args.tiny:
        print("--diagnose needs a CUDA GPU (or --tiny, the tiny model on the CPU)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu"
    peak = args.peak_tflops or peak_tflops(name)
    if args.tiny:
        info = diagnose(args.recipe, ["run.num_workers=0"], tiny=True, batches=(2, "auto"), steps=2, warmup=1,
                        compile_modes=(False,))
    else:
        info = diagnose(args.recipe, [], tiny=False, cap_gb=args.cap_gb, peak=peak)
    text = table(info)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1, default=str)
    if args.write:
        from report import write_section

        body = (f"{DIAG_SECTION}\n\n`{command_line('bench/gpu_throughput.py', argv)}` on {info['device']}, memory capped "
                f"at {args.cap_gb:g} GiB; model built on the device in {info['build_s']:.0f} s; parts: "
                f"{info['describe']}; auto micro batch {info['auto_batch']}. Phases in ms per step (medians).\n\n"
                + text + "\n")
        write_section(args.write, DIAG_SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
