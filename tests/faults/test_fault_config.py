"""Bad configuration: each case stops before the first step with exit code 2 and a message that names the
key or path and the fix."""
import json

from helpers import run_train, tiny_options


def fails(proc, *texts):
    assert proc.returncode == 2, proc.stderr[-3000:]
    for text in texts:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr


def test_missing_weights_folder(tmp_path):
    proc = run_train(tiny_options(tmp_path, "model.model_type=pretrain_opt2.7b", "model.pretrained=/nonexistent"))
    fails(proc, "/nonexistent", "model.pretrained")


def test_checkpoint_of_another_arch(tmp_path):
    opt = tmp_path / "blip2-opt"  # the config.json of an exported OPT model is what the check reads first
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {"model_type": "opt"}}))
    proc = run_train(tiny_options(tmp_path, "model.arch=blip2_t5", "model.model_type=pretrain_flant5xl",
                                  f"model.pretrained={opt}", "run.precision=fp32"))
    fails(proc, str(opt), "'opt'", "'t5'", "model.arch")


def test_ds_config_contradicts_recipe(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    proc = run_train(tiny_options(tmp_path, f"run.deepspeed={ds}"))
    fails(proc, "train_micro_batch_size_per_gpu", "run.batch_size_train")


def test_too_few_samples_for_the_batch(tmp_path):
    proc = run_train(tiny_options(tmp_path, "run.batch_size_train=64", n_train=32))
    fails(proc, "32 samples", "run.batch_size_train")


def test_dataset_root_missing(tmp_path):
    proc = run_train(tiny_options(tmp_path, "datasets.sherlock.synthetic=0", data_root="/nonexistent/sherlock"))
    fails(proc, "/nonexistent/sherlock")


def test_output_dir_holds_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: {}\n")
    proc = run_train(tiny_options(tmp_path))
    fails(proc, str(out), "--resume", "run.overwrite_output_dir")


def test_fault_limits_must_be_positive(tmp_path):
    proc = run_train(tiny_options(tmp_path, "run.max_bad_steps=0", "run.dist_timeout_s=0"))
    fails(proc, "max_bad_steps (0)", "dist_timeout_s (0)")
