"""Annotation files at full size: load time and host memory of a rank and its DataLoader workers.

    python bench/annotation_memory.py                              # 363,000 Sherlock records, 4 workers
    python bench/annotation_memory.py --engine-root ../other-checkout  # the same, with another tree's engine
    python bench/annotation_memory.py --write docs/benchmarks.md --before before.json
    python bench/annotation_memory.py --smoke                      # 3,000 records, 2 workers (CI)

Builds a training file in the Sherlock format with as many records as the official one (363,000: URLs of both
image sources, a box, clue, inference, instance_id), once, under --workdir. Then, each in a fresh process:

* **cold**: no record cache yet (it is deleted first): the start-up of a new dataset file;
* **cached**: the start-up of every later run.

Each measures the time to build the ``sherlock`` training split (``check_images`` off: no images exist here),
the process's RSS before and after, and then runs one full pass of a DataLoader with 4 workers over every
record (each sample reads the record's fields and its annotation, as ``__getitem__`` does minus the image),
and reads the PSS (proportional set size: shared pages divided among the processes sharing them, from
/proc/<pid>/smaps_rollup) of the rank and of each worker, with the workers still alive. The summed PSS is the
memory the rank and its workers really cost; one copy is the rank's RSS after loading.

``--engine-root`` imports ``engine`` from another checkout, to measure the code before a change; ``--before``
names the JSON a previous run wrote with ``--json``, whose figures go into the table beside these.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Annotation files at full size"
TRAIN = "sherlock_dataset/sherlock_train_v1_1.json"
SHERLOCK_TRAIN_RECORDS = 363_000
LOAD_GOAL_S = 3.0
PSS_GOAL = 1.5

WORDS = ("the man woman person child dog car table window street kitchen office party beach snow rain coffee "
         "phone book bag hat coat shirt glasses bottle glass plate cake flowers sign light door wall floor "
         "is are was looking holding wearing sitting standing walking waiting about to going from with near "
         "behind under old young tired happy angry busy cold hot wet dark bright empty full").split()


def make_file(folder: str, n: int, seed: int = 0) -> str:
    """A Sherlock-format training file of ``n`` records (made once; the same bytes for the same n and seed)."""
    import hashlib
    import random

    path = os.path.join(folder, TRAIN)
    done = path + f".{n}.{seed}.done"
    if os.path.isfile(done):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = random.Random(seed)

    def sentence(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            if i % 3:
                movie = f"lsmdc_{1000 + i // 400:04d}_Some_Movie_Title"
                url = (f"http://s3-us-west-2.amazonaws.com/ai2-rowanz/vcr1images/{movie}/"
                       f"{1000 + i // 400:04d}_Some_Movie_Title_00.{i % 60:02d}.12.345-00.{i % 60:02d}.15.678@{i % 9}.jpg")
                W, H = 1920, 1080
            else:
                url = f"https://cs.stanford.edu/people/rak248/VG_100K{'_2' if i % 2 else ''}/{100000 + i}.jpg"
                W, H = 800, 600
            w, h = rng.randint(20, W // 2), rng.randint(20, H // 2)
            rec = {"inputs": {"image": {"url": url, "width": W, "height": H},
                              "bboxes": [{"left": rng.randint(0, W - w), "top": rng.randint(0, H - h),
                                          "width": w, "height": h}],
                              "clue": sentence(3, 9), "confidence": float(rng.randint(1, 3)), "obs_idx": i % 5},
                   "targets": {"inference": sentence(6, 16)},
                   "instance_id": hashlib.md5(f"bench-{seed}-{i}".encode()).hexdigest()}
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")
    os.replace(tmp, path)
    open(done, "w").close()
    return path


def make_images(folder: str, n: int) -> None:
    """An image file for every record of :func:`make_file`: hard links to one JPEG per image size (so the check
    tool can read every header without gigabytes of pixels)."""
    from PIL import Image

    done = os.path.join(folder, f".images.{n}.done")
    if os.path.isfile(done):
        return
    from engine.data.sherlock import url_to_path

    def template(size, k):  # a file system allows some 65,000 links per file: one template per 50,000
        path = os.path.join(folder, f"template_{size[0]}x{size[1]}_{k // 50_000}.jpg")
        if not os.path.exists(path):
            Image.new("RGB", size, (120, 130, 140)).save(path, "JPEG", quality=50)
        return path

    recs = json.load(open(os.path.join(folder, TRAIN), encoding="utf-8"))
    made = set()
    for k, rec in enumerate(recs):
        image = rec["inputs"]["image"]
        path = url_to_path(image["url"], os.path.join(folder, "vcr1images"), os.path.join(folder, "vg", "images"))
        d = os.path.dirname(path)
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        if not os.path.exists(path):
            os.link(template((image["width"], image["height"]), k), path)
    open(done, "w").close()


# --------------------------------------------------------------------------- the measured process


def measure_check(folder: str) -> dict:
    """Runs in a fresh process: what tools/check_dataset.py does for the training split (every record, every
    image header); wall time and peak RSS."""
    from engine.config import parse_recipe
    from engine.build import check_recipe_datasets

    recipe = parse_recipe({"model": {"arch": "blip2_opt", "model_type": "tiny"},
                           "datasets": {"sherlock": {"root": folder}},
                           "run": {"train_splits": ["train"], "valid_splits": []}}, check_files=False)
    start = time.perf_counter()
    report = check_recipe_datasets(recipe)
    return {"check_s": time.perf_counter() - start, "check_peak_rss_mb": _kib(os.getpid(), "VmHWM", "status") / 1024,
            "check_ok": report.ok, "check_bad": len(report.bad)}



def _kib(pid: int, field: str, name: str = "smaps_rollup") -> int:
    with open(f"/proc/{pid}/{name}", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(folder: str, workers: int, batch: int, collect: bool = False) -> dict:
    """Runs in a fresh process: build the split, one pass of a DataLoader, memory figures (MiB).
    ``collect``: each worker runs a full garbage collection at its first sample, as a long run does now and
    then (it visits every tracked Python object, so the pages holding them are copied into the worker)."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from engine.data.sherlock import SherlockDataset

    class Fields(Dataset):
        """A sample = the record's fields and annotation (what __getitem__ reads, without the image)."""

        def __init__(self, ds):
            self.ds = ds
            self.collected = not collect

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            if not self.collected:  # once per worker (each has its own copy of this object)
                gc.collect()
                self.collected = True
            it = self.ds.items[i]
            a = self.ds.annotation(i)
            return len(it.path) + len(it.boxes) + len(a["text_output"]) + len(a["sample_id"])

    torch.set_num_threads(1)
    me = os.getpid()
    # The same rank and workers without records: what the libraries and the workers' own heaps cost.
    class Empty(Dataset):
        def __init__(self):
            self.collected = not collect

        def __len__(self):
            return workers * 2

        def __getitem__(self, i):
            if not self.collected:
                gc.collect()
                self.collected = True
            return i

    it = iter(DataLoader(Empty(), batch_size=1, num_workers=workers, persistent_workers=workers > 0,
                         collate_fn=lambda xs: sum(xs)))
    sum(it)
    base = _kib(me, "Pss") + sum(_kib(p.pid, "Pss") for p in getattr(it, "_workers", []))
    it._shutdown_workers() if hasattr(it, "_shutdown_workers") else None
    del it
    rss0 = _kib(me, "VmRSS", "status")
    start = time.perf_counter()
    ds = SherlockDataset(os.path.join(folder, TRAIN), vcr_root=os.path.join(folder, "vcr1images"),
                         vg_root=os.path.join(folder, "vg", "images"), vis_processor=None, split="train",
                         check_images=False)
    load_s = time.perf_counter() - start
    rss1 = _kib(me, "VmRSS", "status")
    hwm = _kib(me, "VmHWM", "status")
    loader = DataLoader(Fields(ds), batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                        collate_fn=lambda xs: sum(xs))
    it = iter(loader)
    start = time.perf_counter()
    total = sum(it)
    pass_s = time.perf_counter() - start
    pids = [p.pid for p in getattr(it, "_workers", [])]
    pss = {"rank": _kib(me, "Pss")}
    for k, pid in enumerate(pids):
        pss[f"worker{k}"] = _kib(pid, "Pss")
    cache = getattr(ds, "records_cache", None)
    out = {"records": len(ds), "load_s": load_s, "pss_sum_no_records_mb": base / 1024,
           "one_copy_mb": (os.path.getsize(cache) if cache else (rss1 - rss0) * 1024) / 2**20, "pass_s": pass_s, "checksum": int(total),
           "rss_before_mb": rss0 / 1024, "rss_loaded_mb": rss1 / 1024, "peak_rss_mb": hwm / 1024,
           "rss_after_pass_mb": _kib(me, "VmRSS", "status") / 1024,
           "pss_mb": {k: v / 1024 for k, v in pss.items()}, "pss_sum_mb": sum(pss.values()) / 1024,
           "cache": cache}
    del it
    return out


