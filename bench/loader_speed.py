"""Training loader against the GPU: the samples/s a rank's training DataLoader delivers, and the workers a GPU needs.

    python bench/loader_speed.py                                   # recipes/sherlock_opt2.7b.yaml
    python bench/loader_speed.py --recipes recipes/sherlock_opt2.7b.yaml recipes/sherlock_flant5xl.yaml \\
        --write docs/benchmarks.md                                 # also rewrite its section of the docs
    python bench/loader_speed.py --gpu-samples-per-s 23.7 --gpu-samples-per-s 400   # the GPU rates to compare with
    python bench/loader_speed.py --workers 8                       # instead of the recipe's run.num_workers
    python bench/loader_speed.py --smoke                           # small images, a few batches: seconds (CI)

What runs is the trainer's own loader (engine/trainer/loop.py ``training_dataloader``) over the recipe's own
training split (engine/build.py ``build_split``, as ``build_datasets`` makes it): the recipe's dataset class,
image processor at the model's image size (uint8 out), region rendering, the collate with tokenising, padding
and label masking (the model's text side, ``build_text_inputs``: the recipe's checkpoint tokenizer when
``model.pretrained`` is here, else the local tokenizer of the same family; no model is built), the seeded
sampler, ``run.batch_size_train`` and ``run.num_workers``; on a GPU machine also pinned memory and the
normalisation on the device (``on_device``), as in training. Only the data is generated: a Sherlock-format
folder (records, VCR and Visual Genome URL layout) whose JPEGs have the sizes of Sherlock's two sources:

- VCR (movie frames; half of the images): 1920x1080, 1920x800 (2.39:1 films), 1280x720 and 1280x544, equal
  shares: frames of 1080p and 720p sources, up to 1920 px on the long side. The release states no size
  distribution; this one is an assumption (frames differ by film), chosen large so worker counts err high.
- Visual Genome (the other half; Flickr photos): 800x600, 600x800, 500x375 and 500x333, equal shares. VG's
  image_data.json gives image 1 as 800x600; Sherlock's leaderboard README shows a VG image of 500x333.

Sherlock's 103K images come from these two sources; the exact split between them is not stated in the release,
so the mix is half and half (as engine/data/synthetic.py lays out its URLs). That is about 0.8 megapixels per
image on average; decoding and region rendering cost roughly in proportion to it, so a dataset richer in VCR frames is
slower. Images are photo-like (a smooth colour field, shapes, sensor noise: bench/data_pipeline.py
``photo_like``), JPEG quality 90, each used by several records (Sherlock has about 3.5 per image); records have
one box (one in five has two) of 10-60% of the image's width and height, a clue of 3-8 and an inference of 6-16
words.

Measured: steady-state samples/s of the loader, from the first batch after ``--warmup`` batches to ``--batches``
more (a multiple of the worker count, so the workers' rounds are whole), in wall-clock time, and the CPU time
the workers spent meanwhile (read from /proc). The per-worker rate is measured with one worker and counted in
that worker's CPU time (samples per CPU-second): what one core gives. Time other jobs hold the cores is left
out, but their load still slows a core (shared caches, the host's other threads): on the shared 2-core machine
of docs/benchmarks.md, runs at different loads moved it by up to about 30%. The
workers a GPU needs = ceil(GPU samples/s x MARGIN / per-worker samples/s): one core per worker, plus the
rank's own process. With more workers than cores (the recipes' 4 on a 2-core machine) the wall-clock rate is
capped by the cores, not the workers; the table says how many cores the run had.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.data_pipeline import photo_like  # noqa: E402
from bench.report import load_average, machine, write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Training loader against the GPU"
# GPU samples/s to compare with: sherlock_opt2.7b measured on one H100 at micro batch 8 (docs/benchmarks.md,
# "GPU memory"), and the 350-440 that 40-50% MFU would mean for it (issue goal).
GPU_RATES = (23.7, 350.0, 440.0)
MARGIN = 1.25  # workers are sized for 25% more than the GPU's rate: augmentation cost varies per sample
VCR_SIZES = ((1920, 1080), (1920, 800), (1280, 720), (1280, 544))
VG_SIZES = ((800, 600), (600, 800), (500, 375), (500, 333))
SMOKE_SIZES = ((320, 180), (200, 150))
WORDS = ("the man woman person people child dog car street room table door window light sign bag coat hat "
         "is are was looks seems about going to work home party dinner rain cold late tired happy busy "
         "because after before while near behind next inside outside probably likely just soon").split()
CLICK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- data


def _sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(lo, hi + 1))))


def make_sherlock(root: str, train_file: str, *, images: int, records: int, sizes: Optional[Sequence] = None,
                  seed: int = 0) -> Dict[str, float]:
    """Write a Sherlock-format training file ``root/train_file`` with ``records`` records over ``images`` JPEGs
    (half VCR, half VG URLs, sized as the module docstring says, or cycling through ``sizes``). Made once per
    spec; returns what was made (mean megapixels, mean JPEG bytes)."""
    spec = {"images": images, "records": records, "sizes": [list(s) for s in sizes] if sizes else None,
            "seed": seed, "train_file": train_file, "version": 1}
    mark = os.path.join(root, ".loader_speed.json")
    if os.path.exists(mark):
        with open(mark, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("spec") == spec:
            return done["made"]
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(images):
        vcr = i % 2 == 0
        if sizes:
            W, H = sizes[i % len(sizes)]
        else:
            W, H = (VCR_SIZES if vcr else VG_SIZES)[(i // 2) % 4]
        if vcr:
            movie = 1000 + i // 40
            folder, name = f"lsmdc_{movie:04d}_Bench", f"{movie:04d}_Bench_00.01.{i % 60:02d}.000@0.jpg"
            url = f"http://s3-us-west-2.amazonaws.com/ai2-rowanz/vcr1images/{folder}/{name}"
            path = os.path.join(root, "vcr1images", folder, name)
        else:
            folder, name = ("VG_100K" if i % 4 == 1 else "VG_100K_2"), f"{2000 + i}.jpg"
            url = f"https://cs.stanford.edu/people/rak248/{folder}/{name}"
            path = os.path.join(root, "vg", "images", folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        photo_like((W, H), rng).save(tmp, "JPEG", quality=90)
        os.replace(tmp, path)
        entries.append((url, W, H, os.path.getsize(path)))
    recs = []
    for k in range(records):
        url, W, H, _ = entries[k % images]
        boxes = []
        for _ in range(2 if rng.random() < 0.2 else 1):
            w, h = int(W * rng.uniform(0.1, 0.6)), int(H * rng.uniform(0.1, 0.6))
            boxes.append({"left": int(rng.integers(0, W - w)), "top": int(rng.integers(0, H - h)), "width": w,
                          "height": h})
        recs.append({"inputs": {"image": {"url": url, "width": W, "height": H}, "bboxes": boxes,
                                "clue": _sentence(rng, 3, 8), "confidence": 2.0, "obs_idx": 0},
                     "targets": {"inference": _sentence(rng, 6, 16)}, "instance_id": f"bench-{k:06d}"})
    file = os.path.join(root, train_file)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with open(file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(recs, f)
    os.replace(file + ".tmp", file)
    made = {"megapixels": statistics.mean(W * H for _, W, H, _ in entries) / 1e6,
            "jpeg_kb": statistics.mean(b for *_, b in entries) / 1024}
    with open(mark, "w", encoding="utf-8") as f:
        json.dump({"spec": spec, "made": made}, f)
    return made


# --------------------------------------------------------------------------- measuring


def _cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``, all its threads (Linux /proc: schedstat in ns, else stat in clock ticks)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="utf-8") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLICK  # utime, stime (fields 14 and 15 of stat)


def _workers_cpu(pids: Sequence[int]) -> float:
    return sum(_cpu_seconds(p) for p in pids)


def check_batch(batch: Dict, batch_size: int, image_size: int) -> Dict:
    """What the trainer's step needs of a batch, checked: the images and the collated text tensors."""
    image, inputs = batch["image"], batch.get("inputs")
    if tuple(image.shape) != (batch_size, 3, image_size, image_size):
        raise AssertionError(f"image batch of shape {tuple(image.shape)}, expected "
                             f"{(batch_size, 3, image_size, image_size)}")
    if not inputs or "input_ids" not in inputs or "labels" not in inputs:
        raise AssertionError(f"the collate made no model inputs (keys {sorted(inputs or {})})")
    if inputs["input_ids"].shape[0] != batch_size or inputs["labels"].shape[0] != batch_size:
        raise AssertionError("the collated text tensors do not have one row per sample")
    return {"image": [list(image.shape), str(image.dtype).replace("torch.", "")],
            "inputs": {k: list(v.shape) for k, v in inputs.items()},
            "masked_labels": int((inputs["labels"] == -100).sum())}


