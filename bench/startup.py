"""Start-up of `engine/train.py` at real size: time from launch to the first step, each stage's share, and the
host's peak memory per rank.

    python bench/startup.py                                   # recipes/sherlock_opt2.7b.yaml, random weights, 1 rank
    python bench/startup.py --ranks 2 --recipe ...            # through the deepspeed launcher (needs the memory)
    python bench/startup.py --engine /path/to/other/checkout --label before --json before.json
    python bench/startup.py --label after --json after.json --write docs/benchmarks.md --compare before.json
    python bench/startup.py --smoke                           # the tiny model: checks that it runs

The script launches the real start path, `engine/train.py` (in the checkout `--engine`, default this one), as a
user would, with the recipe's model and run set-up (architecture, freezing, checkpointing, precision, DeepSpeed
config, micro batch) and ``model.pretrained: random`` (the real architecture, no download), on a few records of
the synthetic Sherlock data instead of the recipe's dataset. It reads the engine's start-up report, the line
``start-up took X s: config ..., model build/load ..., DeepSpeed init ...`` logged just before the first step,
and stops the run there (nothing is trained or saved):

- launch to first step: wall time from starting the process to that line (it also counts the interpreter's
  start and the imports before the engine's clock starts);
- the stages of the report (engine/startup.py ``StartupClock``);
- host peak per rank: VmHWM (the peak resident set) of each rank's process, from /proc/<pid>/status, read
  until the line appears. It covers every host copy the rank made of the weights; GPU memory is not in it.

`--options model.pretrained=/data/hf/blip2-opt-2.7b-coco` measures a checkpoint's load instead (later options
win). One real-size process at a time on a small machine: on a CPU every rank holds the whole model.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.dirname(os.path.abspath(__file__))):  # the engine, and bench/ (step_ops, report)
    if _path not in sys.path:
        sys.path.insert(0, _path)

SECTION = "## Start-up"
DEFAULT_RECIPE = os.path.join(ROOT, "recipes", "sherlock_opt2.7b.yaml")
STARTUP_RE = re.compile(r"start-up took ([\d.]+) s: (.*)$")
STAGE_RE = re.compile(r"(.+?) ([\d.]+) s$")


def parse_startup(line: str) -> Optional[Dict[str, Any]]:
    """The engine's start-up report in a log line -> {"total_s", "stages": {name: seconds}}; None if absent."""
    m = STARTUP_RE.search(line.rstrip())
    if not m:
        return None
    stages = {}
    for part in m.group(2).split(", "):
        s = STAGE_RE.match(part.strip())
        if not s:
            raise ValueError(f"unreadable stage {part!r} in the start-up report: {line.strip()!r}")
        stages[s.group(1)] = float(s.group(2))
    return {"total_s": float(m.group(1)), "stages": stages}


def peak_rss_mib(pid: int) -> Optional[float]:
    """The peak resident set (VmHWM) of process `pid` in MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _children(pid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry))
        except (OSError, ValueError):
            continue
    return out


def _argv(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_launcher(argv: List[str]) -> bool:
    return any(a in ("deepspeed.launcher.launch", "deepspeed.launcher.runner") or os.path.basename(a) == "deepspeed"
               for a in argv)


def rank_pids(root: int) -> List[int]:
    """The training processes under `root` (itself included): those running engine/train.py that are not the
    deepspeed launcher (which names the script among its own arguments)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        argv = _argv(pid)
        if any(a.endswith(os.path.join("engine", "train.py")) for a in argv) and not _is_launcher(argv):
            found.append(pid)
        else:
            todo += _children(pid)
    return sorted(found)


def train_options(recipe: str, data: str, out: str, batch: Optional[int], smoke: bool) -> List[str]:
    """--options for engine/train.py (on recipes/tiny_sherlock.yaml): `recipe`'s model and run set-up with random
    weights at real size (the tiny model in smoke mode) on a few synthetic Sherlock records."""
    from engine.config import load_recipe
    from step_ops import recipe_options

    r = load_recipe(recipe, [], check_files=False)
    b = batch or r.run.batch_size_train
    opts = recipe_options(recipe, data, out, steps=1, batch=b)
    if not smoke:
        opts += [f"model.model_type={r.model.model_type}", "model.pretrained=random",
                 f"model.max_txt_len={r.model.max_txt_len}"]
    return opts + ["run.num_workers=0"]


