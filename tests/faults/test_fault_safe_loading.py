"""Safe loading: nothing the engine reads can run code. YAML goes through a safe loader, checkpoint files
through ``torch.load(weights_only=True)``; a file that carries code is refused with exit code 2."""
import os
import shutil

import pytest
import torch

from helpers import TINY, run_train, tiny_options


class Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    proc = run_train(tiny_options(tmp_path), recipe=str(recipe))
    assert proc.returncode == 2 and "python/object/apply" in proc.stderr
    # an --options value that is not plain YAML is taken as literal text, never constructed
    from engine.config import load_recipe

    evil = f"!!python/object/apply:os.system ['touch {marker}']"
    assert load_recipe(TINY, [f"model.prompt={evil}"]).model.prompt == evil
    assert not marker.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safe")
    o = tiny_options(tmp, "run.precision=fp32", "run.max_epoch=1", "run.val_freq=0", "run.max_steps=1", n_train=32)
    assert run_train(o).returncode == 0
    return tmp, o


@pytest.mark.parametrize("victim", ["rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_pickle_payload_in_a_checkpoint_is_refused(finished_run, tmp_path, victim):
    src, o = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src / "run", run_dir)
    marker = tmp_path / "pwned"
    ckpt = run_dir / "checkpoints" / "step1"
    torch.save({"state": Payload(marker)}, ckpt / victim)
    o = [x for x in o if not x.startswith("run.output_dir=")] + [f"run.output_dir={run_dir}"]
    proc = run_train(o, args=["--resume"])
    assert proc.returncode == 2
    assert victim in proc.stderr and "could run code" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_pickle_payload_in_a_lavis_checkpoint_is_refused(tmp_path):
    from engine.checkpoints.lavis import LavisImportError, load_lavis_checkpoint

    marker = tmp_path / "pwned"
    pth = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(marker)}, pth)
    with pytest.raises(LavisImportError, match="could run arbitrary code"):
        load_lavis_checkpoint(str(pth))
    assert not marker.exists()
