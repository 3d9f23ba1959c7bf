"""The memory planner: parameter counts, ZeRO formulas against DeepSpeed's estimator, the CLI."""
import contextlib
import io
import json
import os
import re

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, \
    estimate_zero3_model_states_mem_needs_all_cold
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs, \
    estimate_zero2_model_states_mem_needs_all_cold

from engine.build import build_model
from engine.config import load_recipe
from engine.memory import (
    GIB,
    Workload,
    activation_bytes,
    model_facts,
    plan,
    recipe_facts,
    zero_model_states,
)
from engine.registry import MODELS

from helpers import ROOT, TINY, load_script


def recipe(name, *options):
    return load_recipe(os.path.join(ROOT, "recipes", name), list(options), check_files=False)


@pytest.mark.parametrize("arch,options", [
    ("blip2_opt", []),
    ("blip2_t5", ["model.freeze_vit=true", "model.freeze_llm=true"]),
    ("blip2_vicuna_instruct", ["model.freeze_llm=true", "model.lora.r=4", "model.lora.on=[llm,qformer]"]),
    ("blip2_t5_instruct", ["model.freeze_qformer=true", "model.lora.r=4"]),
])
def test_planner_counts_equal_the_real_tiny_model(arch, options):
    from deepspeed.runtime.zero.stage3 import model_to_params

    r = load_recipe(TINY, [f"model.arch={arch}", *options])
    facts = recipe_facts(r)  # built on the meta device
    real = build_model(r)  # built for real, weights in memory
    assert facts.params == real.parameter_summary()
    # DeepSpeed's own count on the real model (shared weights once) and its largest layer agree.
    total, largest = model_to_params(real)
    assert facts.params["all"]["total"] == total and facts.largest_layer == largest


def test_planner_counts_the_real_size_opt27b_on_meta():
    p = plan(recipe("sherlock_opt2.7b.yaml"), gpus=1, gpu_mem_gb=24)
    # The COCO checkpoint's ViT takes 364 px: 26^2 + 1 positions; ln_vision counts with the Q-Former.
    assert p.params["all"]["total"] == 3_744_679_936 + 1408 * (26 ** 2 - 16 ** 2)
    assert p.params["vision"] == {"total": 985_949_440 + 1408 * (26 ** 2 - 16 ** 2), "trainable": 0}
    assert p.params["llm"] == {"total": 2_651_596_800, "trainable": 0}
    # Q-Former 105.14M + projection 1.97M + 32 x 768 query tokens + ln_vision (2 x 1408), all trainable.
    assert p.params["qformer"]["total"] == p.params["qformer"]["trainable"] == 107_133_696
    assert p.params["all"]["trainable"] == 107_133_696 and p.params["lora"]["total"] == 0
    # Frozen weights are counted: 2 B each, replicated under ZeRO-2.
    assert p.breakdown_gb["model_states"] * GIB >= 2 * 3_744_679_936
    assert p.fits and 9 < p.gpu_gb < 24


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (4, 1), (8, 2)])
@pytest.mark.parametrize("total", [125_000_000, 3_744_679_936])
def test_zero_formulas_match_deepspeeds_estimator_when_everything_trains(total, gpus, nodes):
    largest = total // 30
    for offload in (False, True):
        ours = zero_model_states(total=total, trainable=total, stage=2, gpus_per_node=gpus, nodes=nodes,
                                 offload_optimizer=offload)
        assert ours == estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)
    for offload_opt, offload_param in ((False, False), (True, False), (True, True)):
        for zero_init in (True, False):
            ours = zero_model_states(total=total, trainable=total, stage=3, gpus_per_node=gpus, nodes=nodes,
                                     offload_optimizer=offload_opt, offload_param=offload_param,
                                     largest_layer=largest, zero_init=zero_init)
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=offload_opt,
                                                                cpu_offload_params=offload_param,
                                                                zero_init=zero_init)
            assert ours == (cpu, gpu)


