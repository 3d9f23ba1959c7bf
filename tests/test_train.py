"""The real entry point, end to end, on the tiny default (DeepSpeed on CPU)."""
import glob
import json
import os
import re

import pytest
import torch
import yaml

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


def test_auto_micro_batch_is_measured_and_stepped_down_keeping_the_global_batch(tmp_path):
    """run.batch_size_train: auto through engine/train.py: the planner's micro batch (on a CPU, the largest
    divisor up to 16: 8) is then run once at the longest texts; micro batches that run out of memory
    (ENGINE_FAULT auto_batch_oom:2 makes 8 and 4 do so) step down to 2, and accumulation keeps the global
    batch of 8: the same number of optimizer steps, DeepSpeed stepping every 4 micro-batches."""
    opts = tiny_options(tmp_path, "run.max_epoch=1", "run.batch_size_train=auto", "run.global_batch_size=8",
                        "run.valid_splits=[]", n_train=64)
    proc = run_train(opts, env_extra={"ENGINE_FAULT": "auto_batch_oom:2"})
    assert proc.returncode == 0
    run = tmp_path / "run"
    log = (run / "train.log").read_text()
    assert ("run.batch_size_train: auto: micro batch 2 x 4 accumulation (planned 8; measured 8: out of memory; "
            "4: out of memory; 2: ran)") in log
    saved = yaml.safe_load((run / "config.yaml").read_text())["run"]
    assert (saved["batch_size_train"], saved["accum_grad_iters"]) == (2, 4)
    steps = read_jsonl(run / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 64 // 8 + 1))  # 8 optimizer steps of 8 samples


def test_the_micro_batch_probe_trains_nothing_and_reaches_the_longest_texts():
    from engine.models.blip2 import build_vlm
    from engine.trainer.auto_batch import forward_backward_peak, probe_batch

    model = build_vlm("blip2_t5_instruct", model_type="tiny", max_txt_len=24, max_output_txt_len=12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert forward_backward_peak(model, 3, "cpu") is None  # ran; no CUDA memory to read on a CPU
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in model.named_parameters())
    pixels, inputs = probe_batch(model, 3, "cpu")
    assert pixels.shape == (3, 3, model.image_size, model.image_size)
    assert inputs["input_ids"].shape[1] == model.num_query_tokens + 24  # the prompt, cut at max_txt_len
    assert inputs["labels"].shape == (3, 12)  # the target, cut at max_output_txt_len


def test_a_failed_start_is_set_aside_so_the_corrected_command_runs_in_the_same_folder(tmp_path):
    """A start that fails before its first step (here: no data where the recipe points, nothing to generate)
    moves its config.yaml and train.log to failed-starts/<time>/ with the error; the corrected command then
    runs in the same run.output_dir. A folder with a run in it is still refused."""
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tiny_options(tmp_path, "run.max_steps=2", "run.valid_splits=[]", "datasets.sherlock.synthetic=0",
                       data_root=empty)
    proc = run_train(bad)
    assert proc.returncode == 2 and "can be used again" in proc.stderr
    run = tmp_path / "run"
    assert os.listdir(run) == ["failed-starts"]
    (aside,) = (run / "failed-starts").iterdir()
    assert sorted(os.listdir(aside)) == ["config.yaml", "train.log"]
    assert "start failed: error:" in (aside / "train.log").read_text()
    good = run_train(tiny_options(tmp_path, "run.max_steps=2", "run.valid_splits=[]"))
    assert good.returncode == 0, good.stderr[-2000:]
    assert (run / "checkpoints").is_dir() and len(list((run / "failed-starts").iterdir())) == 1
    again = run_train(tiny_options(tmp_path, "run.max_steps=2", "run.valid_splits=[]"))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (run / "checkpoints").is_dir() and len(list((run / "failed-starts").iterdir())) == 1


def test_zero3_trains_as_zero2_with_partitioned_query_tokens(tmp_path):
    """Under ZeRO-3 the training forward is the same lean one as under ZeRO-2: query_tokens (the BLIP-2 model's
    own parameter, used outside its forward) is gathered for the wrapper's forward. With every parameter
    partitioned (persistence threshold 0) the losses of three fp32 steps are ZeRO-2's."""
    cfg = json.load(open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "ds_configs", "zero3.json")))
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(cfg))
    losses = {}
    for name, ds in (("z2", "ds_configs/zero2.json"), ("z3", str(tmp_path / "z3.json"))):
        opts = tiny_options(tmp_path, f"run.output_dir={tmp_path / name}", "run.max_steps=3", "run.precision=fp32",
                            "run.valid_splits=[]", f"run.deepspeed={ds}", n_train=64)
        proc = run_train(opts)
        assert proc.returncode == 0
        losses[name] = [s["loss"] for s in read_jsonl(tmp_path / name / "steps.jsonl")]
    assert len(losses["z3"]) == 3
    assert losses["z3"] == pytest.approx(losses["z2"], rel=1e-5)


def test_resume_ckpt_path_takes_what_the_tools_take(tmp_path):
    """run.resume_ckpt_path accepts checkpoints/latest (DeepSpeed's pointer file) or the run folder, as the tools
    do; a path that names no checkpoint is an error naming the key, before anything is written."""
    first = run_train(tiny_options(tmp_path, "run.max_steps=2", "run.valid_splits=[]", n_train=64))
    assert first.returncode == 0
    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert latest.is_file()
    for name, given in (("from_pointer", latest), ("from_run", tmp_path / "run")):
        proc = run_train(tiny_options(tmp_path, f"run.output_dir={tmp_path / name}", "run.max_steps=3",
                                      "run.valid_splits=[]", f"run.resume_ckpt_path={given}",
                                      "run.allow_recipe_change=true", n_train=64))  # max_steps 2 -> 3
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert [s["step"] for s in read_jsonl(tmp_path / name / "steps.jsonl")] == [3]  # went on from step 2
    bad = run_train(tiny_options(tmp_path, f"run.output_dir={tmp_path / 'bad'}", "run.valid_splits=[]",
                                 f"run.resume_ckpt_path={tmp_path / 'nowhere'}", n_train=64))
    assert bad.returncode == 2 and "run.resume_ckpt_path" in bad.stderr and "does not exist" in bad.stderr
    assert not (tmp_path / "bad").exists()
