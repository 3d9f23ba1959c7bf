"""LAVIS's own numbers: checkpoints of LAVIS's blip2_opt, blip2_t5, blip2_vicuna_instruct and
blip2_t5_instruct, imported with tools/import_lavis.py and loaded as tools/infer.py loads a model, give
LAVIS's loss (relative difference < 1e-4), logits and greedy and beam-search captions.

The references were made once by tests/golden/make_lavis_goldens.py in an environment with LAVIS (see
its docstring); CI reads the committed files only. Each arch is checked twice: its full LAVIS checkpoint
(the weights of the engine's seeded tiny model in LAVIS's layout, rebuilt here) against LAVIS's numbers
before training, and the runner checkpoint LAVIS wrote after a few training steps (only the trained
parts, plus the tied-embedding copies LAVIS's runner keeps) imported onto the first, against LAVIS's
numbers after training.
"""
import json
import os

import pytest
import torch

from helpers import ROOT, load_script

goldens = load_script("tests/golden", "make_lavis_goldens")

ARCHS = list(goldens.ARCHS)
# The LLM dtype LAVIS runs in, which its runner files keep for the tied copies.
ALIAS_DTYPE = {"blip2_opt": torch.float16, "blip2_t5": torch.bfloat16, "blip2_t5_instruct": torch.bfloat16,
               "blip2_vicuna_instruct": torch.float16}


def import_lavis(argv):
    assert load_script("tools", "import_lavis").main(argv) == 0


def record_of(arch):
    with open(os.path.join(goldens.golden_dir(), f"{arch}.json")) as f:
        return json.load(f)


def runner_checkpoint(arch):
    return torch.load(os.path.join(goldens.golden_dir(), f"{arch}_checkpoint.pth"), weights_only=True)


def check_against(model, recipe, record, stage, logits_ref, image):
    """Loss, logits and captions of `model` (loaded as tools/infer.py does) against LAVIS's."""
    from engine.models import IGNORE_INDEX

    setup, want = record["setup"], record[stage]
    prompts = list(setup["prompts"])
    if model.family == "opt":  # one prompt, as the imported recipe says: blip_caption's, exactly
        assert recipe.model.prompt == setup["text_prompt"] and prompts == [recipe.model.prompt] * len(prompts)
    with torch.no_grad():
        loss = model(image, prompts, setup["targets"]).item()
        inputs = model.build_inputs(prompts, setup["targets"])
        logits = model.hf(pixel_values=image, use_cache=False, **inputs).logits
    assert loss == pytest.approx(want["loss"], rel=1e-4), (stage, loss, want["loss"])
    ours = goldens.target_logits(logits, inputs["labels"].masked_fill(inputs["labels"] == IGNORE_INDEX, -100),
                                 model.decoder_only)
    torch.testing.assert_close(ours, logits_ref, rtol=1e-4, atol=1e-4)
    r = recipe.run
    gen = dict(max_len=r.max_len, min_len=r.min_len, repetition_penalty=r.repetition_penalty,
               length_penalty=r.length_penalty, length_counting=r.length_counting)
    assert (r.num_beams, r.max_len, r.min_len) == (setup["run"]["num_beams"], setup["run"]["max_len"],
                                                   setup["run"]["min_len"])
    assert model.generate(image, prompts, num_beams=1, **gen) == [t.strip() for t in want["greedy"]], stage
    assert model.generate(image, prompts, num_beams=r.num_beams, **gen) == [t.strip() for t in want["beam"]], stage


@pytest.mark.parametrize("arch", ARCHS)
def test_lavis_checkpoints_give_lavis_loss_logits_and_captions(arch, tmp_path):
    from engine.inference import load_model

    record = record_of(arch)
    runner = runner_checkpoint(arch)
    image = goldens.pixels(torch.load(os.path.join(goldens.golden_dir(), "images.pt"), weights_only=True))
    logits_ref = torch.load(os.path.join(goldens.golden_dir(), f"{arch}_logits.pt"), weights_only=True)

    # The full checkpoint: LAVIS's key set exactly (buffers transformers recomputes aside).
    full = goldens.full_lavis_state_dict(arch)
    assert set(full) == {k for k in record["full_keys"] if not k.endswith("rotary_emb.inv_freq")}
    full_pth = tmp_path / "full.pth"
    torch.save({"model": full, "config": runner["config"]}, full_pth)
    base = tmp_path / "imported_full"
    import_lavis([str(full_pth), str(base), "--arch", arch, "--model_type", "tiny"])
    model, recipe = load_model(str(base), device="cpu")
    check_against(model, recipe, record, "before", logits_ref[0], image)

    # The runner checkpoint after training, with the tied copies LAVIS's runner keeps (in the LLM's dtype).
    state = dict(runner["model"])
    for key in record["runner_aliases_left_out"]:
        state[key] = full[key].to(ALIAS_DTYPE[arch])
    assert {k for k, v in state.items() if v.dtype == torch.bfloat16} >= set(record["trained_keys"])
    runner_pth = tmp_path / "checkpoint_1.pth"
    torch.save({"model": state, "config": runner["config"], "epoch": 1}, runner_pth)
    out = tmp_path / "imported_runner"
    import_lavis([str(runner_pth), str(out), "--arch", arch, "--model_type", "tiny", "--base", str(base)])
    model, recipe = load_model(str(out), device="cpu")
    check_against(model, recipe, record, "after", logits_ref[1], image)
