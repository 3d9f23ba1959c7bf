"""Export, LoRA adapters and merge, LAVIS import and the inference CLI, on checkpoints of real tiny runs.

Two training runs are shared by the whole module: ZeRO-2 on one rank (bf16, frozen ViT) and ZeRO-3 on
two ranks (fp32, LoRA on the LLM).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import ROOT, TINY, load_script, run_train, tiny_options

from engine.config import load_yaml, parse_recipe


def tiny_recipe(*options):
    return parse_recipe(load_yaml(TINY), options=list(options), check_files=False)


def sample_inputs(model, n=2):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(n, 3, model.image_size, model.image_size, generator=g)
    inputs = model.build_inputs(["inference: "] * n, ["a red circle near the tree", "two dogs"][:n])
    return image, inputs


def logits(hf, image, inputs):
    hf.eval()
    with torch.no_grad():
        return hf(pixel_values=image.to(hf.dtype), **inputs).logits.float()


def latest_checkpoint(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def hf_class(model):
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    return InstructBlipForConditionalGeneration if model.instruct else Blip2ForConditionalGeneration


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero2")
    proc = run_train(tiny_options(d, "run.max_epoch=1", "run.max_steps=2", "run.val_freq=0", "model.freeze_vit=true",
                                  n_train=32, n_val=8))
    assert proc.returncode == 0
    return d / "run"


@pytest.fixture(scope="module")
def zero3_lora_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero3_lora")
    proc = run_train(tiny_options(d, "run.max_epoch=1", "run.max_steps=2", "run.val_freq=0",
                                  "run.deepspeed=ds_configs/zero3.json", "run.precision=fp32", "model.lora.r=4",
                                  "model.lora.alpha=8", "model.lora.dropout=0.0", n_train=32, n_val=8), ranks=2)
    assert proc.returncode == 0
    return d / "run"


@pytest.fixture(scope="module")
def zero2_export(zero2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "zero2"
    # The run folder resolves to the checkpoint `latest` names.
    assert load_script("tools", "export_hf").main([str(zero2_run), str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- export


def test_export_zero2_loads_in_transformers_with_the_engines_logits(zero2_run, zero2_export, capsys):
    from transformers import AutoProcessor, AutoTokenizer, Blip2ForConditionalGeneration

    from engine.build import build_model
    from engine.data.processors import BlipImageEvalProcessor
    from engine.checkpoints.engine_checkpoint import parse_saved_recipe
    from engine.export import load_checkpoint_model

    out = zero2_export
    ckpt = latest_checkpoint(zero2_run)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "recipe.yaml",
                 "export_info.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "export_info.json").read_text())
    assert info["global_step"] == 2 and info["source_checkpoint"] == os.path.realpath(ckpt)
    # bf16 run: the frozen ViT is not in the checkpoint and comes from the base (the seeded tiny weights, fp32),
    # trained parts as fp32 masters.
    assert info["parts"]["vision"]["trained"] is False and info["frozen_from"] == "base"
    assert info["parts"]["vision"]["source_dtype"] == "float32" and "from the base" in info["parts"]["vision"]["note"]
    assert info["parts"]["qformer"]["source_dtype"] == info["parts"]["llm"]["source_dtype"] == "float32"
    assert info["saved_dtype"] == "fp32"

    engine_model, _, _ = load_checkpoint_model(str(ckpt))
    image, inputs = sample_inputs(engine_model)
    expected = logits(engine_model.hf, image, inputs)
    hf = Blip2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(hf, image, inputs), expected, rtol=0, atol=0)

    # The weights the bf16 engine computed with are the export's, rounded to bf16: the trained ones (its module
    # states, which hold nothing else) and the frozen ViT (the base's, which the run held in bf16).
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    state = hf.state_dict()
    assert {k[len("hf."):] for k in module} == {n for n, p in engine_model.hf.named_parameters(remove_duplicate=False)
                                                if p.requires_grad}  # tied weights under each name
    for key, value in module.items():
        assert torch.equal(state[key[len("hf."):]].to(value.dtype), value), key
    base = build_model(parse_saved_recipe(json.loads((ckpt / "engine_state.json").read_text())["recipe"]))
    for key, value in base.hf.state_dict().items():
        if key.startswith("vision_model.") and not key.startswith("vision_model.post_layernorm"):  # ln_vision trains
            assert torch.equal(state[key], value), key

    # The engine's builder loads the folder through recipe.yaml (model.pretrained points at it).
    recipe = parse_saved_recipe(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert recipe.model.pretrained == str(out) and recipe.model.model_type == "tiny"
    rebuilt = build_model(recipe)
    torch.testing.assert_close(logits(rebuilt.hf, image, inputs), expected, rtol=0, atol=0)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("a red circle")["input_ids"] == engine_model.tokenizer("a red circle")["input_ids"]
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Blip2Processor" and processor.num_query_tokens == 8
    from PIL import Image

    picture = Image.new("RGB", (96, 72), (200, 30, 90))
    picture.paste((10, 200, 40), (10, 10, 40, 50))
    batch = processor(images=picture, text="inference:", return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"][0], BlipImageEvalProcessor(64)(picture), rtol=0, atol=1e-6)
    assert batch["input_ids"][0, :8].tolist() == [engine_model.image_token_id] * 8  # one per query token

    # Never into a non-empty folder without --force.
    capsys.readouterr()
    assert load_script("tools", "export_hf").main([str(ckpt), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "model.safetensors").is_file()


def test_export_zero3_two_ranks_lora_merged_kept_and_merge_tool(zero3_lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    from engine.checkpoints.engine_checkpoint import consolidated_state_dict
    from engine.checkpoints.lora import save_lora_adapter
    from engine.export import load_checkpoint_model

    ckpt = latest_checkpoint(zero3_lora_run)
    assert sorted(p.name for p in ckpt.glob("*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    adapter_model, recipe_dict, _ = load_checkpoint_model(str(ckpt))  # LoRA layers in place, not merged
    image, inputs = sample_inputs(adapter_model)
    expected = logits(adapter_model.hf, image, inputs)

    merged = tmp_path / "merged"
    assert load_script("tools", "export_hf").main([str(ckpt), str(merged)]) == 0
    info = json.loads((merged / "export_info.json").read_text())
    assert info["lora"] == {"parts": ["llm"], "merged_layers": 4}
    assert info["parts"]["llm"]["trained"] is False and info["parts"]["lora"]["trained"] is True
    assert not any("lora" in k for k in load_file(merged / "model.safetensors"))
    assert yaml.safe_load((merged / "recipe.yaml").read_text())["model"]["lora"] is None
    hf = Blip2ForConditionalGeneration.from_pretrained(merged, dtype=torch.float32)
    torch.testing.assert_close(logits(hf, image, inputs), expected, rtol=1e-5, atol=1e-5)

    # --keep-adapter: base weights + a peft folder that PeftModel.from_pretrained loads.
    kept = tmp_path / "kept"
    assert load_script("tools", "export_hf").main([str(ckpt), str(kept), "--keep-adapter"]) == 0
    assert (kept / "adapter" / "adapter_config.json").is_file()
    base = Blip2ForConditionalGeneration.from_pretrained(kept, dtype=torch.float32)
    PeftModel.from_pretrained(base.language_model, kept / "adapter")  # injects the adapters in place
    torch.testing.assert_close(logits(base, image, inputs), expected, rtol=0, atol=0)

    # merge_lora.py on that adapter folder (its recipe names the kept folder as base) and on the checkpoint.
    from_adapter, from_ckpt = tmp_path / "from_adapter", tmp_path / "from_ckpt"
    assert load_script("tools", "merge_lora").main([str(kept / "adapter"), str(from_adapter)]) == 0
    assert load_script("tools", "merge_lora").main([str(ckpt), str(from_ckpt)]) == 0
    for folder in (from_adapter, from_ckpt):
        hf = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        torch.testing.assert_close(logits(hf, image, inputs), expected, rtol=1e-5, atol=1e-5)

    # A tiny base built under ZeRO-3 cannot be rebuilt from the seed: a lone adapter needs --base.
    lone = tmp_path / "lone"
    save_lora_adapter(adapter_model, lone, recipe=recipe_dict)
    capsys.readouterr()
    assert load_script("tools", "merge_lora").main([str(lone), str(tmp_path / "nope")]) == 2
    assert "ZeRO-3" in capsys.readouterr().err and not (tmp_path / "nope").exists()

    # When the trainer stores the adapter beside the checkpoint, it holds the consolidated fp32 weights.
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    full = consolidated_state_dict(str(ckpt))
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert adapter
    for key, value in adapter.items():
        name = "hf.language_model." + re.sub(r"\.(lora_[AB])\.", r".\1.default.", key[len("base_model.model."):])
        assert torch.equal(full[name].contiguous(), value), key


SAVE_ADAPTER_UNDER_DEEPSPEED = r"""
import os, socket, sys
out = sys.argv[1]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import deepspeed, torch
from engine.build import build_model
from engine.config import load_recipe
from engine.deepspeed_config import fill_ds_config
from engine.checkpoints.lora import save_lora_adapter
from engine.trainer.optim import param_groups
from engine.trainer.topology import init_distributed
init_distributed()
for stage in (2, 3):
    recipe = load_recipe("recipes/tiny_sherlock.yaml", [f"run.deepspeed=ds_configs/zero{stage}.json",
                         "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"], check_files=False)
    model = build_model(recipe)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05),
                                      config=fill_ds_config(recipe, 1, on_cpu=True))
    torch.manual_seed(0)
    loss = engine(image=torch.randn(2, 3, 64, 64).bfloat16(), prompt=["inference: "] * 2,
                  text_output=["a dog", "two cats"])
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(os.path.join(out, f"ckpt{stage}"), tag="t")
    save_lora_adapter(engine, os.path.join(out, f"zero{stage}"), recipe=recipe.to_dict())
