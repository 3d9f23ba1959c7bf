"""The real entry point, end to end, on the tiny default (DeepSpeed on CPU)."""
import glob
import json
import os
import re

import pytest

from helpers import read_jsonl, run_train, tiny_options


def assert_loss_falls(run_dir, factor=0.8):
    steps = read_jsonl(os.path.join(run_dir, "steps.jsonl"))
    assert len(steps) >= 6
    first = sum(s["loss"] for s in steps[:3]) / 3
    last = sum(s["loss"] for s in steps[-3:]) / 3
    assert last < factor * first, (first, last)
    for key in ("lr", "grad_norm", "samples_per_s", "peak_mem_gb"):
        assert key in steps[-1]
    return steps


def test_single_process_train_with_evaluation_and_best(tmp_path):
    # Plain `python engine/train.py` (no launcher), ZeRO-2, bf16, evaluation after each of 2 epochs.
    proc = run_train(tiny_options(tmp_path, "run.max_epoch=2"))
    assert proc.returncode == 0
    run = tmp_path / "run"
    steps = assert_loss_falls(run)
    assert len(steps) == 2 * (192 // 8)
    assert steps[0]["lr"] < steps[3]["lr"]  # warmup
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"Bleu_4", "CIDEr", "METEOR", "ROUGE_L"} <= set(metrics[0])
    preds = json.load(open(run / "predictions" / "val_epoch1.json"))
    assert len(preds) == 16 and len({p["sample_id"] for p in preds}) == 16
    # best follows the metric: it points at the epoch with the higher CIDEr + Bleu_4.
    scores = {m["epoch"]: m["CIDEr"] + m["Bleu_4"] for m in metrics}
    best_epoch = max(scores, key=lambda e: (scores[e], -e))
    assert os.readlink(run / "checkpoints" / "best") == f"epoch{best_epoch - 1}"
    assert (run / "checkpoints" / "latest").read_text() == "epoch1"
    assert glob.glob(str(run / "tb" / "events.out.tfevents.*"))
    assert (run / "config.yaml").exists() and (run / "train.log").exists()
    # The start-up report: each stage's time, logged before the first step.
    log = (run / "train.log").read_text()
    report = re.search(r"start-up took ([\d.]+) s: (.*)", log)
    assert report and log.index("start-up took") < log.index("step 1 epoch")
    stages = dict(part.rsplit(" ", 2)[:2] for part in report.group(2).split(", "))  # "name 1.2 s"
    assert {"config", "distributed init", "model build/load", "datasets", "DeepSpeed init"} <= set(stages)
    assert sum(map(float, stages.values())) == pytest.approx(float(report.group(1)), abs=0.1 * len(stages))


def test_refuses_to_overwrite_a_previous_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("an earlier run")
    proc = run_train(tiny_options(tmp_path, "run.max_epoch=1"))
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert (run / "train.log").read_text() == "an earlier run"


def test_invalid_recipe_exits_2_before_building(tmp_path):
    proc = run_train(tiny_options(tmp_path, "run.init_lrr=1", "model.arch=blip2_opp"))
    assert proc.returncode == 2
    assert "run.init_lrr: unknown key; did you mean 'init_lr'?" in proc.stderr
    assert "did you mean 'blip2_opt'" in proc.stderr.lower() or "Did you mean 'blip2_opt'" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ds_config,extra", [
    ("zero2.json", []),
    ("zero3.json", ["run.val_freq=1"]),
    ("zero3_offload.json", ["run.precision=fp32"]),
])
def test_two_ranks_under_the_deepspeed_launcher(tmp_path, ds_config, extra):
    opts = tiny_options(tmp_path, f"run.deepspeed=ds_configs/{ds_config}", "run.max_epoch=2", "run.val_freq=0",
                        *extra)
    proc = run_train(opts, ranks=2)
    assert proc.returncode == 0
    run = tmp_path / "run"
    steps = assert_loss_falls(run)
    assert len(steps) == 2 * (192 // (2 * 8))  # 2 ranks share each epoch
    assert glob.glob(str(run / "tb" / "events.out.tfevents.*"))
    ckpt = run / "checkpoints" / "epoch1"
    assert (ckpt / "COMPLETE").exists()
    # one optimizer shard per rank: ZeRO really partitioned across the two processes
    assert len(glob.glob(str(ckpt / "*optim_states.pt"))) == 2
    if "run.val_freq=1" in extra:
        metrics = read_jsonl(run / "metrics.jsonl")
        assert len(metrics) == 2
        preds = json.load(open(run / "predictions" / "val_epoch1.json"))
        assert sorted(p["sample_id"] for p in preds) == sorted({p["sample_id"] for p in preds})
        assert len(preds) == 16
