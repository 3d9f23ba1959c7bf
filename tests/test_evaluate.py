"""Evaluation without training: tools/evaluate.py on engine checkpoints and exported folders, ZeRO-2 vs ZeRO-3."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, run_train, tiny_options

EVALUATE = os.path.join(ROOT, "tools", "evaluate.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short fp32 ZeRO-2 run with evaluation, and its export to a Hugging Face folder."""
    tmp = tmp_path_factory.mktemp("trained")
    opts = tiny_options(tmp, "run.precision=fp32", "run.max_epoch=1", "run.num_beams=2", "run.max_len=10",
                        n_train=128, n_val=12)
    assert run_train(opts).returncode == 0
    ckpt = tmp / "run" / "checkpoints" / "epoch0"
    hf = tmp / "hf"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_hf.py"), str(ckpt), str(hf)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, opts, ckpt, hf


def predictions(run_dir, name):
    with open(os.path.join(run_dir, "predictions", name), "r", encoding="utf-8") as f:
        return [(p["sample_id"], p["caption"]) for p in json.load(f)]


def test_evaluate_engine_checkpoint_reproduces_training_time_predictions(trained, tmp_path):
    tmp, opts, ckpt, _ = trained
    during_training = predictions(tmp / "run", "val_epoch0.json")
    proc = run_train([o for o in opts if not o.startswith("run.output_dir")], script=EVALUATE,
                     args=["--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "eval")])
    assert proc.returncode == 0
    assert predictions(tmp_path / "eval", "val_eval.json") == during_training
    metrics = [json.loads(line) for line in open(tmp_path / "eval" / "metrics.jsonl")]
    assert metrics[0]["split"] == "val" and metrics[0]["CIDEr"] >= 0


@pytest.mark.parametrize("ds", ["zero2.json", "zero3.json"])
def test_exported_model_evaluates_identically_under_zero2_and_zero3_on_two_ranks(trained, tmp_path, ds):
    tmp, opts, _, hf = trained
    during_training = predictions(tmp / "run", "val_epoch0.json")
    base = [o for o in opts if not o.startswith("run.output_dir")]
    proc = run_train(base + [f"run.deepspeed=ds_configs/{ds}", "model.image_size=64"], ranks=2, script=EVALUATE,
                     args=["--checkpoint", str(hf), "--output_dir", str(tmp_path / "eval")],
                     recipe=os.path.join(ROOT, "recipes", "tiny_sherlock.yaml"))
    assert proc.returncode == 0
    got = predictions(tmp_path / "eval", "val_eval.json")
    assert len(got) == 12 and len({sid for sid, _ in got}) == 12  # every sample exactly once
    assert got == during_training