def test_zero_formulas_match_the_all_cold_tables():
    # The printed tables of estimate_zero{2,3}_model_states_mem_needs_all_cold, row by row.
    total, largest, gpus = 3_744_679_936, 128_696_320, 8

    def rows(fn, *args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fn(*args, num_gpus_per_node=gpus)
        return [(float(c), float(g)) for c, g in re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB", out.getvalue(), re.M)]

    def gb(pair):
        return tuple(round(x / 2 ** 30, 2) for x in pair)

    two = rows(estimate_zero2_model_states_mem_needs_all_cold, total)
    assert two == [gb(zero_model_states(total=total, trainable=total, stage=2, gpus_per_node=gpus,
                                        offload_optimizer=o)) for o in (True, False)]
    three = rows(estimate_zero3_model_states_mem_needs_all_cold, total, largest)
    ours = [gb(zero_model_states(total=total, trainable=total, stage=3, gpus_per_node=gpus, offload_optimizer=oo,
                                 offload_param=op, largest_layer=largest, zero_init=zi))
            for oo, op in ((True, True), (True, False), (False, False)) for zi in (True, False)]
    assert three == ours


def test_frozen_weights_count_but_train_nothing():
    states = dict(total=1_000_000_000, stage=2, gpus_per_node=4)
    frozen = zero_model_states(trainable=0, **states)
    all_train = zero_model_states(trainable=1_000_000_000, **states)
    assert frozen[1] == 2 * 1_000_000_000  # the 16-bit weights stay
    assert all_train[1] == 2 * 1_000_000_000 + 18 * 1_000_000_000 // 4
    # ZeRO-3 partitions frozen weights too; offloading parameters moves them to CPU.
    assert zero_model_states(trainable=0, **dict(states, stage=3))[1] == 2 * 1_000_000_000 // 4
    assert zero_model_states(trainable=0, offload_optimizer=True, offload_param=True,
                             **dict(states, stage=3))[1] == 0


def test_random_init_builds_every_zoo_entry_on_meta():
    for entry in MODELS:
        for model_type, zoo in entry.zoo.items():
            if model_type == "tiny":
                continue
            with torch.device("meta"):
                model = entry(model_type=model_type, pretrained="random")
            assert all(p.is_meta for p in model.parameters()), (entry.name, model_type)
            facts = model_facts(model)
            text = zoo.config["text_config"]
            assert facts.llm["layers"] == text.get("num_hidden_layers", text.get("num_layers"))
            assert facts.vision["layers"] == 39 and facts.num_query_tokens == 32
            s = facts.params
            # EVA ViT-g without ln_vision; the caption_coco_* ViTs take 364 px: (26^2 - 16^2) more positions.
            vit = 985_949_440 + (1408 * (26 ** 2 - 16 ** 2) if model_type.startswith("caption_coco") else 0)
            assert s["all"]["total"] > 3.7e9 and s["vision"]["total"] == vit, (entry.name, model_type)
            assert s["all"]["trainable"] == s["qformer"]["trainable"] > 0  # BLIP-2 defaults: ViT and LLM frozen


def test_activations_follow_batch_checkpointing_and_what_trains():
    frozen_vit = recipe_facts(recipe("sherlock_opt2.7b.yaml"))
    work = Workload(batch=8, image_size=224, max_txt_len=32, grad_checkpoint=False)
    base = activation_bytes(frozen_vit, work)
    double = activation_bytes(frozen_vit, Workload(16, 224, 32, False))
    ckpt = activation_bytes(frozen_vit, Workload(8, 224, 32, False, checkpoint_llm=True))
    assert double["llm"] == 2 * base["llm"] and double["loss"] == 2 * base["loss"]
    assert ckpt["llm"] < base["llm"] / 4
    # use_grad_checkpoint is LAVIS's: the ViT only, so with a frozen ViT it changes nothing
    assert activation_bytes(frozen_vit, Workload(8, 224, 32, True)) == base
    trained_vit = recipe_facts(recipe("coco_caption_opt2.7b.yaml"))
    vit = activation_bytes(trained_vit, Workload(8, 224, 32, False))["vision"]
    assert vit > 50 * base["vision"]  # a frozen ViT under no graph keeps one layer's working set only


def test_a_recipe_that_does_not_fit_gets_changes_that_do():
    r = recipe("coco_caption_opt2.7b.yaml", "run.deepspeed=ds_configs/zero2.json")
    p = plan(r, gpus=1, gpu_mem_gb=24)
    assert not p.fits and p.suggestions
    offload = [s for s in p.suggestions if "zero2_offload.json" in " ".join(s["options"])]
    assert offload and offload[0]["fits"] and offload[0]["gpu_gb"] <= 24
    assert plan(r, gpus=8, gpu_mem_gb=24).fits  # ZeRO-2 partitions the ViT's optimizer states over 8 GPUs



def test_llm_checkpointing_is_suggested_only_when_the_batch_does_not_fit():
    big = plan(recipe("sherlock_opt2.7b.yaml", "run.batch_size_train=64"), gpus=1, gpu_mem_gb=24)
    assert not big.fits
    llm = [s for s in big.suggestions if s["options"] == ["model.checkpoint_llm=true"]]
    assert llm and llm[0]["gpu_gb"] <= 24 < big.gpu_gb
    fits = plan(recipe("sherlock_opt2.7b.yaml", "run.batch_size_train=32"), gpus=1, gpu_mem_gb=24)
    assert fits.fits and not fits.suggestions  # batch 32 fits a 24 GiB card without recomputation


def test_cli_prints_one_json_object(capsys):
    from tools.plan_memory import main

    code = main(["--recipe", os.path.join(ROOT, "recipes", "sherlock_vicuna13b_lora.yaml"), "--gpu-mem", "24",
                 "--gpus", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True
    for part in ("vision", "qformer", "llm", "lora"):
        assert set(out["params"][part]) == {"total", "trainable"}
    assert out["params"]["lora"]["trainable"] > 0 and out["params"]["llm"]["trainable"] == 0
    assert out["gpu_gb"] <= 24 < out["params"]["llm"]["total"] * 2 / 2 ** 30  # the LLM alone would not fit
    assert out["cpu_gb"] > 0 and out["gpus"] == 2 and out["zero_stage"] == 3


def test_every_recipe_names_its_ds_config_and_planner_peak():
    for name in sorted(os.listdir(os.path.join(ROOT, "recipes"))):
        if not name.endswith(".yaml") or name.startswith("tiny"):
            continue
        text = open(os.path.join(ROOT, "recipes", name)).read()
        assert re.search(r"^# Planner .*GiB", text, re.M), name
        r = recipe(name)
        assert r.run.deepspeed.startswith("ds_configs/") and r.model.pretrained.startswith("/data/hf/"), name
        assert plan(r, gpus=1, gpu_mem_gb=24, suggest=False).fits, name


def test_gpu_benchmark_says_it_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench/gpu_memory.py would run for real")
    bench = load_script("bench", "gpu_memory")
    assert bench.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_split_sherlock_carves_a_dev_split_by_image(tmp_path):
    from tools.split_sherlock import DEV_OUT, TRAIN_OUT, main

    def rec(i, image):
        return {"inputs": {"image": {"url": f"http://x/vcr1images/movie_{image}/{image}.jpg"}}, "instance_id": str(i)}

    records = [rec(i, i // 3) for i in range(3000)]  # 3 inferences per image
    (tmp_path / "sherlock_dataset").mkdir()
    (tmp_path / "sherlock_dataset" / "sherlock_train_v1_1.json").write_text(json.dumps(records))
    assert main(["--root", str(tmp_path), "--dev-fraction", "0.05"]) == 0
    train = json.loads((tmp_path / TRAIN_OUT).read_text())
    dev = json.loads((tmp_path / DEV_OUT).read_text())
    assert len(train) + len(dev) == 3000 and 60 < len(dev) < 250
    images = lambda rs: {r["inputs"]["image"]["url"] for r in rs}  # noqa: E731
    assert not images(train) & images(dev) and len(dev) % 3 == 0
    assert main(["--root", str(tmp_path), "--dev-fraction", "0.05"]) == 0  # the same split every time
    assert json.loads((tmp_path / DEV_OUT).read_text()) == dev


def test_auto_batch_picks_the_largest_micro_batch_that_fits_and_accumulates_to_the_global_batch(monkeypatch):
    import engine.memory as memory

    def auto(gpu_gb, global_batch, world=1):
        r = recipe("sherlock_opt2.7b.yaml", "run.batch_size_train=auto", f"run.global_batch_size={global_batch}")
        assert r.auto_batch  # the schema only records the wish; the planner resolves it
        memory.resolve_auto_batch(r, world, gpu_gb)
        assert not r.auto_batch
        return r

    r = auto(24.0, 128)  # a 24 GiB card
    assert (r.run.batch_size_train, r.run.accum_grad_iters) == (32, 4)  # 64 does not fit (26.9 GiB predicted)
    assert plan(r, gpus=1, gpu_mem_gb=24).fits
    big = auto(80.0, 128)
    assert big.run.batch_size_train == 128 and big.run.accum_grad_iters == 1
    cpu = auto(None, 48)  # CPU: up to 16
    assert (cpu.run.batch_size_train, cpu.run.accum_grad_iters) == (16, 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    four = auto(None, 48, world=4)
    assert (four.run.batch_size_train, four.run.accum_grad_iters) == (12, 1)
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"run.batch_size_train.*not even a micro batch of 1 fits 2.0 GiB"):
        auto(2.0, 128)


def test_auto_batch_needs_a_global_batch_that_agrees():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="run.global_batch_size"):
        recipe("sherlock_opt2.7b.yaml", "run.batch_size_train=auto")
    with pytest.raises(ConfigError, match=r"run.global_batch_size.*8 x run.accum_grad_iters 1 x 1 rank\(s\) = 8"):
        recipe("sherlock_opt2.7b.yaml", "run.global_batch_size=64")
