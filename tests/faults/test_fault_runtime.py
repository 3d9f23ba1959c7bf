"""Faults during training, injected into the real entry point: non-finite losses, an image that goes bad
after the dataset check, SIGTERM mid-epoch then resume, and a rank that raises on a two-rank run."""
import hashlib
import json
import math
import os
import signal
import subprocess
import time

import pytest

from helpers import ROOT, losses_by_step, read_jsonl, run_train, tiny_options, train_command


def opts(tmp_path, name, *extra):
    """Single process, fp32, one epoch of 12 steps (96 samples / batch 8)."""
    return tiny_options(tmp_path, f"run.output_dir={tmp_path / name}", "run.precision=fp32", "run.max_epoch=1",
                        "run.val_freq=0", "run.num_workers=1", *extra, data_root=tmp_path / "data", n_train=96)


def engine_state(run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text()
    return latest, json.loads((run_dir / "checkpoints" / latest / "engine_state.json").read_text())


def test_one_nan_loss_is_skipped_and_logged(tmp_path):
    proc = run_train(opts(tmp_path, "run", "run.max_steps=5"), env_extra={"ENGINE_FAULT": "nan_loss_at_step:3"})
    assert proc.returncode == 0
    bad = read_jsonl(tmp_path / "run" / "bad_steps.jsonl")
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["loss"] == "nan" and len(bad[0]["sample_ids"]) == 8
    losses = losses_by_step(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4, 5] and all(math.isfinite(v) for v in losses.values())
    # the skipped batch was not trained on: step 3 is the next batch, and the run still made 5 steps
    assert engine_state(tmp_path / "run")[1]["micro_in_epoch"] == 6


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero2_offload.json", "zero3.json"])
def test_a_nan_gradient_under_a_finite_loss_is_never_applied(tmp_path, ds_config):
    """bf16 ZeRO-2, DeepSpeed's per-tensor overflow checks off (with CPU offload too: its per-tensor flag and
    host-summed norm replaced): the one check on the gradient norm skips the step. ZeRO-3: DeepSpeed's step
    drops the update on its non-finite norm, and the trainer counts it as the bad step it is."""
    o = opts(tmp_path, "run", "run.max_steps=4", "run.precision=bf16", f"run.deepspeed=ds_configs/{ds_config}")
    proc = run_train(o, env_extra={"ENGINE_FAULT": "nan_grad_at_step:2"})
    assert proc.returncode == 0
    bad = read_jsonl(tmp_path / "run" / "bad_steps.jsonl")
    assert [b["step"] for b in bad] == [2] and bad[0]["loss"] != "nan"  # the loss was finite
    losses = losses_by_step(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    steps = read_jsonl(tmp_path / "run" / "steps.jsonl")
    assert all(math.isfinite(s["grad_norm"]) for s in steps)  # no step was taken with the NaN gradient
    assert engine_state(tmp_path / "run")[1]["micro_in_epoch"] == 5  # the skipped batch was not a step


def test_nan_losses_in_a_row_stop_the_run_with_a_checkpoint(tmp_path):
    proc = run_train(opts(tmp_path, "run", "run.max_bad_steps=2"), env_extra={"ENGINE_FAULT": "nan_loss_from_step:3"})
    assert proc.returncode == 5
    assert "run.max_bad_steps" in proc.stderr and "--resume" in proc.stderr
    assert [b["step"] for b in read_jsonl(tmp_path / "run" / "bad_steps.jsonl")] == [3, 3]
    tag, state = engine_state(tmp_path / "run")
    assert state["global_step"] == 2 and state["micro_in_epoch"] == 4  # the weights of the last good step


def test_nan_loss_with_accumulation_keeps_the_step_boundary(tmp_path):
    proc = run_train(opts(tmp_path, "run", "run.accum_grad_iters=2", "run.max_steps=3"),
                     env_extra={"ENGINE_FAULT": "nan_loss_at_step:2"})
    assert proc.returncode == 0
    assert [b["step"] for b in read_jsonl(tmp_path / "run" / "bad_steps.jsonl")] == [2]
    losses = losses_by_step(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert engine_state(tmp_path / "run")[1]["micro_in_epoch"] == 6  # 3 steps x 2 micro-batches, none extra


def corrupt(index):
    return {"ENGINE_FAULT": f"corrupt_image:{hashlib.md5(f'tiny-sherlock-{index}'.encode()).hexdigest()}"}


def test_image_unreadable_mid_run_is_replaced_and_recorded(tmp_path):
    proc = run_train(opts(tmp_path, "run", "run.max_bad_samples=1"), env_extra=corrupt(5))
    assert proc.returncode == 0
    bad = read_jsonl(tmp_path / "run" / "bad_samples.jsonl")
    assert len(bad) == 1 and bad[0]["sample_id"] == corrupt(5)["ENGINE_FAULT"].split(":")[1]
    assert bad[0]["replaced_by"] and bad[0]["replaced_by"] != bad[0]["sample_id"] and "cannot read" in bad[0]["error"]
    assert len(losses_by_step(tmp_path / "run")) == 12


def test_unreadable_images_beyond_the_limit_stop_the_run_after_saving(tmp_path):
    proc = run_train(opts(tmp_path, "run"), env_extra=corrupt(5))  # run.max_bad_samples defaults to 0
    assert proc.returncode == 5
    assert "run.max_bad_samples" in proc.stderr
    assert len(read_jsonl(tmp_path / "run" / "bad_samples.jsonl")) == 1
    tag, state = engine_state(tmp_path / "run")
    assert tag == f"step{state['global_step']}" and state["global_step"] < 12


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    assert run_train(opts(tmp_path, "ref")).returncode == 0
    expected = losses_by_step(tmp_path / "ref")
    assert len(expected) == 12

    cmd, env = train_command(opts(tmp_path, "run"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = tmp_path / "run" / "steps.jsonl"
    deadline = time.time() + 180
    while not (steps.exists() and any(s["step"] >= 5 for s in read_jsonl(steps))):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before step 5"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 4, err[-3000:]
    assert "interrupted" in err and "--resume" in err
    tag, state = engine_state(tmp_path / "run")
    assert tag == f"step{state['global_step']}" and 5 <= state["global_step"] < 12

    resumed = run_train(opts(tmp_path, "run"), args=["--resume"])
    assert resumed.returncode == 0
    assert losses_by_step(tmp_path / "run") == expected  # bit for bit, step by step


def test_a_rank_that_raises_stops_both_ranks(tmp_path):
    start = time.time()
    o = tiny_options(tmp_path, "run.precision=fp32", "run.max_epoch=1", "run.val_freq=0", n_train=64)
    proc = run_train(o, ranks=2, timeout=240, env_extra={"ENGINE_FAULT": "raise_at_step:1:2"})
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "error on rank 1" in output and "injected failure on rank 1 at step 2" in output
    assert time.time() - start < 240
