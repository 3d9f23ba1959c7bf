"""LoRA: adapters on the documented modules of every family, training in-process and under
the real entry point with ZeRO-2 and ZeRO-3 on 2 CPU ranks; 8/4-bit requests on CPU."""
import os

import pytest
import torch

from engine.models import DEFAULT_TARGETS
from engine.models.quant import QuantizationError, check_quantization, quantization_config
from engine.registry import MODELS
from helpers import read_jsonl, run_train, tiny_options

ARCHS = [entry.name for entry in MODELS]
PROMPTS = ["inference: ", "inference: "]
TARGETS = ["a red circle on the left", "a blue square"]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_llm_and_qformer_attaches_to_documented_modules_and_trains(arch):
    model = MODELS.get(arch)(model_type="tiny", lora={"r": 4, "alpha": 8, "dropout": 0.0, "on": ["llm", "qformer"]})
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    llm = [n for n in adapted if n.startswith("hf.language_model.")]
    qformer = [n for n in adapted if n.startswith("hf.qformer.")]
    assert llm and qformer and len(llm) + len(qformer) == len(adapted)  # never the vision tower
    assert {n.split(".")[-2] for n in llm} == set(DEFAULT_TARGETS[model.family])
    assert {n.split(".")[-2] for n in qformer} == set(DEFAULT_TARGETS["qformer"])
    for name, p in model.named_parameters():
        if name.startswith("hf.vision_model.post_layernorm."):
            assert p.requires_grad, name  # LAVIS's ln_vision: trains under freeze_vit, gets no adapter
        elif name.startswith("hf.language_model.") or name.startswith("hf.vision_model."):
            assert p.requires_grad == ("lora_" in name), name  # base weights frozen, adapters train
    s = model.parameter_summary()
    assert s["lora"]["trainable"] == s["lora"]["total"] > 0 and s["llm"]["trainable"] == 0

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def eval_loss():  # without the models' dropout, which makes single training losses noisy
        model.eval()
        with torch.no_grad():
            loss = float(model(images, PROMPTS, TARGETS))
        model.train()
        return loss

    before = eval_loss()
    for _ in range(4):
        loss = model(images, PROMPTS, TARGETS)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = eval_loss()
    assert after < before - 0.1, (before, after)
    # peft starts every lora_B at zero: each one moved, so every adapter got gradients.
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_vision_gets_adapters_only_when_named():
    model = MODELS.get("blip2_opt")(model_type="tiny", lora={"r": 4, "on": ["vision"]})
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert adapted and all(n.startswith("hf.vision_model.") and ".qkv." in n for n in adapted)


@pytest.mark.parametrize("ds_config,extra", [
    ("zero2.json", ["model.lora.on=[llm,qformer]"]),
    ("zero3_offload.json", ["run.precision=fp32"]),  # DeepSpeed's CPU Adam steps fp32 states on CPU
])
def test_lora_trains_under_zero_on_two_ranks(tmp_path, ds_config, extra):
    opts = tiny_options(tmp_path, f"run.deepspeed=ds_configs/{ds_config}", "model.freeze_vit=true",
                        "model.freeze_llm=true", "model.lora.r=8", "model.lora.alpha=16", "model.lora.dropout=0.0",
                        "run.init_lr=5e-3", "run.warmup_steps=0", "run.max_epoch=2", "run.val_freq=0", *extra,
                        n_train=32)
    proc = run_train(opts, ranks=2)
    assert proc.returncode == 0
    run = tmp_path / "run"
    steps = read_jsonl(run / "steps.jsonl")
    assert len(steps) == 2 * 32 // (2 * 8)
    assert steps[-1]["loss"] < steps[0]["loss"], [s["loss"] for s in steps]
    log = (run / "train.log").read_text()
    # The trainable-parameter count is printed at start, LoRA on its own line.
    lora_line = next(line for line in log.splitlines() if "parameters lora" in line)
    assert lora_line.split()[-2] != "0" and "trainable" in lora_line
    assert "parameters llm" in log


def test_4bit_on_cpu_is_refused_with_what_to_do_instead(tmp_path):
    proc = run_train(tiny_options(tmp_path, "model.load_in_4bit=true", "model.lora.r=8"))
    assert proc.returncode == 2
    assert "model.load_in_4bit: 4-bit base weights (bitsandbytes) need a CUDA GPU; this run is on cpu" in proc.stderr
    assert "LoRA" in proc.stderr and "zero2_offload.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_quantization_checks_and_config(monkeypatch):
    with pytest.raises(QuantizationError, match="need a CUDA GPU; this run is on cpu"):
        check_quantization(True, False, "cpu")
    with pytest.raises(QuantizationError, match="not both"):
        check_quantization(True, True, "cuda")
    check_quantization(False, False, "cpu")  # nothing asked, nothing to check
    assert quantization_config(False, False) is None
    # On a CUDA machine with bitsandbytes: nf4, double quantisation, bf16 compute, LLM only.
    import engine.models.quant as quant

    monkeypatch.setattr(quant, "check_quantization", lambda *a: None)
    cfg = quantization_config(False, True)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert "vision_model" in cfg.llm_int8_skip_modules and "qformer" in cfg.llm_int8_skip_modules
    assert quantization_config(True, False).load_in_8bit


def test_setup_offers_bitsandbytes_as_the_quant_extra(root):
    text = open(os.path.join(root, "setup.py")).read()
    assert '"quant": ["bitsandbytes' in text
