"""Exact resume after SIGKILL, crash-safe saves, and what a resume may change."""
import json
import os
import signal
import subprocess
import time

import pytest

from helpers import ROOT, losses_by_step, read_jsonl, run_train, tiny_options, train_command


def opts(tmp_path, name, *extra, ds="zero2.json"):
    return tiny_options(tmp_path, f"run.output_dir={tmp_path / name}", f"run.deepspeed=ds_configs/{ds}",
                        "run.precision=fp32", "run.max_epoch=2", "run.val_freq=0", "run.save_every_steps=4",
                        "run.num_workers=1", *extra, data_root=tmp_path / "data", n_train=96)


def kill_after_step(cmd, env, run_dir, step, timeout=300):
    """Start a run and SIGKILL its whole process group once ``step`` is logged."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps_file = os.path.join(run_dir, "steps.jsonl")
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if os.path.exists(steps_file) and any(s["step"] >= step for s in read_jsonl(steps_file)):
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before step {step}")
            time.sleep(0.05)
        else:
            pytest.fail("timed out waiting for the run")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("ds", ["zero2.json", "zero3.json"])
def test_sigkill_mid_epoch_then_resume_gives_identical_losses(tmp_path, ds):
    # As the real recipes: ViT and LLM frozen (the checkpoints hold only the Q-Former's weights and state; the
    # frozen ones come from the base), dropout on (the tiny models carry the official configs' dropout).
    frozen = ("model.freeze_vit=true", "model.freeze_llm=true")
    ref = run_train(opts(tmp_path, "ref", *frozen, ds=ds), ranks=2)
    assert ref.returncode == 0
    expected = losses_by_step(tmp_path / "ref")
    assert len(expected) == 12  # 96 samples / (2 ranks x 8) = 6 steps per epoch, 2 epochs

    cmd, env = train_command(opts(tmp_path, "killed", *frozen, ds=ds), ranks=2)
    kill_after_step(cmd, env, tmp_path / "killed", step=9)
    # the newest checkpoint is mid-epoch: the resume must restore the position inside the epoch
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step8"
    resumed = run_train(opts(tmp_path, "killed", *frozen, ds=ds), ranks=2, args=["--resume"])
    assert resumed.returncode == 0
    got = losses_by_step(tmp_path / "killed")
    assert got == expected  # bit-exact, step by step


def test_crash_during_save_keeps_previous_checkpoint_and_resumes(tmp_path):
    o = opts(tmp_path, "run", "run.max_epoch=1")
    crashed = run_train(o, env_extra={"ENGINE_FAULT": "crash_in_save:step4"})
    assert crashed.returncode == 86
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts / "latest").exists()  # nothing complete yet: step4 was the first save
    assert (ckpts / "step4").is_dir() and not (ckpts / "step4" / "COMPLETE").exists()
    again = run_train(o, args=["--resume"])
    assert again.returncode == 2 and "no complete checkpoint" in again.stderr
    crashed = run_train(o + ["run.overwrite_output_dir=true", "run.save_every_steps=2"],
                        env_extra={"ENGINE_FAULT": "crash_in_save:step4"})
    assert crashed.returncode == 86 and (ckpts / "latest").read_text() == "step2"
    resumed = run_train(o + ["run.save_every_steps=2"], args=["--resume"])
    assert resumed.returncode == 0
    assert "resumed from" in resumed.stdout and "step2" in resumed.stdout
    state = json.loads((ckpts / "epoch0" / "engine_state.json").read_text())
    assert state["global_step"] == 12
    assert (ckpts / "latest").read_text() == "epoch0"


def test_full_disk_gives_clear_error_and_keeps_previous(tmp_path):
    o = opts(tmp_path, "run", "run.max_epoch=1")
    proc = run_train(o + ["run.save_every_steps=2"], env_extra={"ENGINE_FAULT": "enospc_in_save:step4"})
    assert proc.returncode == 3
    assert "No space left on device" in proc.stderr and "previous checkpoint (step2) is intact" in proc.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step2" and not (ckpts / "step4").exists()


def test_resume_with_changed_recipe(tmp_path):
    o = opts(tmp_path, "run", "run.max_epoch=1", "run.max_steps=2")
    assert run_train(o).returncode == 0
    changed = run_train(o + ["run.init_lr=5e-4"], args=["--resume"])
    assert changed.returncode == 2
    assert "run.init_lr" in changed.stderr and "allow_recipe_change" in changed.stderr
    arch = run_train(o + ["model.freeze_vit=true", "run.allow_recipe_change=true"], args=["--resume"])
    assert arch.returncode == 2 and "model.freeze_vit" in arch.stderr and "cannot change" in arch.stderr
    ok = run_train(o + ["run.init_lr=5e-4", "run.allow_recipe_change=true", "run.max_steps=4"], args=["--resume"])
    assert ok.returncode == 0 and "run.init_lr" in ok.stdout


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_t5", "blip2_vicuna_instruct", "blip2_t5_instruct"])
def test_every_familys_dropout_draws_only_from_the_seeded_micro_batch_stream(arch):
    """The trainer seeds the model's generators before each micro-batch (seeding.micro_batch_seed): the
    training-mode loss is then a function of that seed alone, whatever else drew random numbers before."""
    import random

    import torch

    from engine.registry import MODELS
    from engine.trainer.seeding import micro_batch_seed, seed_model_rng

    model = MODELS.get(arch)(model_type="tiny", freeze_vit=True).train()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts, targets = ["inference: "] * 2, ["a red circle on the left", "a blue square"]

    def loss(chunk, disturb):
        torch.rand(disturb)  # e.g. a DataLoader or an evaluation that drew from the global generator
        random.random()
        seed_model_rng(micro_batch_seed(42, 1, chunk), torch.device("cpu"))
        with torch.no_grad():
            return float(model(images, prompts, targets))

    assert loss(3, 1) == loss(3, 1000)  # the same micro-batch: the same dropout masks
    assert loss(3, 1) != loss(4, 1)  # the real configs' dropout is on: another micro-batch, other masks
    model.eval()
    with torch.no_grad():
        assert float(model(images, prompts, targets)) == float(model(images, prompts, targets))