def _child(engine_root: str, folder: str, workers: int, batch: int, collect: bool = False,
           check: bool = False) -> dict:
    call = "b.measure_check(sys.argv[3])" if check else \
        "b.measure(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == '1')"
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); import annotation_memory as b; "
            "sys.path.insert(0, sys.argv[1]); "  # the measured tree's engine, ahead of this one
            f"print('RESULT ' + json.dumps({call}))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code, engine_root, os.path.join(ROOT, "bench"), folder,
                           str(workers), str(batch), "1" if collect else "0"], capture_output=True, text=True, env=env, cwd=engine_root)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def run(engine_root: str, folder: str, workers: int, batch: int, check: bool) -> dict:
    """cold (no cache), cached, and cached with a full collection in each worker, each in a fresh process."""
    from engine.data.store import cache_paths

    for path in cache_paths(os.path.join(folder, TRAIN), "sherlock"):
        if os.path.exists(path):
            os.remove(path)
    cold = _child(engine_root, folder, workers, batch)
    cached = _child(engine_root, folder, workers, batch)
    collected = _child(engine_root, folder, workers, batch, collect=True)
    out = {"engine_root": os.path.abspath(engine_root), "workers": workers, "cold": cold, "cached": cached,
           "collected": collected}
    if check:
        out["check"] = _child(engine_root, folder, workers, batch, check=True)
    return out