def measure(recipe, workers: int, batches: int, warmup: int, device: str, log=print) -> Dict:
    """Steady-state samples/s of the recipe's training loader with ``workers`` workers."""
    from engine.build import build_split, build_text_inputs, model_image_size
    from engine.data.normalize import on_device
    from engine.trainer.loop import training_dataloader

    run = dataclasses.replace(recipe.run, num_workers=workers)
    split = run.train_splits[0]
    ds = build_split(recipe, split, is_train=True)
    text = build_text_inputs(recipe)
    loader = training_dataloader(ds, run, text.build_inputs, world=1, rank=0, epoch=0, start_micro=0,
                                 pin_memory=device == "cuda")
    need = warmup + batches
    if len(loader) < need:
        raise SystemExit(f"the generated split has {len(loader)} batches, fewer than the {need} asked for")
    before = {p.pid for p in multiprocessing.active_children()}
    it = iter(on_device(loader, ds, torch.device(device)) if device == "cuda" else loader)
    size = model_image_size(recipe)
    for _ in range(warmup):  # worker start-up, first imports and allocations
        next(it)
    pids = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    if len(pids) != workers:
        raise RuntimeError(f"expected {workers} loader worker processes, found {len(pids)}")
    samples, shapes = 0, None
    cpu0, main0, t0 = _workers_cpu(pids), time.process_time(), time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        if device == "cuda":
            torch.cuda.synchronize()
        samples += batch["image"].shape[0]
        shapes = shapes or check_batch(batch, run.batch_size_train, size)
    wall = time.perf_counter() - t0
    cpu, main = _workers_cpu(pids) - cpu0, time.process_time() - main0
    del it  # stops the workers
    row = {"recipe": recipe.source, "workers": workers, "batch": run.batch_size_train, "image_size": size,
           "batches": batches, "samples": samples, "wall_s": wall, "samples_per_s": samples / wall,
           "worker_cpu_s": cpu, "samples_per_worker_cpu_s": samples / cpu if cpu > 0 else float("inf"),
           "main_cpu_ms_per_batch": 1e3 * main / batches, "batch_fields": shapes}
    log(f"{recipe.source}: {workers} worker(s), batch {row['batch']} at {size} px: {row['samples_per_s']:.1f} "
        f"samples/s wall, {row['samples_per_worker_cpu_s']:.1f} samples per worker CPU-second "
        f"({samples} samples in {wall:.1f} s)")
    return row


