"""What a run leaves for people to read: every step in steps.jsonl and TensorBoard although the loop writes
them in windows of log_freq steps; tools/plot_run.py turns the logs into PNGs; the per-sample seeding of
training batches is the same in the main process and in DataLoader workers."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, read_jsonl, run_train, tiny_options

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run: 6 optimizer steps written every 4 (plus the first and the epoch's end), one evaluation."""
    tmp = tmp_path_factory.mktemp("logs")
    proc = run_train(tiny_options(tmp, "run.max_epoch=1", "run.log_freq=4", n_train=48, n_val=8))
    assert proc.returncode == 0
    return tmp / "run"


def test_every_step_is_logged_when_written_in_windows(run_dir):
    steps = read_jsonl(run_dir / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    for s in steps:
        assert s["loss"] > 0 and s["lr"] > 0 and s["grad_norm"] > 0 and s["samples_per_s"] > 0
        assert s["peak_mem_gb"] > 0 and 0 < s["epoch"] <= 1
    assert steps[-1]["epoch"] == 1.0
    # steps 2-4 were written together: they share the window's throughput
    assert steps[1]["samples_per_s"] == steps[2]["samples_per_s"] == steps[3]["samples_per_s"]
    log = (run_dir / "train.log").read_text()
    assert "step 1 " in log and "step 4 " in log and "step 6 " in log

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s"):
        assert [e.step for e in tb.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag
    assert [round(e.value, 5) for e in tb.Scalars("train/loss")] == [round(s["loss"], 5) for s in steps]


def test_plot_run_writes_non_empty_pngs(run_dir, tmp_path):
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), str(run_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(out))
    assert names == ["grad_norm.png", "loss.png", "lr.png", "metrics_val.png", "throughput.png"]
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert proc.stdout.split() == [str(out / n) for n in ("loss.png", "lr.png", "grad_norm.png", "throughput.png",
                                                          "metrics_val.png")]


def test_plot_run_refuses_a_folder_without_logs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "neither steps.jsonl nor metrics.jsonl" in proc.stderr


class _Draws(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i, random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seeded_batches_are_the_same_in_the_main_process_and_in_workers():
    from engine.trainer.seeding import SeededDataset, SeededSampler

    dataset = SeededDataset(_Draws())
    keys = list(SeededSampler(range(12), seed=3, epoch=1))

    def draws(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, sampler=keys, collate_fn=list)
        return [s for batch in loader for s in batch]

    def reseed_and_draw(load=None):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        got = load() if load else None
        return got, (float(torch.rand(1)), random.random(), float(np.random.rand()))

    _, untouched = reseed_and_draw()
    batch, after = reseed_and_draw(lambda: dataset.__getitems__(keys[:4]))
    # the caller's generators are as they were (training draws the same dropout masks with or without workers)
    assert after == untouched
    in_main = draws(0)
    assert in_main[:4] == batch and in_main == draws(2)
    assert [dataset[k] for k in keys] == in_main
    assert len({round(s[1], 9) for s in in_main}) == 12  # each sample its own seed