"""


def test_save_lora_adapter_under_zero2_and_zero3_holds_the_fp32_masters(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel

    from engine.build import build_model

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", SAVE_ADAPTER_UNDER_DEEPSPEED, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in (2, 3):
        folder = tmp_path / f"zero{stage}"
        info = json.loads((folder / "adapter_info.json").read_text())
        assert info["parts"] == {"llm": "."} and info["dtype"] == ["float32"]
        full = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / f"ckpt{stage}"), tag="t")
        adapter = load_file(folder / "adapter_model.safetensors")
        trained = load_file(folder / "trained_weights.safetensors")
        assert len(adapter) == 8 and {k.split(".")[0] for k in trained} == {
            "query_tokens", "vision_model", "qformer", "language_projection"}
        rounded = 0
        for key, value in adapter.items():
            name = "hf.language_model." + re.sub(r"\.(lora_[AB])\.", r".\1.default.", key[len("base_model.model."):])
            assert torch.equal(full[name], value), key
            rounded += torch.equal(value.bfloat16().float(), value)
        for key, value in trained.items():
            assert torch.equal(full["hf." + key], value), key
        assert rounded == 0  # the fp32 masters, not the bf16 module weights
    base = build_model(tiny_recipe())
    PeftModel.from_pretrained(base.hf.language_model, tmp_path / "zero3")


def test_adapter_folder_merges_onto_the_recipes_seeded_base(tmp_path):
    """An adapter folder alone (no checkpoint): merge_lora.py rebuilds the tiny base from the recipe."""
    from transformers import Blip2ForConditionalGeneration

    from engine.build import build_model
    from engine.checkpoints.lora import save_lora_adapter

    recipe = tiny_recipe("model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0",
                         "model.lora.on=[llm,qformer]")
    model = build_model(recipe).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: adapters and the (trainable) Q-Former move
        for name, p in model.hf.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    image, inputs = sample_inputs(model)
    expected = logits(model.hf, image, inputs)
    adapter = tmp_path / "adapter"
    save_lora_adapter(model, adapter, recipe=recipe.to_dict())
    assert (adapter / "qformer" / "adapter_config.json").is_file() and (adapter / "recipe.yaml").is_file()
    out = tmp_path / "merged"
    assert load_script("tools", "merge_lora").main([str(adapter), str(out)]) == 0
    info = json.loads((out / "export_info.json").read_text())
    assert info["merge"]["merged_layers"] == {"llm": 4, "qformer": 8}
    hf = Blip2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(hf, image, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["blip2_t5", "blip2_vicuna_instruct", "blip2_t5_instruct"])
def test_hf_folder_of_every_family_loads_with_its_processor(arch, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer

    from engine.build import build_model
    from engine.checkpoints.engine_checkpoint import parse_saved_recipe
    from engine.checkpoints.hf import save_hf_folder
    from engine.models import WeightsNotFoundError
    from engine.models.blip2 import build_vlm

    recipe = tiny_recipe(f"model.arch={arch}")
    model = build_model(recipe).eval()
    image, inputs = sample_inputs(model)
    expected = logits(model.hf, image, inputs)
    save_hf_folder(model, str(tmp_path / "out"), recipe_dict=recipe.to_dict(), info={})
    out = tmp_path / "out"
    hf = hf_class(model).from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(hf, image, inputs), expected, rtol=0, atol=0)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == ("InstructBlipProcessor" if model.instruct else "Blip2Processor")
    if model.instruct:
        assert (out / "qformer_tokenizer").is_dir()
        assert processor.qformer_tokenizer("a dog")["input_ids"] == model.qformer_tokenizer("a dog")["input_ids"]
    assert AutoTokenizer.from_pretrained(out)("a dog")["input_ids"] == model.tokenizer("a dog")["input_ids"]
    rebuilt = build_model(parse_saved_recipe(yaml.safe_load((out / "recipe.yaml").read_text())))
    torch.testing.assert_close(logits(rebuilt.hf, image, inputs), expected, rtol=0, atol=0)
    with pytest.raises(WeightsNotFoundError, match="tools/export_hf.py"):
        build_vlm(arch, model_type="tiny", pretrained=str(tmp_path / "missing"))


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_t5", "blip2_vicuna_instruct", "blip2_t5_instruct"])
def test_exported_folder_generates_as_the_engine_in_plain_transformers(arch, tmp_path):
    """config + generation_config + processor + weights: plain transformers (the saved processor and
    `generate` with the saved generation settings) gives the engine's own captions. Greedy in both length
    countings; beam search with lengths in new tokens (with LAVIS's counting the engine also ranks beams cut
    at the length limit as LAVIS does, which plain transformers cannot be told)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, GenerationConfig

    from engine.build import build_model
    from engine.checkpoints.hf import save_hf_folder

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
    for counting in ("new_tokens", "lavis"):
        recipe = tiny_recipe(f"model.arch={arch}", "run.max_len=9", "run.min_len=4",
                             f"run.length_counting={counting}")
        model = build_model(recipe).eval()
        with torch.no_grad():  # a sharper random LM, so captions vary with the image and prompt
            model.hf.language_model.get_output_embeddings().weight.mul_(8.0)
        out = tmp_path / counting
        save_hf_folder(model, str(out), recipe_dict=recipe.to_dict(), info={})
        hf = hf_class(model).from_pretrained(out, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(out)
        saved = GenerationConfig.from_pretrained(out)
        assert saved.eos_token_id == model.eos_id == hf.config.text_config.eos_token_id
        assert (saved.max_new_tokens, saved.min_new_tokens) == model.generation_lengths(9, 4, counting)
        prompt = "a photo of" if model.family == "opt" else "what is in the picture?"
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        assert inputs["pixel_values"].shape[-1] == model.image_size
        for beams in ((1, 3) if counting == "new_tokens" else (1,)):
            ours = model.generate(inputs["pixel_values"], [prompt], num_beams=beams, max_len=9, min_len=4,
                                  length_counting=counting)[0]
            ids = hf.generate(**inputs, generation_config=saved, num_beams=beams)
            if model.decoder_only:
                ids = ids[:, inputs["input_ids"].shape[1]:]
            theirs = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
            assert theirs == ours, (counting, beams, theirs, ours)
            assert ours


def test_bad_checkpoints_say_what_was_expected_and_found(zero2_run, tmp_path, capsys):
    export = load_script("tools", "export_hf")
    src = latest_checkpoint(zero2_run)
    # Another arch in the recipe: every key difference is named.
    other = tmp_path / "other"
    shutil.copytree(src, other)
    state = json.loads((other / "engine_state.json").read_text())
    state["recipe"]["model"]["arch"] = "blip2_t5"
    (other / "engine_state.json").write_text(json.dumps(state))
    assert export.main([str(other), str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "does not match the model built from the recipe" in err and "language_model.encoder" in err
    # A truncated shard.
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    optim = next(cut.glob("*_optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 3])
    assert export.main([str(cut), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "could not consolidate" in err and "truncated" in err
    # An interrupted save (no COMPLETE marker).
    (cut / "COMPLETE").unlink()
    assert export.main([str(cut), str(tmp_path / "o3")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


# ----------------------------------------------------------------------------- LAVIS import


# transformers names -> LAVIS names: the inverse of the importer's mapping, written independently of it.
to_lavis = load_script("tests/golden", "make_lavis_goldens").hf_to_lavis


def import_tiny(pth, out, arch):
    """tools/import_lavis.py PTH OUT --arch ARCH --model_type tiny, in this process."""
    assert load_script("tools", "import_lavis").main([str(pth), str(out), "--arch", arch, "--model_type", "tiny"]) == 0


class NotATensor:
    """Stands for the OmegaConf or argparse objects some .pth files pickle."""


def trained_like(arch, seed):
    from engine.models.blip2 import build_vlm

    model = build_vlm(arch, model_type="tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.02
            if name.endswith("self_attn.qkv.bias"):
                noise[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0  # the key bias stays zero, as in EVA
            p.add_(noise)
    return model


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_t5", "blip2_vicuna_instruct"])
def test_import_lavis_round_trips_every_tensor(arch, tmp_path, capsys):
    from engine.models.zoo import ARCHS

    spec = ARCHS[arch]
    source = trained_like(arch, seed=1)
    state = {k: v.clone() for k, v in source.hf.state_dict().items()}
    lavis = to_lavis(state, spec.family, spec.instruct)
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(32)[None]  # a buffer LAVIS saves
    pth = tmp_path / "checkpoint_3.pth"
    torch.save({"model": lavis, "config": {"model": {"prompt": "inference: "}}, "epoch": 3}, pth)
    out = tmp_path / "imported"
    import_tiny(pth, out, arch)
    printed = capsys.readouterr().out
    assert "dropped  Qformer.bert.embeddings.position_ids" in printed and "UNMAPPED" not in printed
    hf = hf_class(source).from_pretrained(out, dtype=torch.float32)
    loaded = hf.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["prompt"] == "inference: " and recipe["datasets"]["sherlock"]["region"] == "highlight"


def test_import_lavis_sherlock_style_partial_checkpoint_keeps_the_rest_from_base(tmp_path, capsys):
    from transformers import Blip2ForConditionalGeneration

    from engine.models.blip2 import build_vlm

    base = build_vlm("blip2_opt", model_type="tiny").hf.state_dict()
    source = trained_like("blip2_opt", seed=2).hf.state_dict()
    lavis = to_lavis(source, "opt", False)
    # LAVIS's runner layout: what trained (Q-Former, query tokens, projection, ln_vision under freeze_vit)
    # plus the frozen OPT's lm_head, which is tied to the input embeddings and saved in fp16.
    partial = {k: v for k, v in lavis.items() if k.startswith(("Qformer.", "query_tokens", "opt_proj.", "ln_vision."))}
    partial["opt_model.lm_head.weight"] = (lavis["opt_model.lm_head.weight"] + 0.5).half()
    partial["Qformer.cls.predictions.bias"] = torch.zeros(4)  # stage-1 head: dropped, with the reason
    pth = tmp_path / "checkpoint_best.pth"
    torch.save({"model": partial}, pth)
    out = tmp_path / "imported"
    import_tiny(pth, out, "blip2_opt")
    printed = capsys.readouterr().out
    assert "kept from base: vision" in printed and "kept from base: llm" in printed
    assert "dropped  Qformer.cls.predictions.bias" in printed
    assert "dropped  opt_model.lm_head.weight: a frozen copy of the language model's tied embeddings" in printed
    info = json.loads((out / "export_info.json").read_text())
    assert info["kept_from_base"]["vision"] > 0 and info["kept_from_base"]["llm"] > 0
    assert "qformer" not in info["kept_from_base"]
    loaded = Blip2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).state_dict()
    for key in loaded:
        trained = key.startswith(("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm."))
        want = source if trained else base
        assert torch.equal(loaded[key], want[key]), key  # the base's embeddings and lm_head untouched


def test_import_lavis_t5_runner_checkpoint_keeps_the_bases_embeddings(tmp_path, capsys):
    from engine.models.blip2 import build_vlm

    base = build_vlm("blip2_t5", model_type="tiny").hf.state_dict()
    lavis = to_lavis(trained_like("blip2_t5", seed=4).hf.state_dict(), "t5", False)
    partial = {k: v for k, v in lavis.items() if k.startswith(("Qformer.", "query_tokens", "t5_proj.", "ln_vision."))}
    for name in ("encoder", "decoder"):  # LAVIS casts T5 to bf16; the tied copies stay in its runner files
        partial[f"t5_model.{name}.embed_tokens.weight"] = lavis["t5_model.shared.weight"].bfloat16()
    pth = tmp_path / "checkpoint_best.pth"
    torch.save({"model": partial}, pth)
    out = tmp_path / "imported"
    import_tiny(pth, out, "blip2_t5")
    assert "dropped  t5_model.encoder.embed_tokens.weight" in capsys.readouterr().out
    loaded = hf_class(build_vlm("blip2_t5", model_type="tiny")).from_pretrained(out, dtype=torch.float32).state_dict()
    for key in ("language_model.shared.weight", "language_model.lm_head.weight"):
        assert torch.equal(loaded[key], base[key]), key


def test_import_lavis_onto_a_base_with_a_resized_vocabulary(tmp_path, capsys):
    # Checkpoints older than the <image> placeholder: the base grew its vocabulary for it, LAVIS's did not.
    from engine.models.blip2 import build_vlm

    source = trained_like("blip2_opt", seed=5)
    lavis = to_lavis(source.hf.state_dict(), "opt", False)
    image_row = source.image_token_id
    assert image_row == source.hf.get_input_embeddings().num_embeddings - 1  # the last token of the tiny vocab
    for key in ("opt_model.model.decoder.embed_tokens.weight", "opt_model.lm_head.weight"):
        lavis[key] = lavis[key][:image_row].clone()
    pth = tmp_path / "checkpoint_full.pth"
    torch.save({"model": lavis}, pth)
    out = tmp_path / "imported"
    import_tiny(pth, out, "blip2_opt")
    assert "resized  language_model.model.decoder.embed_tokens.weight" in capsys.readouterr().out
    loaded = hf_class(source).from_pretrained(out, dtype=torch.float32).state_dict()
    emb = loaded["language_model.model.decoder.embed_tokens.weight"]
    assert torch.equal(emb[:image_row], lavis["opt_model.model.decoder.embed_tokens.weight"])
    base = build_vlm("blip2_opt", model_type="tiny").hf.state_dict()
    assert torch.equal(emb[image_row:], base["language_model.model.decoder.embed_tokens.weight"][image_row:])


def test_import_lavis_recipe_keeps_the_run(tmp_path):
    """The prompt exactly as LAVIS applied it (blip_caption's, trailing space included), max_txt_len,
    max_output_txt_len, the dataset sections of the LAVIS config (no Sherlock section for COCO), the
    generation settings, and LAVIS's image size."""
    from engine.models.blip2 import build_vlm

    lavis = to_lavis(trained_like("blip2_vicuna_instruct", seed=6).hf.state_dict(), "llama", True)
    config = {
        "model": {"arch": "blip2_vicuna_instruct", "prompt": "a photo of", "max_txt_len": 24,
                  "max_output_txt_len": 40, "image_size": 64},
        "datasets": {"coco_caption": {
            "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 64},
                              "eval": {"name": "blip_image_eval", "image_size": 64}},
            "text_processor": {"train": {"name": "blip_caption", "prompt": "a photo of "},
                               "eval": {"name": "blip_caption"}},
            "build_info": {"images": {"storage": "/export/coco"}}}},
        "run": {"task": "captioning", "num_beams": 5, "max_len": 30, "min_len": 8, "amp": True},
    }
    pth = tmp_path / "checkpoint_4.pth"
    torch.save({"model": lavis, "config": config}, pth)
    out = tmp_path / "imported"
    import_tiny(pth, out, "blip2_vicuna_instruct")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["prompt"] == "a photo of "
    assert recipe["model"]["max_txt_len"] == 24 and recipe["model"]["max_output_txt_len"] == 40
    assert "image_size" not in recipe["model"]  # LAVIS's size is the ViT's: nothing to resize
    assert set(recipe["datasets"]) == {"coco_caption"}
    coco = recipe["datasets"]["coco_caption"]
    assert coco["vis_processor"]["train"] == {"name": "blip2_image_train", "image_size": 64}
    assert coco["text_processor"]["train"] == {"name": "blip_caption"}  # its prompt is model.prompt
    assert (recipe["run"]["num_beams"], recipe["run"]["max_len"], recipe["run"]["min_len"]) == (5, 30, 8)
    # tools/infer.py's loader reads it back
    from engine.inference import load_model

    model, loaded = load_model(str(out), device="cpu")
    assert loaded.model.prompt == "a photo of " and model.max_output_txt_len == 40
    # A LAVIS run at another size than the base's ViT: the imported model takes LAVIS's size.
    config["model"]["image_size"] = 96
    for ds in config["datasets"]["coco_caption"]["vis_processor"].values():
        ds["image_size"] = 96
    del lavis["visual_encoder.pos_embed"]  # a runner checkpoint of a frozen ViT has no position embeddings
    torch.save({"model": lavis, "config": config}, pth)
    out96 = tmp_path / "imported96"
    import_tiny(pth, out96, "blip2_vicuna_instruct")
    assert yaml.safe_load((out96 / "recipe.yaml").read_text())["model"]["image_size"] == 96
    hf = hf_class(build_vlm("blip2_vicuna_instruct", model_type="tiny")).from_pretrained(out96)
    assert hf.config.vision_config.image_size == 96
    assert hf.vision_model.embeddings.position_embedding.shape[1] == (96 // 8) ** 2 + 1


def test_import_lavis_refuses_unmapped_keys_pickled_objects_and_another_llm(tmp_path, capsys):
    lavis = to_lavis(trained_like("blip2_opt", seed=3).hf.state_dict(), "opt", False)
    importer = load_script("tools", "import_lavis")
    args = ["--arch", "blip2_opt", "--model_type", "tiny"]

    odd = tmp_path / "odd.pth"
    torch.save({"model": dict(lavis, **{"Qformer.bert.pooler.dense.weight": torch.zeros(2, 2)})}, odd)
    assert importer.main([str(odd), str(tmp_path / "o1"), *args]) == 2
    assert "Qformer.bert.pooler.dense.weight" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert importer.main([str(odd), str(tmp_path / "o1"), *args, "--allow-unmapped"]) == 0
    assert "UNMAPPED Qformer.bert.pooler.dense.weight" in capsys.readouterr().out

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": lavis, "config": NotATensor()}, pickled)
    assert importer.main([str(pickled), str(tmp_path / "o2"), *args]) == 2
    assert "could run arbitrary code" in capsys.readouterr().err

    assert importer.main([str(odd), str(tmp_path / "o3"), "--arch", "blip2_t5", "--model_type", "tiny"]) == 2
    assert "holds an 'opt' language model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- inference


def test_infer_prints_text_for_an_image_with_a_region(zero2_run, zero2_export, tmp_path, capsys):
    from PIL import Image

    picture = Image.new("RGB", (120, 90), (240, 240, 240))
    picture.paste((200, 20, 20), (20, 30, 60, 70))
    path = tmp_path / "scene.png"
    picture.save(path)
    infer = load_script("tools", "infer")
    for model in (zero2_export, latest_checkpoint(zero2_run)):
        capsys.readouterr()
        assert infer.main(["--model", str(model), "--image", str(path), "--region", "20,30,40,40",
                           "--max_len", "5"]) == 0
        captured = capsys.readouterr()
        assert captured.out.strip() and len(captured.out.strip().splitlines()) == 1
        assert "region mode highlight, text mode inference" in captured.err
    assert infer.main(["--model", str(zero2_export), "--image", str(path), "--region", "1,2,3"]) == 2
    assert "left,top,width,height" in capsys.readouterr().err


def test_infer_prepares_image_and_prompt_exactly_as_the_dataset(zero2_run):
    from engine.build import build_dataset
    from engine.checkpoints.engine_checkpoint import checkpoint_recipe, parse_saved_recipe
    from engine.inference import build_prompt, data_settings, prepare_image

    data = checkpoint_recipe(str(latest_checkpoint(zero2_run)))
    for region, text in (("highlight", "clue_in_prompt"), ("crop", "inference")):
        data["datasets"]["sherlock"].update(region=region, text=text)
        recipe = parse_saved_recipe(data)
        dataset = build_dataset(recipe, "sherlock", "val", is_train=False)
        sample = dataset[0]
        item = dataset.items[0]
        settings = data_settings(recipe)
        prompt, _ = build_prompt(recipe, settings, clue=sample["clue"])
        assert prompt == sample["prompt"]
        torch.testing.assert_close(prepare_image(dataset.load_image(0), item.boxes, settings), sample["image"],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_vicuna_instruct"])
def test_training_builds_in_its_precision_the_weights_deepspeed_would_cast_to(arch, tmp_path):
    """engine/train.py builds in bf16 (half the host memory per rank): the same weights as an fp32 build cast by
    DeepSpeed, from a checkpoint folder and from the seed, with fp32 buffers (Llama's rotary table) left alone."""
    from deepspeed.runtime.keep_in_fp32 import keep_in_fp32_pattern

    from engine.build import build_model
    from engine.checkpoints.hf import save_hf_folder

    recipe = tiny_recipe(f"model.arch={arch}")
    save_hf_folder(build_model(recipe), str(tmp_path / "ckpt"), recipe_dict=recipe.to_dict(), info={})
    for options in ([], [f"model.pretrained={tmp_path / 'ckpt'}"]):
        r = tiny_recipe(f"model.arch={arch}", *options)
        full, half = build_model(r), build_model(r, dtype=torch.bfloat16)
        assert keep_in_fp32_pattern(half, None, torch.bfloat16) is None  # DeepSpeed then casts every parameter
        params = dict(half.named_parameters())
        for name, p in full.named_parameters():
            assert torch.equal(params[name].to(torch.bfloat16), p.to(torch.bfloat16)), name
            if name.startswith(("hf.vision_model.", "hf.language_model.")):
                assert params[name].dtype == torch.bfloat16, name  # the big frozen parts: 2 B per weight
        buffers = dict(half.named_buffers())
        for name, b in full.named_buffers():
            assert buffers[name].dtype == b.dtype and torch.equal(buffers[name], b), name


def test_tools_take_the_latest_pointer_the_best_link_and_the_run_folder(zero2_run, tmp_path, capsys):
    ckpts = zero2_run / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    real = (ckpts / tag).resolve()
    os.symlink(tag, ckpts / "best.test")  # a link like checkpoints/best
    try:
        assert load_script("tools", "export_hf").main([str(ckpts / "latest"), str(tmp_path / "via_latest")]) == 0
        out = capsys.readouterr().out
        assert f"checkpoint {ckpts / 'latest'} -> {real} (the checkpoint 'latest' names)" in out
        assert json.loads((tmp_path / "via_latest" / "export_info.json").read_text())["source_checkpoint"] == str(real)
        assert load_script("tools", "merge_lora").main([str(zero2_run), str(tmp_path / "via_run")]) == 0
        assert f"checkpoint {zero2_run} -> {real}" in capsys.readouterr().out
        assert load_file(tmp_path / "via_run" / "model.safetensors").keys() == \
            load_file(tmp_path / "via_latest" / "model.safetensors").keys()
        universal = load_script("tools", "to_universal")
        assert universal.main([str(ckpts / "best.test")]) == 0
        assert f"-> {real} ('best.test' links to it)" in capsys.readouterr().out
        assert (real / "universal").is_dir()
    finally:
        os.remove(ckpts / "best.test")
        shutil.rmtree(real / "universal", ignore_errors=True)
