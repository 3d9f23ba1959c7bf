"""What a new user meets in the first hour: unsetting keys from the command line, pointing the tools at a
run's checkpoints, and the start-up report."""
import json
import os
import re

import pytest

from engine.build import build_dataset, prepare_datasets
from engine.checkpoints.paths import CheckpointNotFound, resolve_checkpoint
from engine.config import ConfigError, load_recipe
from engine.data import DatasetError, make_tiny_sherlock
from engine.data.synthetic import OWNER_MARK, SPEC_FILE, TOP_DIRS

from helpers import ROOT, TINY, load_script


def _real_looking(root, n_train=12):
    """A Sherlock folder with data the generator did not make (its marks removed)."""
    make_tiny_sherlock(root, num_train=n_train, num_val=4, seed=0, image_size=32)
    os.remove(os.path.join(root, SPEC_FILE))
    for top in TOP_DIRS:
        os.remove(os.path.join(root, top, OWNER_MARK))


def test_the_option_the_synthetic_message_names_uses_the_data_that_is_there(tmp_path):
    root = str(tmp_path / "sherlock")
    _real_looking(root)
    recipe = load_recipe(TINY, [f"datasets.sherlock.root={root}"], check_files=False)
    with pytest.raises(DatasetError) as ei:
        prepare_datasets(recipe)
    option = re.search(r"--options (\S+)", str(ei.value)).group(1)
    assert option == "datasets.sherlock.synthetic=null"
    recipe = load_recipe(TINY, [f"datasets.sherlock.root={root}", option], check_files=False)
    assert recipe.datasets["sherlock"].options.synthetic is None
    prepare_datasets(recipe)
    assert len(build_dataset(recipe, "sherlock", "train", is_train=True)) == 12
    assert not os.path.exists(os.path.join(root, SPEC_FILE))  # nothing generated over the user's data


def test_zero_synthetic_means_none_and_null_unsets_any_key(tmp_path):
    root = str(tmp_path / "sherlock")
    _real_looking(root, n_train=7)
    recipe = load_recipe(TINY, [f"datasets.sherlock.root={root}", "datasets.sherlock.synthetic=0",
                                "datasets.sherlock.synthetic_val=null", "run.max_epoch=null",
                                "run.max_steps=null", "model.prompt=~"], check_files=False)
    opts = recipe.datasets["sherlock"].options
    assert opts.synthetic == 0 and opts.synthetic_val == 100  # null -> the schema's default
    assert recipe.run.max_epoch == 1 and recipe.run.max_steps is None and recipe.model.prompt == ""
    assert load_recipe(TINY, ["run.max_steps=0"], check_files=False).run.max_steps is None
    with pytest.raises(ConfigError, match="run.max_steps: -3 cannot be negative"):
        load_recipe(TINY, ["run.max_steps=-3"], check_files=False)
    prepare_datasets(recipe)
    assert len(build_dataset(recipe, "sherlock", "train", is_train=True)) == 7
    assert not os.path.exists(os.path.join(root, SPEC_FILE))
    # A required key cannot be unset; a negative count is refused with the way out.
    with pytest.raises(ConfigError, match="model.arch: is required"):
        load_recipe(TINY, ["model.arch=null"], check_files=False)
    recipe = load_recipe(TINY, [f"datasets.sherlock.root={root}", "datasets.sherlock.synthetic=-1"],
                         check_files=False)
    with pytest.raises(DatasetError, match=r"synthetic=-1.*null \(or 0\)"):
        prepare_datasets(recipe)


# -- which checkpoint a path means -------------------------------------------------------------------------


def _ckpt(root, tag, step, complete=True):
    d = root / tag
    d.mkdir(parents=True)
    (d / "engine_state.json").write_text(json.dumps({"global_step": step}))
    (d / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (d / "COMPLETE").write_text("")
    return d


def test_checkpoint_paths_resolve_pointers_links_and_run_folders(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    s4, s8 = _ckpt(ck, "step4", 4), _ckpt(ck, "step8", 8)
    _ckpt(ck, "step12", 12, complete=False)  # a save cut short
    (ck / "latest").write_text("step8")
    os.symlink("step4", ck / "best")
    cases = {
        str(s4): (s4, "a checkpoint folder"),
        str(ck / "latest"): (s8, "the checkpoint 'latest' names"),
        str(ck / "best"): (s4, "'best' links to it"),
        str(run): (s8, "the checkpoint 'latest' names"),
        str(ck): (s8, "the checkpoint 'latest' names"),
    }
    for given, (folder, how) in cases.items():
        r = resolve_checkpoint(given)
        assert (r.folder, r.how) == (str(folder.resolve()), how), given
    assert resolve_checkpoint(str(ck / "latest")).describe() == (
        f"checkpoint {ck / 'latest'} -> {s8.resolve()} (the checkpoint 'latest' names)")
    # Without a usable pointer, the run folder means its newest complete checkpoint (by step), never a cut one.
    (ck / "latest").write_text("step12")
    assert resolve_checkpoint(str(run)).folder == str(s8.resolve())
    (ck / "latest").unlink()
    r = resolve_checkpoint(str(run))
    assert (r.folder, r.how) == (str(s8.resolve()), "the newest complete checkpoint")
    # Errors say what is wrong and what is expected.
    with pytest.raises(CheckpointNotFound, match="not a complete checkpoint.*COMPLETE"):
        resolve_checkpoint(str(ck / "step12"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointNotFound, match="not a checkpoint of this engine.*found notes.txt"):
        resolve_checkpoint(str(tmp_path / "other"))
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointNotFound, match="no complete checkpoint under"):
        resolve_checkpoint(str(tmp_path / "empty_run"))
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nowhere"))


def test_evaluate_takes_the_latest_pointer_and_says_what_it_resolved(tmp_path, capsys):
    ck = tmp_path / "run" / "checkpoints"
    s8 = _ckpt(ck, "step8", 8)
    (ck / "latest").write_text("step8")
    evaluate = load_script("tools", "evaluate")
    assert evaluate.checkpoint_options(str(ck / "latest")) == [f"run.resume_ckpt_path={s8.resolve()}"]
    assert f"-> {s8.resolve()}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a checkpoint of this engine.*nor is it an exported"):
        evaluate.checkpoint_options(str(tmp_path))

