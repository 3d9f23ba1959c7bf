"""Several nodes (two launchers with --no_ssh on this machine), and resuming on another number of ranks or
ZeRO stage through DeepSpeed's universal checkpoint."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, TINY, free_port, losses_by_step, run_train, tiny_options
from engine.config import load_recipe
from engine.trainer.reshape import SavedLayout, check_global_batch, keep_global_batch


def opts(tmp_path, name, *extra, ds="zero2.json", data=None):
    # 96 samples / (2 ranks x 8) = 6 steps per epoch, 2 epochs; a checkpoint every 4 steps, all kept.
    return tiny_options(tmp_path, f"run.output_dir={tmp_path / name}", f"run.deepspeed=ds_configs/{ds}",
                        "run.precision=fp32", "run.max_epoch=2", "run.val_freq=0", "run.save_every_steps=4",
                        "run.keep_last=0", *extra, data_root=data or (tmp_path / "data"), n_train=96)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Uninterrupted single-node 2-rank runs under ZeRO-2 and ZeRO-3 (the ZeRO-2 one keeps its checkpoints)."""
    tmp = tmp_path_factory.mktemp("multinode")
    for ds in ("zero2", "zero3"):
        proc = run_train(opts(tmp, ds, ds=f"{ds}.json"), ranks=2)
        assert proc.returncode == 0
    return tmp


def launch_two_nodes(options, timeout=300):
    """Two deepspeed launchers, one per "node" (--no_ssh, as SLURM or Kubernetes start them), 1 rank each."""
    hostfile = os.path.join(options_dir(options), "hostfile")
    os.makedirs(os.path.dirname(hostfile), exist_ok=True)
    with open(hostfile, "w") as f:
        f.write("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    procs = []
    for node, node_options in enumerate(options if isinstance(options[0], list) else [options, options]):
        cmd = [launcher, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", str(port), os.path.join(ROOT, "engine", "train.py"), "--recipe", TINY,
               "--options", *node_options]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:  # both end: a launcher that is still running after the timeout is killed
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    # DeepSpeed's CPU all-reduce buffers (/dev/shm, one per rank) were unlinked once the ranks had mapped them
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in f]
    return [p.returncode for p in procs], outs


def options_dir(options):
    first = options[0] if isinstance(options[0], list) else options
    out = next(o.split("=", 1)[1] for o in first if o.startswith("run.output_dir="))
    return os.path.dirname(out.rstrip("/"))


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_two_nodes_equal_one_node(refs, tmp_path, ds):
    o = opts(tmp_path, "two-nodes", ds=f"{ds}.json", data=refs / "data")
    codes, outs = launch_two_nodes(o)
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 rank(s) on 2 nodes" in outs[0]
    expected = losses_by_step(refs / ds)
    assert len(expected) == 12
    assert losses_by_step(tmp_path / "two-nodes") == expected  # fp32, step by step


def test_output_dir_must_be_shared_by_all_nodes(tmp_path):
    # Each "node" gets its own output_dir, as a path on node-local disks would: the run must refuse to start.
    a, b = opts(tmp_path, "node-a"), opts(tmp_path, "node-b")
    codes, outs = launch_two_nodes([a, b], timeout=240)
    assert codes[0] != 0 and codes[1] != 0
    assert "is not shared by all nodes" in outs[0] and "rank 1" in outs[0]


def _resume_dir(src_ckpt, dest_run):
    """A run folder whose only checkpoint is a copy of ``src_ckpt`` (and ``latest`` naming it)."""
    ckpts = dest_run / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(src_ckpt, ckpts / src_ckpt.name)
    (ckpts / "latest").write_text(src_ckpt.name)


def test_resume_on_fewer_then_more_ranks_continues_the_same_losses(refs, tmp_path):
    ref = losses_by_step(refs / "zero2")
    data = refs / "data"
    # 2 ranks -> 1: step4 is mid-epoch; the global batch (8 x 2 ranks) is kept by accumulating 2 micro-batches
    _resume_dir(refs / "zero2" / "checkpoints" / "step4", tmp_path / "one")
    one = run_train(opts(tmp_path, "one", data=data), args=["--resume"])
    assert one.returncode == 0
    assert "2 -> 1 rank(s): run.accum_grad_iters 1 -> 2 keeps the global batch at 16" in one.stdout
    assert "through DeepSpeed's universal checkpoint format" in one.stdout
    assert (tmp_path / "one" / "checkpoints" / "step4" / "universal" / "COMPLETE").is_file()
    got = losses_by_step(tmp_path / "one")
    assert sorted(got) == list(range(5, 13))
    assert got == pytest.approx({s: ref[s] for s in got}, rel=1e-6, abs=1e-6)
    # ... and back: the 1-rank run's step8 resumed on 2 ranks
    _resume_dir(tmp_path / "one" / "checkpoints" / "step8", tmp_path / "two")
    two = run_train(opts(tmp_path, "two", "run.accum_grad_iters=2", data=data), ranks=2, args=["--resume"])
    assert two.returncode == 0
    assert "1 -> 2 rank(s): run.accum_grad_iters 2 -> 1" in two.stdout
    got = losses_by_step(tmp_path / "two")
    assert sorted(got) == [9, 10, 11, 12]
    assert got == pytest.approx({s: ref[s] for s in got}, rel=1e-6, abs=1e-6)