# --------------------------------------------------------------------------- report


def cost(r: dict) -> float:
    """What the records cost the rank and its workers together: sum PSS with them minus sum PSS without."""
    return r["pss_sum_mb"] - r["pss_sum_no_records_mb"]


def _row(label: str, r: dict) -> str:
    return (f"| {label} | {r['load_s']:.2f} s | {r['peak_rss_mb']:.0f} | {r['one_copy_mb']:.0f} | "
            f"{r['pss_sum_mb']:.0f} | {r['pss_sum_no_records_mb']:.0f} | {cost(r):.0f} | "
            f"{cost(r) / r['one_copy_mb']:.2f}x |")


def section(after: dict, before: dict = None, n: int = 0, command: str = "") -> str:
    from report import load_average, machine

    w = after["workers"]
    lines = [SECTION, "",
             f"`{command}`: {n:,} Sherlock-format training records (the size of sherlock_train_v1_1.json), "
             f"one DataLoader pass with {w} workers over every record (each sample reads the record's fields and "
             f"annotation; no image). Each start is a fresh process. Memory in MiB. *One copy*: the records held "
             f"once (before: the rank's RSS growth while loading; after: the cache file, all of it mapped). "
             f"*Sum PSS*: the rank + {w} workers after the pass, workers alive (/proc/<pid>/smaps_rollup: shared "
             f"pages divided among the processes sharing them); *without records*: the same rank and workers over "
             f"an empty loader, measured first; *records' cost* = the difference. Goals: load < {LOAD_GOAL_S:.0f} s "
             f"from the cache; records' cost <= {PSS_GOAL}x one copy.",
             "",
             f"| code, start | load | peak RSS | one copy | sum PSS (rank + {w} workers) | without records | "
             f"records' cost | x one copy |",
             "|---|---|---|---|---|---|---|---|"]
    if before:
        lines.append(_row("before (records as Python objects), first start", before["cold"]))
        lines.append(_row("before, later start", before["cached"]))
        lines.append(_row("before, later start, a full garbage collection in each worker", before["collected"]))
    lines.append(_row("after (columns in a mapped file), first start: parse, write the cache", after["cold"]))
    lines.append(_row("after, later start: map the cache", after["cached"]))
    lines.append(_row("after, later start, a full garbage collection in each worker", after["collected"]))
    c = after["cached"]
    per = ", ".join(f"{k} {v:.0f}" for k, v in c["pss_mb"].items())
    lines += ["", f"PSS per process, after, later start: {per} MiB. "
                  f"Load from the cache {c['load_s']:.2f} s (goal < {LOAD_GOAL_S:.0f} s: "
                  f"{'met' if c['load_s'] < LOAD_GOAL_S else 'NOT met'}); records' cost "
                  f"{cost(c) / c['one_copy_mb']:.2f}x one copy (goal <= {PSS_GOAL}x: "
                  f"{'met' if cost(c) <= PSS_GOAL * c['one_copy_mb'] else 'NOT met'})."]
    if before:
        b = before["cached"]
        lines.append(f"Against before: load {b['load_s']:.1f} s -> {c['load_s']:.2f} s; the records cost the rank "
                     f"and its workers {cost(b):.0f} -> {cost(c):.0f} MiB; one copy {b['one_copy_mb']:.0f} -> "
                     f"{c['one_copy_mb']:.0f} MiB; peak RSS while loading {b['peak_rss_mb']:.0f} -> "
                     f"{c['peak_rss_mb']:.0f} MiB (first start: {after['cold']['peak_rss_mb']:.0f}, the JSON "
                     f"parsed once).")
    if before and "check" in before and "check" in after:
        b, a = before["check"], after["check"]
        lines += ["", f"`tools/check_dataset.py` on the same file (every record, and every image's header: the images "
                      f"are hard links to one JPEG per size), later start: {b['check_s']:.1f} s and "
                      f"{b['check_peak_rss_mb']:.0f} MiB peak RSS before, {a['check_s']:.1f} s and "
                      f"{a['check_peak_rss_mb']:.0f} MiB after (the time is reading the image headers; wall time on a "
                      f"shared machine, so within its noise)."]
    load = load_average()
    lines += ["", f"Machine: {machine()}" + (f"; load average {load} (shared machine)" if load else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=SHERLOCK_TRAIN_RECORDS)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--engine-root", default=ROOT, help="checkout whose engine is measured (default: this one)")
    p.add_argument("--workdir", default=os.path.join(ROOT, ".cache", "bench_annotations"))
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--before", help="JSON of a run with the code before the change (--engine-root), for the table")
    p.add_argument("--write", help="rewrite this section of a markdown file (docs/benchmarks.md)")
    p.add_argument("--no-check", action="store_true", help="skip the tools/check_dataset.py measurement")
    p.add_argument("--smoke", action="store_true", help="3,000 records, 2 workers: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.records, args.workers = 3000, 2
    folder = os.path.join(args.workdir, f"sherlock_{args.records}")
    start = time.perf_counter()
    make_file(folder, args.records)
    print(f"{os.path.join(folder, TRAIN)}: {os.path.getsize(os.path.join(folder, TRAIN)) / 1e6:.0f} MB "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    if not args.no_check:
        start = time.perf_counter()
        make_images(folder, args.records)
        print(f"image files: {time.perf_counter() - start:.0f} s", flush=True)
    result = run(args.engine_root, folder, args.workers, args.batch, check=not args.no_check)
    result["records"] = args.records
    for start_kind in ("cold", "cached", "collected"):
        r = result[start_kind]
        print(f"{start_kind:9s} load {r['load_s']:6.2f} s  RSS {r['rss_before_mb']:.0f} -> {r['rss_loaded_mb']:.0f} MiB "
              f"(peak {r['peak_rss_mb']:.0f})  pass {r['pass_s']:.1f} s  sum PSS {r['pss_sum_mb']:.0f} MiB, "
              f"{r['pss_sum_no_records_mb']:.0f} without records: records cost {cost(r):.0f} MiB = "
              f"{cost(r) / r['one_copy_mb']:.2f}x one copy ({r['one_copy_mb']:.0f} MiB)", flush=True)
    if "check" in result:
        r = result["check"]
        print(f"check     {r['check_s']:.1f} s, peak RSS {r['check_peak_rss_mb']:.0f} MiB, ok {r['check_ok']}",
              flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    if args.write:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from report import write_section

        before = json.load(open(args.before, encoding="utf-8")) if args.before else None
        cmd = "python bench/annotation_memory.py" + (" --smoke" if args.smoke else "")
        write_section(args.write, SECTION, section(result, before, args.records, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
