import json
import logging
import os
from unittest import mock

import pytest
import yaml

from engine.config import ConfigError, load_recipe, parse_recipe, save_resolved
from engine.deepspeed_config import fill_ds_config
from engine.trainer.schedule import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")


def tiny(**run):
    return {
        "model": {"arch": "blip2_opt", "model_type": "tiny", "prompt": "Inference: "},
        "datasets": {"sherlock": {"root": "/tmp/nowhere"}},
        "run": {"deepspeed": "ds_configs/zero2.json", "output_dir": "/tmp/x", **run},
    }


def problems_of(data, **kw):
    with pytest.raises(ConfigError) as ei:
        parse_recipe(data, source="t.yaml", **kw)
    return ei.value, str(ei.value)


def test_typo_gets_did_you_mean_and_all_problems_are_reported_together():
    data = tiny(init_lrr=1e-4, max_epoch="five")
    data["model"]["frezze_vit"] = False
    err, text = problems_of(data)
    assert len(err.problems) == 3
    assert "run.init_lrr: unknown key; did you mean 'init_lr'?" in text
    assert "model.frezze_vit: unknown key; did you mean 'freeze_vit'?" in text
    assert "run.max_epoch: 'five' should be an integer" in text
    assert "t.yaml" in text


def test_choice_and_unknown_registry_names_list_alternatives():
    data = tiny(precision="bf61")
    data["model"]["arch"] = "blip2_opp"
    err, text = problems_of(data)
    assert "model.arch: unknown model 'blip2_opp'. Did you mean 'blip2_opt'" in text
    assert "python -m engine list" in text
    data = tiny(precision="bf61")
    _, text = problems_of(data)
    assert "run.precision: 'bf61' is not allowed; choose one of bf16, fp16, fp32; did you mean 'bf16'?" in text


def test_yaml_scientific_notation_and_options_override():
    data = tiny(init_lr="1e-5")  # PyYAML reads 1e-5 without a dot as a string
    r = parse_recipe(data, options=["run.init_lr=3e-4", "model.freeze_vit=false", "run.valid_splits=[val,test]"])
    assert r.run.init_lr == pytest.approx(3e-4)
    assert r.model.freeze_vit is False
    assert r.run.valid_splits == ["val", "test"]


def test_priority_zoo_then_recipe_then_options():
    data = tiny()
    r = parse_recipe(data)
    assert r.model.max_txt_len == 32 and r.model.image_size is None  # zoo default; the size is the ViT's
    data["model"]["max_txt_len"] = 20
    assert parse_recipe(data).model.max_txt_len == 20  # the recipe beats the zoo
    assert parse_recipe(data, options=["model.max_txt_len=24"]).model.max_txt_len == 24  # options beat both


def test_processor_size_must_match_the_vit_unless_model_image_size_asks():
    data = tiny()
    data["datasets"]["sherlock"]["vis_processor"] = {"eval": {"name": "blip_image_eval", "image_size": 224}}
    with pytest.raises(ConfigError) as err:
        parse_recipe(data)
    msg = str(err.value)
    assert "datasets.sherlock.vis_processor.eval.image_size" in msg and "224 px" in msg and "64 px" in msg
    assert "model.image_size: 224" in msg
    data["model"]["image_size"] = 224  # asks for it: the ViT's position embeddings are interpolated
    assert parse_recipe(data).model.image_size == 224
    data["model"]["image_size"] = 96
    with pytest.raises(ConfigError, match="model.image_size=96 takes 96 px"):
        parse_recipe(data)


def test_launcher_keys_are_accepted_with_a_warning(caplog):
    data = tiny(device="cuda", world_size=8, dist_url="env://", distributed=True)
    with caplog.at_level(logging.WARNING):
        parse_recipe(data)
    assert "run.world_size is ignored" in caplog.text and "run.dist_url is ignored" in caplog.text


def test_contradictions(tmp_path):
    data = tiny(min_lr=1e-3, init_lr=1e-4)
    data["model"].update(freeze_vit=True, freeze_qformer=True, freeze_llm=True)
    _, text = problems_of(data)
    assert "run.min_lr" in text and "nothing would train" in text


def write_ds(tmp_path, **fields):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    for k, v in fields.items():
        cfg[k] = v
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_ds_config_disagreement_is_an_error(tmp_path):
    ds = write_ds(tmp_path, train_micro_batch_size_per_gpu=4, bf16={"enabled": False})
    _, text = problems_of(tiny(deepspeed=ds, batch_size_train=8, precision="bf16"))
    assert "train_micro_batch_size_per_gpu=4 but run.batch_size_train=8" in text
    assert "bf16.enabled=False but run.precision='bf16'" in text