def test_zero2_checkpoint_resumes_under_zero3(refs, tmp_path):
    ref = losses_by_step(refs / "zero2")
    _resume_dir(refs / "zero2" / "checkpoints" / "step8", tmp_path / "z3")
    proc = run_train(opts(tmp_path, "z3", ds="zero3.json", data=refs / "data"), ranks=2,
                     args=["--resume"])
    assert proc.returncode == 0
    assert "run.deepspeed: 'ds_configs/zero2.json' in the checkpoint, 'ds_configs/zero3.json' now" in proc.stdout
    assert "under ZeRO stage 2 (ds_configs/zero2.json), on 2 rank(s) under ZeRO stage 3 (ds_configs/zero3.json)" \
        in proc.stdout
    got = losses_by_step(tmp_path / "z3")
    assert sorted(got) == [9, 10, 11, 12]
    assert got == pytest.approx({s: ref[s] for s in got}, rel=1e-6, abs=1e-6)


# -- the global batch on another number of ranks (no training) --------------------------------------------

def _recipe(*options):
    return load_recipe(TINY, ["run.batch_size_train=8", *options])


def test_accumulation_is_scaled_to_keep_the_global_batch():
    layout = SavedLayout(world_size=4, zero_stage=2, batch_size_train=8, accum_grad_iters=1)
    recipe = _recipe()
    problems, notes = keep_global_batch(recipe, layout, world=1)
    assert not problems and recipe.run.accum_grad_iters == 4
    assert "4 -> 1 rank(s): run.accum_grad_iters 1 -> 4 keeps the global batch at 32" in notes[0]
    # 32 cannot be split over 3 ranks of 8: the error says what to set
    recipe = _recipe()
    problems, _ = keep_global_batch(recipe, layout, world=3)
    assert len(problems) == 1 and problems[0].key == "run.accum_grad_iters"
    assert "global batch is 32" in problems[0].message and "allow_recipe_change" in problems[0].message
    assert recipe.run.accum_grad_iters == 1  # unchanged


def test_a_different_global_batch_needs_allow_recipe_change():
    layout = SavedLayout(world_size=2, zero_stage=2, batch_size_train=8, accum_grad_iters=1)
    problems, _ = check_global_batch(_recipe("run.accum_grad_iters=2"), layout, world=2)
    assert problems and "from 16" in problems[0].message and "to 32" in problems[0].message
    problems, notes = check_global_batch(_recipe("run.accum_grad_iters=2", "run.allow_recipe_change=true"),
                                         layout, world=2)
    assert not problems and "accepted" in notes[0]
    # the same global batch in another shape is fine: 4 x 2 ranks x 2 = 8 x 2 ranks x 1
    problems, notes = check_global_batch(_recipe("run.batch_size_train=4", "run.accum_grad_iters=2"), layout, world=2)
    assert not problems and "global batch kept at 16" in notes[0]


def test_tool_converts_ahead_and_resume_reuses_it(refs, tmp_path):
    _resume_dir(refs / "zero2" / "checkpoints" / "epoch0", tmp_path / "run")
    latest = tmp_path / "run" / "checkpoints" / "latest"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "to_universal.py"), str(latest)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    universal = tmp_path / "run" / "checkpoints" / "epoch0" / "universal"
    assert (universal / "COMPLETE").is_file() and "saved by 2 rank(s), ZeRO stage 2, global batch 16" in proc.stdout
    assert (universal / "mp_rank_00_model_states.pt").is_file()
    assert (universal / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()  # readable by a ZeRO-3 run too
    assert not (universal.parent / "latest_universal").exists()  # no pointer to the temporary folder
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "to_universal.py"), str(tmp_path / "nope")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and f"{tmp_path / 'nope'} does not exist" in bad.stderr


def test_a_signal_delivered_twice_at_once_is_one_request(monkeypatch):
    # SLURM signals every process of the job step and the launcher forwards its own copy: each rank gets two.
    from engine.trainer import loop

    class Fake:
        _signals, _first_signal = 0, 0.0

    fake = Fake()
    exits = []
    monkeypatch.setattr(loop.os, "_exit", lambda code: exits.append(code))
    loop.Trainer._on_signal(fake, signal.SIGTERM, None)
    loop.Trainer._on_signal(fake, signal.SIGTERM, None)
    assert fake._signals == 1 and exits == []  # one request: save at the next step, then exit 4
    fake._first_signal -= 2 * loop._SAME_SIGNAL_S  # a real second request, later
    loop.Trainer._on_signal(fake, signal.SIGINT, None)
    assert exits == [130]


def test_topology_from_the_launchers_environment(monkeypatch):
    from engine.trainer.topology import Topology

    # what DeepSpeed's launcher sets on the second of two nodes of 8 GPUs
    for k, v in dict(RANK="11", LOCAL_RANK="3", WORLD_SIZE="16", LOCAL_SIZE="8", CROSS_RANK="1",
                     CROSS_SIZE="2").items():
        monkeypatch.setenv(k, v)
    t = Topology.from_env()
    assert (t.rank, t.local_rank, t.node_rank, t.num_nodes, t.local_size) == (11, 3, 1, 2, 8)
    assert t.describe().startswith("16 rank(s) on 2 nodes (8 per node") and "node 1, local rank 3" in t.tag()
    # torchrun: GROUP_RANK and LOCAL_WORLD_SIZE instead
    for k in ("LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_RANK", "2")
    t = Topology.from_env()
    assert (t.node_rank, t.num_nodes, t.local_size) == (2, 4, 4)