def median_row(rounds: List[Dict]) -> Dict:
    """One row for repeated runs of one worker count: the median rates, each round's kept."""
    row = dict(rounds[0])
    for key in ("samples_per_s", "samples_per_worker_cpu_s", "main_cpu_ms_per_batch"):
        row[key] = statistics.median(r[key] for r in rounds)
    keep = ("samples", "wall_s", "worker_cpu_s", "samples_per_s", "samples_per_worker_cpu_s")
    row["rounds"] = [{k: r[k] for k in keep} for r in rounds]
    spread = [r["samples_per_worker_cpu_s"] for r in rounds]
    row["samples_per_worker_cpu_s_range"] = [min(spread), max(spread)]
    return row


def workers_needed(gpu_rate: float, per_worker: float, margin: float = MARGIN) -> int:
    """Workers whose loader keeps up with ``gpu_rate`` samples/s when one gives ``per_worker``, with ``margin``."""
    return max(1, math.ceil(gpu_rate * margin / per_worker))


def bench_recipe(path: str, args, log=print) -> Dict:
    from engine.config import load_recipe

    folder = os.path.join(args.workdir, os.path.splitext(os.path.basename(path))[0])
    options = ["model.pretrained=random", *args.options]
    recipe = load_recipe(path, options, check_files=False)
    if list(recipe.datasets) != ["sherlock"]:
        raise SystemExit(f"{path} trains on {', '.join(recipe.datasets)}; this benchmark generates Sherlock data "
                         f"only (datasets.sherlock)")
    train_file = recipe.datasets["sherlock"].options.train_file
    options += [f"datasets.sherlock.root={folder}"]
    recipe = load_recipe(path, options, check_files=False)
    workers = args.workers if args.workers is not None else recipe.run.num_workers
    counts = sorted({1, workers})
    per_batch = recipe.run.batch_size_train
    batches = {w: max(w, args.batches // w * w) for w in counts}
    records = per_batch * (args.warmup + max(batches.values())) * 2  # the sampler's epoch outlasts the run
    made = make_sherlock(folder, train_file, images=args.images, records=records, sizes=args.size_list)
    log(f"{path}: {args.images} images ({made['megapixels']:.2f} MP, {made['jpeg_kb']:.0f} KiB each on average), "
        f"{records} records in {folder}")
    runs: Dict[int, List[Dict]] = {w: [] for w in counts}
    for _ in range(args.rounds):  # alternating, so every count sees the same machine state
        for w in counts:
            runs[w].append(measure(recipe, w, batches[w], args.warmup, args.device, log=log))
    rows = [median_row(runs[w]) for w in counts]
    per_worker = rows[0]["samples_per_worker_cpu_s"]  # one worker: what one core gives, undisturbed by the others
    for row in rows:
        row.update(megapixels=made["megapixels"], jpeg_kb=made["jpeg_kb"], sizes=args.size_label,
                   per_worker=per_worker,
                   needed={str(g): workers_needed(g, per_worker) for g in args.gpu_samples_per_s})
    return {"recipe": path, "rows": rows}


# --------------------------------------------------------------------------- report


def _rate(g: float) -> str:
    return f"{g:g}"


def section(results: List[Dict], gpu_rates: Sequence[float], command: str, cores: int, load: str) -> str:
    rates = ", ".join(_rate(g) for g in gpu_rates)
    lines = [
        SECTION,
        "",
        f"The samples/s a rank's training DataLoader delivers, next to the GPU's step rate; {machine()}; load "
        f"average (1/5/15 min) {load}. bench/loader_speed.py's docstring says what runs (the trainer's own loader "
        f"on the recipe's training split, no model) and what the generated Sherlock images are.",
        "",
        f"- loader samples/s: wall clock, steady state (after the warm-up batches), the median of the rounds, with "
        f"that many workers on this machine's {cores} cores: more workers than cores share them, and other jobs on "
        f"the machine take their share too.",
        "- per worker: samples per CPU-second of a worker, i.e. what one core gives (the workers' CPU time, read "
        "from /proc: the time other jobs hold the cores is left out, but sharing the machine still slows a core, "
        "so runs at different loads differ by up to about 30%); the median of the rounds, their range in "
        "brackets. Several workers on few cores give a little less each (they share caches and switch).",
        f"- workers at N/s: ceil(N x {MARGIN} / the one-worker row's per-worker rate), the workers (one core each, "
        f"besides the rank's own process) a rank needs to feed a GPU stepping at N samples/s. GPU rates: {rates} "
        "(sherlock_opt2.7b "
        "measured on one H100 at micro batch 8, section 'GPU memory'; 350 and 440 = 40% and 50% MFU for it, the "
        "throughput goal).",
        "",
        "| recipe | images | image size | micro batch | workers | loader samples/s | per worker samples/s | "
        + " | ".join(f"workers at {_rate(g)}/s" for g in gpu_rates) + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(gpu_rates),
    ]
    for res in results:
        for r in res["rows"]:
            low, high = r["samples_per_worker_cpu_s_range"]
            lines.append(f"| {res['recipe']} | {r['sizes']} ({r['megapixels']:.2f} MP, {r['jpeg_kb']:.0f} KiB) | "
                         f"{r['image_size']} | {r['batch']} | {r['workers']} | {r['samples_per_s']:.1f} | "
                         f"{r['samples_per_worker_cpu_s']:.1f} ({low:.0f}-{high:.0f}) | "
                         + " | ".join(str(r["needed"][str(g)]) for g in gpu_rates) + " |")
    lines += ["", "Reproduce:", "", "```", command, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["recipes/sherlock_opt2.7b.yaml"], help="Sherlock recipes")
    p.add_argument("--options", nargs="*", default=[], help="recipe overrides, key=value (as engine/train.py)")
    p.add_argument("--workers", type=int, help="loader workers (default: the recipe's run.num_workers); one worker "
                                              "is always measured too, for the per-worker rate")
    p.add_argument("--batches", type=int, default=48, help="timed batches after the warm-up (default 48)")
    p.add_argument("--rounds", type=int, default=3, help="repeats of each worker count, alternating; the table "
                                                         "gives the medians (default 3)")
    p.add_argument("--warmup", type=int, default=4, help="batches skipped before timing (default 4)")
    p.add_argument("--images", type=int, default=48, help="distinct generated JPEGs (default 48)")
    p.add_argument("--sizes", nargs="+", metavar="WxH", help="generate these JPEG sizes instead of Sherlock's "
                                                             "VCR/VG mix")
    p.add_argument("--gpu-samples-per-s", type=float, action="append", metavar="N",
                   help=f"a GPU step rate to compare with (repeatable; default {', '.join(map(str, GPU_RATES))})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where batches go (cuda: pinned memory and device normalisation, as in training)")
    p.add_argument("--smoke", action="store_true", help="small images, 2 workers, a few batches: checks that it runs")
    p.add_argument("--json", help="also write the measurements here")
    p.add_argument("--write", metavar="DOC", help=f"rewrite the '{SECTION[3:]}' section of this markdown file")
    p.add_argument("--workdir", default=os.path.join(ROOT, ".cache", "bench_loader_speed"),
                   help="scratch folder for the generated data")
    args = p.parse_args(argv)
    args.gpu_samples_per_s = args.gpu_samples_per_s or list(GPU_RATES)
    if args.smoke:
        args.batches, args.warmup, args.images, args.rounds = 4, 1, 6, 1
        args.workers = 2 if args.workers is None else args.workers
        args.sizes = args.sizes or [f"{w}x{h}" for w, h in SMOKE_SIZES]
    try:
        args.size_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes] if args.sizes else None
    except ValueError:
        raise SystemExit(f"--sizes {' '.join(args.sizes)}: give sizes as WxH, e.g. 1920x1080") from None
    args.size_label = " ".join(args.sizes) if args.sizes else "VCR/VG mix"
    torch.set_num_threads(1)  # the main process only receives batches; leave the cores to the workers
    # More workers than cores is the point of some rows (the table says so); torch's warning about it is not news.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    before = load_average() or "n/a"
    results = [bench_recipe(path, args) for path in args.recipes]
    load = f"{before} before, {load_average() or 'n/a'} after"
    command = "python bench/loader_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = section(results, args.gpu_samples_per_s, command.strip(), os.cpu_count() or 1, load)
    print("\n" + text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "gpu_samples_per_s": args.gpu_samples_per_s, "margin": MARGIN}, f,
                      indent=1)
    if args.write:
        write_section(args.write, SECTION, text)
        print(f"wrote the '{SECTION[3:]}' section of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
