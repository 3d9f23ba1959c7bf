"""What a checkpoint holds: the trained weights, their optimizer state and the engine's state; the frozen
weights come from the base it names, which every reader checks."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, TINY, losses_by_step, run_train, tiny_options
from engine.build import build_model
from engine.config import load_recipe
from engine.trainer.checkpoint import safe_torch_load

FROZEN = ("model.freeze_vit=true", "model.freeze_llm=true")  # as the real recipes: the Q-Former trains
LORA = "model.lora={r: 4, alpha: 8, dropout: 0.05}"


def opts(tmp_path, name, *extra, ds="zero2.json", steps=2, data_root=None):
    return tiny_options(tmp_path, f"run.output_dir={tmp_path / name}", f"run.deepspeed=ds_configs/{ds}",
                        "run.precision=fp32", "run.max_epoch=1", f"run.max_steps={steps}", "run.val_freq=0",
                        "run.save_every_steps=2", *FROZEN, *extra, data_root=data_root or tmp_path / "data",
                        n_train=64)


def model_states(ckpt):
    names = [n for n in os.listdir(ckpt) if n.endswith("model_states.pt")]
    assert len(names) == 1, names
    return safe_torch_load(os.path.join(ckpt, names[0]))


def tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ds,extra", [("zero2.json", ()), ("zero3.json", ()), ("zero2_offload.json", (LORA,)),
                                      ("zero3_offload.json", (LORA,))],
                         ids=["zero2", "zero3", "zero2_offload-lora", "zero3_offload-lora"])
def test_model_states_hold_exactly_the_trainable_parameters(tmp_path, ds, extra):
    o = opts(tmp_path, "run", *extra, ds=ds)
    assert run_train(o).returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step2"
    sd = model_states(ckpt)
    model = build_model(load_recipe(TINY, o))
    named = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    trainable = {n for n, p in named.items() if p.requires_grad}
    frozen = set(named) - trainable
    assert trainable and frozen
    assert set(sd["module"]) == trainable  # no buffer in these models; no frozen weight under any name
    assert not sd.get("frozen_param_fragments")  # DeepSpeed's second copy of the frozen weights is gone too
    state = json.loads((ckpt / "engine_state.json").read_text())
    assert state["frozen_saved"] is False and state["base"]["reproducible"] is True
    assert state["base"]["frozen_params"] == sum(p.numel() for p in model.parameters() if not p.requires_grad)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """4 uninterrupted steps with the ViT and LLM frozen (checkpoints without frozen weights at steps 2, 4)."""
    tmp = tmp_path_factory.mktemp("ckpt-ref")
    assert run_train(opts(tmp, "ref", steps=4)).returncode == 0
    return tmp


def _strip_to_old_format(ckpt):
    """What a checkpoint looked like before the base was recorded (it held every weight)."""
    path = ckpt / "engine_state.json"
    state = json.loads(path.read_text())
    del state["frozen_saved"], state["base"]
    path.write_text(json.dumps(state))


def test_resume_and_export_rebuild_the_frozen_weights_from_the_recorded_base(ref, tmp_path):
    expected = losses_by_step(ref / "ref")
    data = ref / "data"
    # Steps 1-2 saved without frozen weights, resumed for steps 3-4: bit-exact, dropout on.
    o = opts(tmp_path, "run", data_root=data)
    assert run_train(o).returncode == 0
    resumed = run_train(opts(tmp_path, "run", "run.allow_recipe_change=true", steps=4, data_root=data),
                        args=["--resume"])
    assert resumed.returncode == 0
    assert losses_by_step(tmp_path / "run") == expected

    # Another base (the seed makes the tiny model's weights) is refused, naming both.
    other = run_train(opts(tmp_path, "run", "run.allow_recipe_change=true", "run.seed=7", steps=6, data_root=data),
                      args=["--resume"])
    assert other.returncode == 2
    assert "random weights from seed 42" in other.stderr and "random weights from seed 7" in other.stderr

    # Export: base + trained weights -> a complete folder.
    ckpt = tmp_path / "run" / "checkpoints" / "step4"
    out = tool("export_hf.py", ckpt, tmp_path / "hf")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frozen weights from the base" in out.stdout
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    base = build_model(load_recipe(TINY, o)).hf.state_dict()
    trained = safe_torch_load(ckpt / "mp_rank_00_model_states.pt")["module"]
    frozen_key, trained_key = "vision_model.encoder.layers.0.mlp.fc1.weight", "qformer.layernorm.weight"
    assert exported[frozen_key].equal(base[frozen_key])
    assert exported[trained_key].equal(trained["hf." + trained_key]) and not base[trained_key].equal(
        trained["hf." + trained_key])

    # A checkpoint written before bases were recorded (every weight in it, no record) still resumes and exports.
    assert run_train(opts(tmp_path, "old", "run.save_frozen=true", data_root=data)).returncode == 0
    old = tmp_path / "old" / "checkpoints" / "step2"
    held = model_states(old)
    assert held["frozen_param_fragments"]  # the frozen weights are in it, once: not in the module's state too
    assert not set(held["frozen_param_fragments"]) & set(held["module"])
    _strip_to_old_format(old)
    again = run_train(opts(tmp_path, "old", "run.save_frozen=true", "run.allow_recipe_change=true", steps=4,
                           data_root=data), args=["--resume"])
    assert again.returncode == 0
    assert losses_by_step(tmp_path / "old") == expected
    assert tool("export_hf.py", old, tmp_path / "hf-old").returncode == 0


def test_a_folder_base_is_fingerprinted_and_may_move_but_not_change(ref, tmp_path):
    # A Hugging Face folder as model.pretrained: the export of the reference run.
    assert tool("export_hf.py", ref / "ref", tmp_path / "base").returncode == 0
    o = opts(tmp_path, "run", f"model.pretrained={tmp_path / 'base'}", data_root=ref / "data")
    assert run_train(o).returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step2"
    base = json.loads((ckpt / "engine_state.json").read_text())["base"]
    assert base["kind"] == "folder" and base["path"] == str(tmp_path / "base")
    assert base["files"] == {"model.safetensors": (tmp_path / "base" / "model.safetensors").stat().st_size}

    # Moved: the same weights elsewhere are accepted.
    shutil.copytree(tmp_path / "base", tmp_path / "moved")
    out = tool("export_hf.py", ckpt, tmp_path / "hf", "--base", tmp_path / "moved")
    assert out.returncode == 0, out.stderr[-3000:]

    # Changed: other values in one frozen tensor, same names, shapes and file size: refused by export,
    # merge and resume, each naming both bases.
    from safetensors.torch import load_file, save_file

    path = tmp_path / "base" / "model.safetensors"
    weights = load_file(path)
    weights["language_model.model.decoder.layers.0.fc1.weight"] += 0.01
    save_file(weights, path, metadata={"format": "pt"})
    bad = tool("export_hf.py", ckpt, tmp_path / "hf2")
    assert bad.returncode == 2
    assert bad.stderr.count(str(tmp_path / "base")) >= 2 and "fingerprint" in bad.stderr and "--base" in bad.stderr
    assert tool("merge_lora.py", ckpt, tmp_path / "merged").returncode == 2
    resumed = run_train(o + ["run.allow_recipe_change=true", "run.max_steps=4"], args=["--resume"])
    assert resumed.returncode == 2 and "holds only the trained weights" in resumed.stderr
    ok = run_train(o + [f"model.pretrained={tmp_path / 'moved'}", "run.allow_recipe_change=true", "run.max_steps=4"],
                   args=["--resume"])
    assert ok.returncode == 0 and "now read from" in ok.stdout


def test_universal_resume_under_another_stage_keeps_the_frozen_weights(ref, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(ref / "ref" / "checkpoints" / "step2", ckpts / "step2")
    (ckpts / "latest").write_text("step2")
    z3 = run_train(opts(tmp_path, "run", ds="zero3.json", steps=4, data_root=ref / "data"), args=["--resume"])
    assert z3.returncode == 0 and "universal checkpoint format" in z3.stdout
    got = losses_by_step(tmp_path / "run")
    expected = losses_by_step(ref / "ref")
    assert sorted(got) == [3, 4]
    assert got == pytest.approx({s: expected[s] for s in got}, rel=1e-6, abs=1e-6)


def test_weights_only_load_under_zero3_reads_the_checkpoint_asked_for(tmp_path):
    """Evaluation of e.g. ``best`` under ZeRO-3 loads that checkpoint (DeepSpeed's own weights-only load
    consolidates whichever ``latest`` names): here there is no ``latest`` at all."""
    o = opts(tmp_path, "run", ds="zero3.json")
    assert run_train(o).returncode == 0
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    proc = tool("evaluate.py", "--recipe", TINY, "--checkpoint", tmp_path / "run" / "checkpoints" / "step2",
                "--output_dir", tmp_path / "eval", "--options", *[x for x in o if not x.startswith("run.output_dir=")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "eval" / "predictions" / "val_eval.json").is_file()