def test_offload_param_needs_stage3(tmp_path):
    ds = write_ds(tmp_path, zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}})
    _, text = problems_of(tiny(deepspeed=ds))
    assert "offload_param" in text and "stage 3" in text


def test_fill_ds_config_from_recipe():
    r = parse_recipe(tiny(batch_size_train=4, accum_grad_iters=2, grad_clip=0.5, precision="fp32", init_lr=2e-4))
    ds = fill_ds_config(r, world_size=3, on_cpu=True)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and "fp16" not in ds and "scheduler" not in ds
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="fp16.*needs a GPU"):
        fill_ds_config(parse_recipe(tiny(precision="fp16")), world_size=1, on_cpu=True)


def test_filled_config_checks_once_per_step_and_overlaps_only_with_communication():
    r = parse_recipe(tiny(precision="bf16"))  # ds_configs/zero2.json asks for overlap_comm
    one = fill_ds_config(r, world_size=1, on_cpu=False)
    assert one["bf16"]["check_grad_overflow"] is False  # the step's one check: engine/trainer/step_check.py
    assert one["zero_optimization"]["overlap_comm"] is False  # one rank: nothing to overlap
    assert one["zero_optimization"]["contiguous_gradients"] is False  # ... nor to batch into buckets
    two = fill_ds_config(r, world_size=2, on_cpu=False)["zero_optimization"]
    assert two["overlap_comm"] is True and two["contiguous_gradients"] is True


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(RECIPES) if f.endswith(".yaml")))
def test_every_shipped_recipe_validates(name):
    # Weights and data folders may be absent here: validation must not need them.
    r = load_recipe(os.path.join(RECIPES, name))
    assert r.datasets and r.model.arch


def test_resolved_config_round_trips(tmp_path):
    r = load_recipe(os.path.join(RECIPES, "tiny_sherlock.yaml"), options=["run.init_lr=5e-4"])
    out = tmp_path / "config.yaml"
    save_resolved(r, str(out))
    again = load_recipe(str(out))
    assert again.to_dict() == r.to_dict()
    assert yaml.safe_load(out.read_text())["run"]["init_lr"] == 5e-4


def test_unsafe_yaml_tags_are_refused(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(p))


def test_cosine_schedule_shape():
    # The engine's own per-step cosine: warmup over optimizer steps, then a cosine over the run.
    kw = dict(sched="linear_warmup_cosine_lr_per_step", init_lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10,
              total_steps=110, steps_per_epoch=50, decay_rate=0.9)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(5, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, **kw) == pytest.approx(1e-5)


def test_lavis_schedules_step_per_epoch_with_warmup_in_the_first():
    """LAVIS's linear_warmup_cosine_lr / linear_warmup_step_lr / constant_lr (lavis/common/optims.py):
    warmup per iteration in epoch 0 only (capped at init_lr), then one rate per epoch."""
    import math

    kw = dict(init_lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10, total_steps=150, steps_per_epoch=50,
              decay_rate=0.9, max_epoch=3)
    cos = dict(kw, sched="linear_warmup_cosine_lr")
    assert lr_at(0, **cos) == pytest.approx(1e-6)
    assert lr_at(5, **cos) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, **cos) == lr_at(49, **cos) == pytest.approx(1e-3)  # the rest of epoch 0: init_lr
    for step in (50, 75, 99):  # epoch 1: one value, cosine of epoch / max_epoch
        assert lr_at(step, **cos) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 3)))
    assert lr_at(100, **cos) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(2 * math.pi / 3)))
    # With accumulation the optimizer step uses the rate LAVIS set before its last micro-batch.
    assert lr_at(1, **dict(cos, accum=4)) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 7 / 10)
    step = dict(kw, sched="linear_warmup_step_lr")
    assert lr_at(5, **step) == lr_at(5, **cos) and lr_at(60, **step) == pytest.approx(1e-3 * 0.9)
    assert lr_at(120, **step) == pytest.approx(1e-3 * 0.81)
    const = dict(kw, sched="constant_lr")
    assert lr_at(5, **const) == lr_at(5, **cos) and lr_at(120, **const) == 1e-3
    # No warmup (LAVIS's default warmup_lr = init_lr): init_lr from the first step.
    assert lr_at(0, **dict(cos, warmup_steps=0, warmup_lr=1e-3)) == 1e-3



def test_lora_on_parses_as_a_key_not_a_yaml_boolean(tmp_path):
    # YAML 1.1 reads on/off/yes/no as booleans (`on:` would become a `True:` key); recipes use
    # YAML 1.2 booleans, true/false only.
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tiny()).replace(
        "model:\n", "model:\n  lora: {r: 4, on: [llm, qformer]}\n  freeze_llm: yes\n", 1))
    with pytest.raises(ConfigError, match="model.freeze_llm: 'yes' should be true or false"):
        load_recipe(str(p))
    r = load_recipe(str(p), options=["model.freeze_llm=true"])
    assert r.model.lora.on == ["llm", "qformer"] and r.model.freeze_llm is True