def measure(recipe: str = DEFAULT_RECIPE, *, engine: str = ROOT, ranks: int = 1, batch: Optional[int] = None,
            smoke: bool = False, options=(), timeout: float = 1800, log=print) -> Dict[str, Any]:
    """Launch engine/train.py of the checkout `engine` once; return its start-up figures (see the module doc)."""
    engine = os.path.abspath(engine)
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        opts = train_options(recipe, os.path.join(tmp, "data"), os.path.join(tmp, "run"), batch, smoke)
        script = os.path.join(engine, "engine", "train.py")
        args = ["--recipe", os.path.join(engine, "recipes", "tiny_sherlock.yaml"), "--options", *opts, *options]
        if ranks == 1:
            cmd = [sys.executable, "-u", script] + args
        else:
            launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
            cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(_free_port()), script] + args
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")}
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
        env["PYTHONUNBUFFERED"] = "1"
        lines: List[str] = []
        seen = threading.Event()

        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=engine, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: the launcher's ranks stop with it
        found_at = [None]

        def read():
            for line in proc.stdout:
                lines.append(line)
                if found_at[0] is None and parse_startup(line):
                    found_at[0] = time.perf_counter() - t0
                    seen.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        peaks: Dict[int, float] = {}
        try:
            while not seen.is_set():
                pids = rank_pids(proc.pid)
                for pid in pids:
                    v = peak_rss_mib(pid)
                    if v is not None:
                        peaks[pid] = max(peaks.get(pid, 0.0), v)
                if proc.poll() is not None and not seen.is_set():
                    reader.join(timeout=5)
                    if seen.is_set():
                        break
                    raise RuntimeError(f"engine/train.py ended (exit {proc.returncode}) before its first step:\n"
                                       + "".join(lines[-40:]))
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"no start-up report after {timeout:.0f} s:\n" + "".join(lines[-40:]))
                seen.wait(0.25)
            for pid in rank_pids(proc.pid):  # the peak up to the report: VmHWM never decreases
                v = peak_rss_mib(pid)
                if v is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), v)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the run itself is not needed: nothing to save
            proc.wait()
            reader.join(timeout=5)
    report = next(r for r in map(parse_startup, lines) if r)
    if len(peaks) != ranks:
        raise RuntimeError(f"found {len(peaks)} rank process(es), expected {ranks}")
    result = {"recipe": os.path.relpath(recipe, ROOT), "engine": engine, "commit": _commit(engine), "ranks": ranks,
              "device": _device(),
              "smoke": smoke, "options": list(options), "launch_to_first_step_s": round(found_at[0], 2),
              "startup_total_s": report["total_s"], "stages": report["stages"],
              "host_peak_mib_per_rank": [round(peaks[p], 1) for p in sorted(peaks)],
              "log_tail": [ln.rstrip() for ln in lines if "parameters" in ln or "start-up" in ln][-8:]}
    log(f"launch to first step {result['launch_to_first_step_s']:.1f} s; {report['stages']}; host peak per rank "
        f"{', '.join(f'{v / 1024:.2f} GiB' for v in result['host_peak_mib_per_rank'])}")
    return result


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit(path: str) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


STAGES = ("config", "imports and set-up", "distributed init", "model build/load", "base fingerprint", "datasets",
          "DeepSpeed init")


def table(results: List[Dict[str, Any]]) -> str:
    """One row per result; a column per stage any of them reported (the usual ones first)."""
    names = list(STAGES) + [s for r in results for s in r["stages"] if s not in STAGES]
    names = [s for s in dict.fromkeys(names) if any(s in r["stages"] for r in results)]
    head = ("| run | launch to first step (s) | " + " | ".join(f"{s} (s)" for s in names)
            + " | host peak per rank (GiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        stages = [r["stages"].get(s) for s in names]
        peak = ", ".join(f"{v / 1024:.2f}" for v in r["host_peak_mib_per_rank"])
        lines.append(f"| {r.get('label') or r.get('commit') or '-'} | {r['launch_to_first_step_s']:.1f} | "
                     + " | ".join("-" if s is None else f"{s:.1f}" for s in stages) + f" | {peak} |")
    return "\n".join(lines)


def section(results: List[Dict[str, Any]], command: str, machine: str) -> str:
    r = results[-1]
    text = (f"{SECTION}\n\n`{command}` on {machine}: {r['recipe']} with `model.pretrained: random` (its real "
            f"architecture), {r['ranks']} rank(s), launched as a user would and stopped at the engine's start-up "
            f"report, just before the first step (\"-\": a stage that run did not report). The host peak is VmHWM "
            f"of each rank's process.\n\n{table(results)}\n")
    if r.get("device", "cpu") == "cpu":
        text += ("\nOn this CPU-only machine the rank's device is the host, so the bf16 model itself stays in the "
                 "host peak. On a GPU (not measured here) engine/train.py draws the weights on the rank's GPU "
                 "under ZeRO-1/2 and partitions them while building under ZeRO-3: the host peak per rank would be "
                 "the process alone (Python, torch, the CUDA host side) plus one tensor at a time for the base "
                 "fingerprint, and the draw runs at GPU speed instead of on one CPU core; the fp32 host build it "
                 "replaces also had to be copied to the GPU by DeepSpeed.\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe whose model and run set-up start (default "
                                                            "recipes/sherlock_opt2.7b.yaml)")
    p.add_argument("--engine", default=ROOT, help="checkout whose engine/train.py runs (default: this one)")
    p.add_argument("--ranks", type=int, default=1, help="ranks (2 or more: the deepspeed launcher)")
    p.add_argument("--batch", type=int, help="micro batch (default: the recipe's)")
    p.add_argument("--label", help="the row's name in the table (default: the checkout's commit)")
    p.add_argument("--smoke", action="store_true", help="the tiny model: checks that the script runs")
    p.add_argument("--options", nargs="*", default=[], help="more --options for engine/train.py")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the first step")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--compare", nargs="*", default=[], metavar="JSON",
                   help="results of earlier runs (--json) to put above this one in the table")
    p.add_argument("--write", metavar="DOC", help="rewrite the 'Start-up' section of this markdown file")
    args = p.parse_args(argv)
    result = measure(args.recipe, engine=args.engine, ranks=args.ranks, batch=args.batch, smoke=args.smoke,
                     options=args.options, timeout=args.timeout)
    result["label"] = args.label
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    results = []
    for path in args.compare:
        with open(path, encoding="utf-8") as f:
            results.append(json.load(f))
    results.append(result)
    print(table(results))
    if args.write:
        from report import machine, write_section

        shown = ["python bench/startup.py"] + [a for a in (argv if argv is not None else sys.argv[1:])]
        write_section(args.write, SECTION, section(results, " ".join(shown), machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
