"""Fast start: a random real-size model (`pretrained: random`) is drawn directly in the run's dtype on the rank's
device, never as an fp32 copy first; the seeded tiny models keep their fp32-on-host weights; a run's random base
is recognised again (resume, export); ZeRO-3 still partitions while building. Small real-shaped zoo entries stand
in for the real sizes (the same code path: not `tiny`)."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.build import build_model
from engine.checkpoints.common import ExportError
from engine.config import load_recipe
from engine.export import seeded_base_device
from engine.models.zoo import ZOO_OPT, ZOO_T5, ZooEntry, opt_text_config
from engine.registry import MODELS
from engine.trainer.checkpoint import describe_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(ROOT, "recipes", "tiny_sherlock.yaml")

# Real vocabularies (the embeddings and T5's untied head dominate, as at full size), tiny widths and depths.
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
               patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02)
_QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                cross_attention_frequency=2, encoder_hidden_size=64, vocab_size=30522)
_T5 = dict(model_type="t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
           vocab_size=32128, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
           relative_attention_num_buckets=32, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
           decoder_start_token_id=0)
SMALL = {
    "blip2_opt": (ZOO_OPT, dict(vision_config=_VISION, qformer_config=_QFORMER,
                                text_config=opt_text_config(64, 2, 4, 128), num_query_tokens=8)),
    "blip2_t5": (ZOO_T5, dict(vision_config=_VISION, qformer_config=_QFORMER, text_config=_T5, num_query_tokens=8)),
}
SMALL_CODE = f"""
from engine.models.zoo import ZOO_OPT, ZooEntry, opt_text_config
ZOO_OPT["small_real"] = ZooEntry(None, {{"max_txt_len": 32, "prompt": ""}}, dict(vision_config={_VISION!r},
    qformer_config={_QFORMER!r}, text_config=opt_text_config(64, 2, 4, 128), num_query_tokens=8))
"""


@pytest.fixture
def small_zoo(monkeypatch):
    """A `small_real` model_type for blip2_opt and blip2_t5, only for the test (other tests list the zoo)."""
    for zoo, config in SMALL.values():
        monkeypatch.setitem(zoo, "small_real", ZooEntry(None, {"max_txt_len": 32, "prompt": ""}, config))


class Float32Allocations(TorchDispatchMode):
    """Bytes of every new fp32 tensor the ops make (outputs that share no storage with an input: no views or
    in-place results)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta" \
                    and t.untyped_storage().data_ptr() not in ins:
                self.bytes += t.numel() * 4
                self.largest = max(self.largest, t.numel())
        return out