def test_cuda_arch_suffixes_are_made_readable_for_deepspeeds_op_builder():
    # Hopper/Blackwell containers set entries like 9.0a; DeepSpeed's builder cannot parse them (its fused Adam
    # would fail to build on the GPU). Proved against DeepSpeed's own CUDA builder, which needs no GPU here.
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    from engine.deepspeed_config import normalize_cuda_arch_list

    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0a 10.0f+PTX;9.0"}
    with mock.patch.dict(os.environ, env):
        with pytest.raises(ValueError, match="0a"):
            FusedAdamBuilder().compute_capability_args()
        note = normalize_cuda_arch_list()
        assert "9.0a" in note and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0+PTX"
        args = FusedAdamBuilder().compute_capability_args()
        assert "-gencode=arch=compute_90,code=sm_90" in args and "-gencode=arch=compute_100,code=compute_100" in args
        assert normalize_cuda_arch_list() == ""  # already readable: untouched, nothing said
    assert normalize_cuda_arch_list({}) == ""


def test_lavis_optimisation_defaults_no_clipping_and_lavis_decay_groups():
    """grad_clip: LAVIS never clips; weight decay on every trained parameter of 2+ dimensions that is not a
    bias (query_tokens included), as LAVIS's get_optimizer_params."""
    from engine.models import build_vlm
    from engine.trainer.optim import param_groups

    r = parse_recipe(tiny())
    assert r.run.grad_clip == 0.0 and r.run.warmup_lr is None and r.run.lr_sched == "linear_warmup_cosine_lr"
    assert fill_ds_config(r, world_size=1, on_cpu=True)["gradient_clipping"] == 0.0
    model = build_vlm("blip2_opt", model_type="tiny")
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "hf.query_tokens" in decay and "hf.language_projection.weight" in decay
    assert "hf.language_projection.bias" in no_decay and "hf.vision_model.post_layernorm.weight" in no_decay
    assert all(n.endswith("bias") or model.get_parameter(n).dim() < 2 for n in no_decay)
    assert all(model.get_parameter(n).dim() >= 2 for n in decay)


# LAVIS's lavis/projects/blip2/train/caption_coco_ft.yaml with its model type's defaults
# (configs/models/blip2/blip2_caption_opt2.7b.yaml), as the engine names them.
CAPTION_COCO_FT = {
    "model.arch": "blip2_opt", "model.model_type": "caption_coco_opt2.7b", "model.load_finetuned": False,
    "model.use_grad_checkpoint": True, "model.freeze_vit": False, "model.image_size": 364, "model.max_txt_len": 32,
    "model.prompt": "a photo of ",  # blip_caption's prompt, as it is applied to the targets
    "vis_processor.train": {"name": "blip2_image_train", "image_size": 364},
    "vis_processor.eval": {"name": "blip_image_eval", "image_size": 364},
    "text_processor.train": {"name": "blip_caption"}, "text_processor.eval": {"name": "blip_caption"},
    "run.task": "captioning", "run.lr_sched": "linear_warmup_cosine_lr", "run.init_lr": 1e-5, "run.min_lr": 0,
    "run.warmup_lr": 1e-8, "run.warmup_steps": 1000, "run.weight_decay": 0.05, "run.max_epoch": 5,
    "run.batch_size_train": 16, "run.batch_size_eval": 8, "run.num_workers": 4, "run.accum_grad_iters": 1,
    "run.max_len": 30, "run.min_len": 8, "run.num_beams": 5, "run.seed": 42, "run.train_splits": ["train"],
    "run.valid_splits": ["val"], "run.test_splits": ["test"], "run.grad_clip": 0.0, "run.length_counting": "lavis",
    "run.evaluate": False,
}


def test_coco_recipe_is_lavis_caption_coco_ft_key_for_key():
    r = load_recipe(os.path.join(RECIPES, "coco_caption_opt2.7b.yaml"), check_files=False)
    ds = r.datasets["coco_caption"]
    for key, want in CAPTION_COCO_FT.items():
        section, name = key.split(".", 1)
        if section in ("vis_processor", "text_processor"):
            p = getattr(ds, section)[name]
            got = {"name": p.name, **p.kwargs}
        else:
            got = getattr(getattr(r, section), name)
        assert got == want, (key, got, want)
    header = open(os.path.join(RECIPES, "coco_caption_opt2.7b.yaml")).read().split("\nmodel:")[0]
    assert "caption_coco_ft.yaml" in header and "Deliberate differences" in header
