"""Run logging: a plain log file, TensorBoard scalars/text and a JSONL of metrics (rank 0 only)."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger("engine")


def setup_logging(output_dir: Optional[str], rank: int, where: str = "") -> None:
    """Console on rank 0 (warnings elsewhere) plus ``output_dir/train.log`` on rank 0. The other ranks'
    lines name the rank and node (``where``), so warnings from a many-node job say where they happened."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    if rank != 0:
        label = (where or f"rank {rank}").replace("%", "%%")
        console.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [{label}]: %(message)s",
                                               "%H:%M:%S"))
    else:
        console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    if output_dir and rank == 0:
        fh = logging.FileHandler(os.path.join(output_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RunLog:
    """Writes step and eval metrics; a no-op on ranks other than 0."""

    def __init__(self, output_dir: str, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.steps_path = os.path.join(output_dir, "steps.jsonl")
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # here: only the logging rank loads tensorboard

            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def step(self, step: int, values: Dict[str, float]) -> None:
        self.steps([(step, values)])

    def steps(self, rows: List[Tuple[int, Dict[str, float]]]) -> None:
        """Optimizer steps' scalars: one steps.jsonl line and one TensorBoard event (all the step's
        scalars, under train/) per step; five times cheaper than an add_scalar call per value."""
        if not self.enabled or not rows:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary  # here: only the logging rank loads it

        writer = self.tb._get_file_writer()
        for step, values in rows:
            summary = Summary(value=[Summary.Value(tag=f"train/{k}", simple_value=float(v)) for k, v in values.items()])
            writer.add_summary(summary, step)
        with open(self.steps_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"step": step, **values}) + "\n" for step, values in rows))

    def eval(self, step: int, epoch: int, split: str, metrics: Dict[str, float], samples=None) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)
        if samples:
            lines = [f"**{s.get('sample_id')}**: {s['caption']}" if "caption" in s else json.dumps(s)
                     for s in samples]
            self.tb.add_text(f"{split}/predictions", "\n\n".join(lines), step)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "split": split, **metrics}) + "\n")
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
