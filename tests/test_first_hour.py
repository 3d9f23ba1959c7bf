"""What a new user meets in the first hour: unsetting keys from the command line, pointing the tools at a
run's checkpoints, and the start-up report."""
import os
import re
import shutil

import pytest

from engine.build import build_dataset, prepare_datasets
from engine.config import ConfigError, load_recipe
from engine.data import DatasetError, make_tiny_sherlock
from engine.data.synthetic import OWNER_MARK, SPEC_FILE, TOP_DIRS

from helpers import TINY


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
