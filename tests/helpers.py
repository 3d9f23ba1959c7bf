"""Shared helpers for tests that run the real entry point."""
import importlib.util
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "recipes", "tiny_sherlock.yaml")


def load_script(folder: str, name: str):
    """A script of bench/, tools/ or tests/golden/ (not a package) as a module (its main(argv) runs the CLI in
    this process)."""
    module_name = f"{folder}_{name}".replace("/", "_")
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_options(tmp_path, *extra, data_root=None, n_train=192, n_val=16):
    """Options that shrink the embedded default to a few seconds of training."""
    return [
        f"run.output_dir={tmp_path / 'run'}",
        f"datasets.sherlock.root={data_root or (tmp_path / 'data')}",
        f"datasets.sherlock.synthetic={n_train}",
        f"datasets.sherlock.synthetic_val={n_val}",
        "run.batch_size_train=8", "run.batch_size_eval=8", "run.num_workers=0", "run.warmup_steps=2",
        "run.num_beams=1", "run.max_len=8", "run.log_freq=1",
        *extra,
    ]


def train_command(options, ranks=None, recipe=TINY, args=(), script=None):
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1" if ranks and ranks > 1 else env.get("OMP_NUM_THREADS", "2")
    script = script or os.path.join(ROOT, "engine", "train.py")
    if ranks:
        launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), script]
    else:
        env = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        cmd = [sys.executable, script]
    return cmd + ["--recipe", recipe, *args, "--options", *options], env


def run_train(options, ranks=None, timeout=600, recipe=TINY, args=(), env_extra=None, script=None):
    """Run engine/train.py (under the deepspeed launcher when ``ranks`` is given); return the CompletedProcess."""
    cmd, env = train_command(options, ranks=ranks, recipe=recipe, args=args, script=script)
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:])
        print(proc.stderr[-6000:])
    return proc


def read_jsonl(path):
    with open(path, "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_by_step(run_dir):
    """{step: loss}; a step logged twice (before a crash and after the resume) keeps its last value."""
    return {s["step"]: s["loss"] for s in read_jsonl(os.path.join(run_dir, "steps.jsonl"))}
