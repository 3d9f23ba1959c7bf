"""Evaluation speed: caption generation on the tiny model, and the caption metrics on 1,000 predictions.

    python bench/eval_speed.py                              # this machine
    python bench/eval_speed.py --write docs/benchmarks.md   # also rewrite the "Evaluation speed" section
    python bench/eval_speed.py --smoke                      # one batch, 50 predictions: checks that it runs

Generation is the call the captioning task makes per batch (``VisionLanguageModel.generate``), on the tiny
default (recipes/tiny_sherlock.yaml: batch_size_eval, num_beams, max_len), in bf16 as a DeepSpeed bf16 run
holds it, with ``min_len = max_len``: every caption is exactly max_len new tokens, so the figure does not
depend on when the random-weights model happens to emit an end token. Greedy and the recipe's beam search.

Metrics are ``engine.tasks.metrics.caption_metrics`` (pycocoevalcap: PTB tokenizer, BLEU-1..4, METEOR,
ROUGE-L, CIDEr; Java processes included) on synthetic Sherlock-style predictions with 5 references each,
wall time from the call to its return.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the engine
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench/ (when imported)
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Evaluation speed"
TINY = os.path.join(ROOT, "recipes", "tiny_sherlock.yaml")


def generation_speed(batches: int, batch_size=None, log=print) -> List[Dict[str, Any]]:
    """samples/s of ``generate`` on the tiny model, greedy and with the recipe's beams (median over batches)."""
    import torch

    from engine.build import build_model
    from engine.config import load_recipe

    recipe = load_recipe(TINY, [f"run.batch_size_eval={batch_size}"] if batch_size else [])
    r = recipe.run
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(recipe).to(device=device, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    size = model.image_size
    images = torch.randn(r.batch_size_eval, 3, size, size, generator=g).to(device, torch.bfloat16)
    prompts = [recipe.model.prompt] * r.batch_size_eval
    rows = []
    for nb in sorted({1, r.num_beams}):
        def once() -> float:
            t0 = time.perf_counter()
            out = model.generate(images, prompts, num_beams=nb, max_len=r.max_len, min_len=r.max_len)
            if device.type == "cuda":
                torch.cuda.synchronize()
            assert len(out) == len(prompts)
            return time.perf_counter() - t0

        once()  # warm-up
        times = [once() for _ in range(batches)]
        rate = r.batch_size_eval / statistics.median(times)
        row = {"num_beams": nb, "batch": r.batch_size_eval, "new_tokens": r.max_len, "samples_per_s": rate,
               "tokens_per_s": rate * r.max_len, "device": device.type}
        log(f"generate: num_beams {nb}, batch {r.batch_size_eval}, {r.max_len} new tokens: {rate:.1f} samples/s")
        rows.append(row)
    return rows


def synthetic_captions(n: int, refs: int, seed: int = 0):
    """(predictions, references): Sherlock-style sentences; predictions share some words with references."""
    from engine.data.synthetic import COLOURS, OBJECT, SHAPES, inference_for

    rng = random.Random(seed)
    pool = [inference_for(c, s) for c in COLOURS for s in SHAPES]
    extra = ["near the fence", "on a sunny day", "after lunch", "in the garden", "for the kids", "by the road"]
    objects = sorted(set(OBJECT.values()))
    predictions, references = {}, {}
    for i in range(n):
        base = rng.choice(pool)
        references[str(i)] = [f"{rng.choice(pool)} {rng.choice(extra)}" if k else base for k in range(refs)]
        words = base.split()
        words[rng.randrange(len(words))] = rng.choice(objects)  # one word off
        predictions[str(i)] = " ".join(words) + ("" if rng.random() < 0.5 else f" {rng.choice(extra)}")
    return predictions, references


def metric_time(n: int, repeats: int, log=print) -> Dict[str, Any]:
    from engine.tasks.metrics import caption_metrics

    predictions, references = synthetic_captions(n, 5)
    times, metrics = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        metrics = caption_metrics(predictions, references)
        times.append(time.perf_counter() - t0)
    row = {"predictions": n, "references_each": 5, "seconds": statistics.median(times),
           "metrics": sorted(metrics)}
    log(f"caption_metrics: {n} predictions x 5 references: {row['seconds']:.2f} s")
    return row


def table(gen: List[Dict[str, Any]], met: Dict[str, Any], command: str, machine: str) -> str:
    g0 = gen[0]
    device = "GPU" if g0["device"] == "cuda" else "CPU"
    lines = [
        SECTION,
        "",
        "Caption generation on the tiny default (recipes/tiny_sherlock.yaml), bf16, the call the captioning task "
        f"makes per batch, every caption forced to {g0['new_tokens']} new tokens (`min_len = max_len`); "
        "median over batches after a warm-up batch. Caption metrics: `engine.tasks.metrics.caption_metrics` "
        "(pycocoevalcap's PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr, with its Java processes), wall "
        "time per call, median over repeats.",
        "",
        f"Machine: {machine}.",
        "",
        "| what | setting | result |",
        "|---|---|---:|",
    ]
    for row in gen:
        how = "greedy (num_beams 1)" if row["num_beams"] == 1 else f"beam search (num_beams {row['num_beams']})"
        lines.append(f"| generation, tiny BLIP-2 OPT, batch {row['batch']}, {device} | {how} | "
                     f"{row['samples_per_s']:.1f} samples/s ({row['tokens_per_s']:.0f} tokens/s) |")
    lines.append(f"| caption metrics | {met['predictions']:,} predictions, {met['references_each']} references each | "
                 f"{met['seconds']:.2f} s |")
    lines += ["", "Reproduce:", "", "```", command, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=5, help="timed generate calls per setting (default 5)")
    p.add_argument("--predictions", type=int, default=1000, help="predictions scored (default 1000)")
    p.add_argument("--repeats", type=int, default=3, help="metric calls timed (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="batch 4, one timed batch, 50 predictions once")
    p.add_argument("--write", metavar="DOC", help="rewrite the 'Evaluation speed' section of this markdown file")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    batch_size = None
    if args.smoke:
        args.batches, args.predictions, args.repeats, batch_size = 1, 50, 1, 4
    import torch

    from report import load_average, machine, write_section

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    gen = generation_speed(args.batches, batch_size=batch_size)
    met = metric_time(args.predictions, args.repeats)
    desc = machine(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    n = torch.get_num_threads()
    desc += f", {n} torch thread{'' if n == 1 else 's'}"
    load_after = load_average()
    if load_before and load_after:
        desc += f"; load average (1/5/15 min) {load_before} before, {load_after} after"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": desc, "generation": gen, "metrics": met}, f, indent=1)
    if args.write:
        command = "python bench/eval_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(args.write, SECTION, table(gen, met, command.strip(), desc))
        print(f"wrote the '{SECTION[3:]}' section of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