def _build(arch, **kwargs):
    return MODELS.get(arch)(**kwargs)


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("arch", list(SMALL))
def test_random_real_size_is_drawn_in_the_run_dtype_with_no_fp32_copy(arch, small_zoo):
    with Float32Allocations() as fp32:
        model = _build(arch, model_type="small_real", pretrained="random", torch_dtype=torch.bfloat16, seed=3)
    params = dict(model.hf.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    biggest = max(p.numel() for p in params.values())
    # No fp32 copy of the weights: what fp32 there is are a few small buffers and transformers' fp32 draw of a
    # truncated normal (the ViT's position embedding), far below one embedding matrix.
    assert fp32.largest < biggest // 20 and fp32.bytes < _param_bytes(model) // 20, (fp32.bytes, fp32.largest)
    # LAVIS's query-token init and, for Flan-T5, an untied head drawn in bf16 (std = initializer_factor 1.0)
    assert 0.015 < model.hf.query_tokens.float().std().item() < 0.025
    if arch == "blip2_t5":
        head, shared = params["language_model.lm_head.weight"], params["language_model.shared.weight"]
        assert head is not shared and not torch.equal(head, shared)
        assert 0.95 < head.float().std().item() < 1.05


class HostAllocations(Float32Allocations):
    """Bytes of every new tensor, of any dtype, made off the meta device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.bytes += t.numel() * t.element_size()
        return out


def test_with_a_device_nothing_is_made_elsewhere_lora_included(small_zoo):
    """Given a device (meta here: any other allocation would be a real one), the weights, buffers and LoRA
    adapters of a random real-size model are all made there."""
    with HostAllocations() as host:
        model = _build("blip2_opt", model_type="small_real", pretrained="random", torch_dtype=torch.bfloat16,
                       device="meta", lora={"r": 4, "alpha": 8})
    lora = [p for n, p in model.hf.named_parameters() if "lora_" in n]
    assert lora and all(p.is_meta and p.dtype == torch.bfloat16 for p in lora)
    assert host.bytes == 0, host.bytes  # (without the device around LoRA: its adapters, 24 KiB here)


def test_the_allocation_count_sees_an_fp32_build(small_zoo):
    """The counter is not blind: the seeded tiny model, drawn in fp32 and then cast, shows its fp32 copy."""
    with Float32Allocations() as fp32:
        model = _build("blip2_opt", model_type="tiny", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert fp32.bytes >= 2 * _param_bytes(model)  # the whole model in fp32: twice its bf16 size


def test_random_real_size_weights_follow_seed_dtype_and_device(small_zoo):
    def weights(**kw):
        kw = dict(dict(model_type="small_real", pretrained="random", torch_dtype=torch.bfloat16, seed=3), **kw)
        return {k: v.clone() for k, v in _build("blip2_opt", **kw).hf.state_dict().items()}

    first, again, other = weights(), weights(), weights(seed=4)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["query_tokens"], other["query_tokens"])
    on_meta = _build("blip2_opt", model_type="small_real", pretrained="random", torch_dtype=torch.bfloat16,
                     device="meta")  # drawn where it is asked, with no device context around the call
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in on_meta.parameters())
    before = torch.random.get_rng_state()
    weights()
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG did not move


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_t5"])
def test_tiny_weights_are_the_same_in_every_precision(arch):
    """The seeded tiny models keep their fp32-on-host draw: bf16 is the fp32 weights rounded."""
    fp32 = _build(arch, model_type="tiny", seed=5).hf.state_dict()
    bf16 = _build(arch, model_type="tiny", seed=5, torch_dtype=torch.bfloat16).hf.state_dict()
    for k, v in fp32.items():
        assert torch.equal(bf16[k], v.to(bf16[k].dtype)), k


def _recipe(*options):
    return load_recipe(TINY_RECIPE, ["model.model_type=small_real", "model.pretrained=random",
                                     "model.freeze_vit=true", "model.freeze_llm=true", *options], check_files=False)


def test_random_base_is_recognised_by_resume_and_export(small_zoo):
    recipe = _recipe("run.precision=bf16")
    cfg = recipe.to_dict()["model"]
    trained = build_model(recipe, dtype=torch.bfloat16)  # as engine/train.py on a CPU run
    base = describe_base(cfg, recipe.run.seed, "bf16", trained)
    assert base["reproducible"] and base["device"] == "cpu" and "(bf16, drawn on cpu)" in base["path"]
    resumed = describe_base(cfg, recipe.run.seed, "bf16", build_model(recipe, dtype=torch.bfloat16))
    assert resumed["fingerprint"] == base["fingerprint"]
    # Export and evaluation build in fp32: the run's bf16 draw, cast; so the base matches the checkpoint's.
    exported = build_model(recipe)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    assert describe_base(cfg, recipe.run.seed, "bf16", exported)["fingerprint"] == base["fingerprint"]
    other = describe_base(cfg, recipe.run.seed, "bf16", build_model(_recipe("run.seed=7"), dtype=torch.bfloat16))
    assert other["fingerprint"] != base["fingerprint"]
    frozen = next(p for p in trained.parameters() if not p.requires_grad)  # another draw of one tensor
    with torch.no_grad():
        frozen.copy_(torch.randn_like(frozen))
    assert describe_base(cfg, recipe.run.seed, "bf16", trained)["fingerprint"] != base["fingerprint"]


def test_export_redraws_a_random_base_only_on_its_device_type(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert seeded_base_device({"base": {"kind": "seeded", "device": "cpu"}}, "ckpt") is None
    assert seeded_base_device({"base": {"kind": "seeded"}}, "ckpt") is None  # tiny, or written before devices
    assert seeded_base_device({"base": {"kind": "folder", "device": "cuda"}}, "ckpt") is None
    with pytest.raises(ExportError, match=r"run/checkpoints/s4: .*drawn on cuda.*run.save_frozen=true"):
        seeded_base_device({"base": {"kind": "seeded", "device": "cuda", "path": "x random weights (bf16, drawn on "
                                                                                "cuda)"}}, "run/checkpoints/s4")


def test_random_real_size_is_partitioned_while_building_under_zero3(tmp_path):
    """engine/train.py's ZeRO-3 path: HfDeepSpeedConfig alive, no device; the weights never exist whole."""
    script = SMALL_CODE + f"""
import torch
from transformers.integrations import HfDeepSpeedConfig
from engine.build import build_model
from engine.config import load_recipe
from engine.deepspeed_config import fill_ds_config
from engine.trainer.checkpoint import describe_base
from engine.trainer.topology import init_distributed
init_distributed()
recipe = load_recipe({TINY_RECIPE!r}, ["model.model_type=small_real", "model.pretrained=random",
    "model.freeze_vit=true", "model.freeze_llm=true", "run.deepspeed=ds_configs/zero3.json",
    "run.output_dir={tmp_path}"], check_files=False)
hf_ds = HfDeepSpeedConfig(fill_ds_config(recipe, 1, on_cpu=True))
model = build_model(recipe, dtype=torch.bfloat16)
params = [p for p in model.parameters() if hasattr(p, "ds_id")]
# Every weight matrix and embedding is partitioned as it is made (transformers rebuilds the ViT's qkv bias
# after zero.Init has seen the layer: deepspeed.initialize partitions that vector).
whole = [(n, tuple(p.shape)) for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
assert all(len(shape) == 1 and "qkv.bias" in n for n, shape in whole), whole
assert all(p.numel() == 0 for p in params) and sum(p.ds_numel for p in params) > 3_000_000
assert {{p.ds_tensor.dtype for p in params}} == {{torch.bfloat16}}, {{p.ds_tensor.dtype for p in params}}
base = describe_base(recipe.to_dict()["model"], recipe.run.seed, "bf16", model)
assert base["reproducible"] is False and base["fingerprint"] is None
print("PARTITIONED", len(params), whole)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "PARTITIONED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
