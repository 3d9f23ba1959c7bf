"""PNG plots of a run's logs, for a look without TensorBoard.

    python tools/plot_run.py runs/tiny_sherlock-20250101-120000
    python tools/plot_run.py runs/opt27b --out /tmp/opt27b-plots

Reads RUN_DIR/steps.jsonl (one line per optimizer step: loss, lr, grad_norm, samples_per_s, ...) and
RUN_DIR/metrics.jsonl (one line per evaluation of a split), and writes into --out (default RUN_DIR/plots):
loss.png (per step, with a moving average), lr.png, grad_norm.png, throughput.png (samples/s) and
metrics_<split>.png (each evaluation metric against the step). A step logged twice (the same step run
again after a resume) is drawn once, with its last value, as the run continued from it.
Needs matplotlib (pip install -e .[plots]).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict, deque
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_jsonl(path: str) -> List[dict]:
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # The last line of a run that was killed while writing may be cut; anything else is not ours.
                print(f"warning: {path}:{n} is not JSON; skipped", file=sys.stderr)
    return rows


def last_per_step(rows: List[dict]) -> List[dict]:
    """One row per step, the last one written, ordered by step."""
    by_step: Dict[int, dict] = {}
    for r in rows:
        if "step" in r:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total, q = [], 0.0, deque()
    for v in values:
        q.append(v)
        total += v
        if len(q) > window:
            total -= q.popleft()
        out.append(total / len(q))
    return out


def _figure(title: str, xlabel: str = "optimizer step", ylabel: str = ""):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_steps(steps: List[dict], out: str, name: str) -> List[str]:
    written = []

    def series(key):
        pts = [(s["step"], s[key]) for s in steps if isinstance(s.get(key), (int, float)) and math.isfinite(s[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    xs, loss = series("loss")
    if loss:
        fig, ax = _figure(f"training loss: {name}", ylabel="loss (mean over ranks)")
        window = max(1, len(loss) // 50)
        ax.plot(xs, loss, lw=0.8, alpha=0.45 if window > 1 else 1.0, label="per step")
        if window > 1:
            ax.plot(xs, moving_average(loss, window), lw=1.8, label=f"moving average ({window} steps)")
        ax.legend()
        written.append(_save(fig, os.path.join(out, "loss.png")))
    for key, title, ylabel, fname, log in (
        ("lr", "learning rate", "lr", "lr.png", False),
        ("grad_norm", "gradient norm (before clipping)", "global L2 norm", "grad_norm.png", True),
        ("samples_per_s", "throughput", "samples/s (all ranks)", "throughput.png", False),
    ):
        xs, ys = series(key)
        if not ys:
            continue
        fig, ax = _figure(f"{title}: {name}", ylabel=ylabel)
        ax.plot(xs, ys, lw=1.2)
        if log and min(ys) > 0 and max(ys) / min(ys) > 100:
            ax.set_yscale("log")
        written.append(_save(fig, os.path.join(out, fname)))
    if not written and steps:
        print("warning: steps.jsonl has no loss, lr, grad_norm or samples_per_s values", file=sys.stderr)
    return written


def plot_metrics(evals: List[dict], out: str, name: str) -> List[str]:
    import matplotlib.pyplot as plt

    by_split: "OrderedDict[str, List[dict]]" = OrderedDict()
    for e in evals:
        by_split.setdefault(str(e.get("split", "eval")), []).append(e)
    written = []
    for split, rows in by_split.items():
        # Keep the last evaluation of a step (an evaluation repeated after a resume).
        rows = last_per_step(rows)
        keys = [k for k in rows[-1] if k not in ("step", "epoch", "split") and isinstance(rows[-1][k], (int, float))]
        if not keys:
            continue
        cols = min(3, len(keys))
        nrows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), dpi=100, squeeze=False)
        for i, key in enumerate(keys):
            ax = axes[i // cols][i % cols]
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1.2)
            ax.set_title(key)
            ax.set_xlabel("optimizer step")
            ax.grid(True, alpha=0.3)
        for j in range(len(keys), nrows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.suptitle(f"{split} metrics: {name}")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)
        written.append(_save(fig, os.path.join(out, f"metrics_{safe}.png")))
    return written


def plot_run(run_dir: str, out: str = None) -> List[str]:
    """Write the plots of ``run_dir``; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    steps_path = os.path.join(run_dir, "steps.jsonl")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(steps_path) and not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{run_dir} has neither steps.jsonl nor metrics.jsonl: not a run folder of this "
                                f"engine (its run.output_dir), or no step has been logged yet")
    out = out or os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    name = os.path.basename(os.path.normpath(run_dir))
    written = []
    if os.path.isfile(steps_path):
        written += plot_steps(last_per_step(read_jsonl(steps_path)), out, name)
    if os.path.isfile(metrics_path):
        written += plot_metrics(read_jsonl(metrics_path), out, name)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (holds steps.jsonl, metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: tools/plot_run.py needs matplotlib: pip install matplotlib (or pip install -e .[plots])",
              file=sys.stderr)
        return 2
    try:
        written = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    if not written:
        print("nothing to plot: the logs hold no numeric values yet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
