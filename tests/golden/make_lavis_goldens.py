r"""Golden references made by LAVIS itself, for tests/test_lavis_goldens.py.

LAVIS's own model classes (blip2_opt, blip2_t5, blip2_vicuna_instruct, blip2_t5_instruct) are built at the
sizes of this engine's `tiny` models, with its tiny tokenizers, and with the weights of the engine's seeded
tiny models (seed 0) in LAVIS's names: that is the "full" LAVIS checkpoint, which the tests rebuild
exactly (`full_lavis_state_dict`) instead of keeping a copy. LAVIS then computes, on fixed pixels and
strings: the loss, the logits and greedy and beam-search captions with LAVIS's caption settings; trains
the model a few steps as its runner would (its optimizer parameter groups; the frozen ViT and LLM); and
saves what its runner saves (`checkpoint_*.pth`: the trained parameters, plus the config) with the loss,
logits and captions of the trained model. The trained parameters are rounded to bf16 before the
references are computed and saved in bf16, so the files stay small and lose nothing. The tied-embedding
copies LAVIS's runner also writes (OPT's lm_head, T5's embed_tokens) are left out of the files; the
tests put them back from the full checkpoint, in the dtype LAVIS runs the LLM in.

Two environments, as LAVIS pins transformers 4.33 and this engine needs 5.x:

1. In the project's environment, write the tiny tokenizers, configs and weights LAVIS is built with:

       python tests/golden/make_lavis_goldens.py prepare /tmp/lavis_golden_work

2. In a separate virtualenv with LAVIS's code (its source; PyPI's salesforce-lavis 1.0.2 predates
   InstructBLIP), transformers 4.33.2 as LAVIS's requirements.txt pins it, and only what its BLIP-2
   model modules import:

       python3.11 -m venv $HOME/lavis-env
       $HOME/lavis-env/bin/pip install torch==2.14.1 torchvision==0.29.1
       $HOME/lavis-env/bin/pip install transformers==4.33.2 timm==0.4.12 fairscale==0.4.4 omegaconf \
           iopath pandas sentencepiece einops "numpy<2"
       git clone https://github.com/salesforce/LAVIS $HOME/lavis-src     # or any copy of its source
       PYTHONPATH=$HOME/lavis-src $HOME/lavis-env/bin/python tests/golden/make_lavis_goldens.py \
           lavis /tmp/lavis_golden_work tests/golden/lavis

   LAVIS's package __init__ files import every dataset and model (and their many dependencies); this
   script loads only the BLIP-2 modules. LAVIS downloads its ViT, BERT and LLM weights from the hub;
   here its loaders are replaced by tiny ones built from the configs of step 1 (nothing else of LAVIS's
   code is changed). LAVIS runs its LLMs in fp16/bf16 under CUDA autocast; on the CPU, with no
   autocast, the references are computed in fp32 throughout.

CI does not install LAVIS: the tests read the committed files only.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict

import torch

ARCHS = ("blip2_opt", "blip2_t5", "blip2_vicuna_instruct", "blip2_t5_instruct")
IMAGE_SIZE = 64  # the tiny ViT's
SEED = 0  # the engine's tiny models are built with this seed

# What each golden run feeds LAVIS. OPT as LAVIS's COCO finetuning: the text processor puts "a photo of "
# before every caption, the model masks and generates from its own prompt "a photo of". The others as
# LAVIS's instruction models: a prompt (text_input) and a target (text_output). Long strings exercise
# truncation (max_txt_len, max_output_txt_len) and lengths LAVIS's caption settings.
# The two InstructBLIP archs share theirs: LAVIS's instruction-tuned prompt and output lengths, the same samples.
_INSTRUCT = dict(
    model_prompt="", text_prompt=None, max_txt_len=12, max_output_txt_len=10,
    prompts=["describe the image in detail.",
             "what can you infer from the highlighted region of the image? write a short description."],
    targets=["a red circle", "the person is probably going to work because he wears a suit today"],
    run=dict(num_beams=5, max_len=30, min_len=8))
SETUPS: Dict[str, Dict[str, Any]] = {
    "blip2_opt": dict(
        model_prompt="a photo of", text_prompt="a photo of ", max_txt_len=32,
        prompts=["a photo of ", "a photo of "],
        targets=["a man riding a red bike down the street next to a parked car",
                 "two dogs are playing with a ball in the green grass of the park near the tall trees "
                 "while a group of people are standing at the bus stop waiting for the bus to come"],
        run=dict(num_beams=5, max_len=30, min_len=8)),
    "blip2_t5": dict(
        model_prompt="", text_prompt=None, max_txt_len=32,
        prompts=["what is in the picture?", "question: what is the man doing? answer:"],
        targets=["a red circle near the tree", "he is cooking dinner for his family"],
        run=dict(num_beams=5, max_len=30, min_len=8)),
    "blip2_vicuna_instruct": _INSTRUCT,
    "blip2_t5_instruct": _INSTRUCT,
}
TRAIN_STEPS, TRAIN_LR = 3, 1e-3
_FAMILY = {"blip2_opt": "opt", "blip2_t5": "t5", "blip2_vicuna_instruct": "llama", "blip2_t5_instruct": "t5"}
_LLM = {"opt": ("opt_model", "opt_proj"), "t5": ("t5_model", "t5_proj"), "llama": ("llm_model", "llm_proj")}


def golden_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "lavis")


def pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """The float pixels both sides feed the ViT (the same arithmetic in both environments)."""
    return (images_u8.float() / 255.0 - 0.5) / 0.5


def make_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------- engine side (project environment)
def hf_to_lavis(state: Dict[str, torch.Tensor], family: str, instruct: bool) -> Dict[str, torch.Tensor]:
    """transformers BLIP-2 names -> LAVIS names (the inverse of the importer's mapping, written independently
    of it; tests/test_export.py uses it too)."""
    model_prefix, proj_prefix = _LLM[family]
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.*)$", key)
        if m:
            layer, rest = m.groups()
            base = f"visual_encoder.blocks.{layer}."
            if rest == "self_attn.qkv.bias":
                q, k, v = value.chunk(3)
                assert not k.any(), f"{key}: EVA's attention has no key bias, this one is not zero"
                out[base + "attn.q_bias"], out[base + "attn.v_bias"] = q.clone(), v.clone()
            else:
                rest = (rest.replace("layer_norm", "norm").replace("self_attn.projection", "attn.proj")
                        .replace("self_attn.qkv", "attn.qkv"))
                out[base + rest] = value
        elif key == "vision_model.embeddings.class_embedding":
            out["visual_encoder.cls_token"] = value
        elif key == "vision_model.embeddings.position_embedding":
            out["visual_encoder.pos_embed"] = value
        elif key.startswith("vision_model.embeddings.patch_embedding."):
            out["visual_encoder.patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("vision_model.post_layernorm."):
            out["ln_vision." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("qformer.layernorm.", "qformer.embeddings.layernorm.")):
            out["Qformer.bert.embeddings.LayerNorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("qformer.embeddings."):
            out["Qformer.bert." + key[len("qformer."):]] = value
        elif key.startswith("qformer.encoder."):
            out["Qformer.bert." + key[len("qformer."):].replace("attention.attention.", "attention.self.")] = value
        elif key.startswith("language_projection."):
            out[proj_prefix + key[len("language_projection"):]] = value
        elif key.startswith("language_model."):
            out[model_prefix + key[len("language_model"):]] = value
        elif key == "query_tokens":
            out[key] = value
        else:
            raise KeyError(f"no LAVIS name for {key}")
    return out


def engine_tiny(arch: str):
    from engine.models.blip2 import build_vlm

    return build_vlm(arch, model_type="tiny", seed=SEED)


def full_lavis_state_dict(arch: str) -> Dict[str, torch.Tensor]:
    """The full LAVIS checkpoint of the golden run: the engine's seeded tiny model in LAVIS's names,
    with the buffers LAVIS's state dict also holds."""
    model = engine_tiny(arch)
    family, instruct = _FAMILY[arch], model.instruct
    out = hf_to_lavis({k: v.detach().clone() for k, v in model.hf.state_dict().items()}, family, instruct)
    # LAVIS's BERT embeddings keep their position ids as a buffer (also where blip2_opt/blip2_t5 drop the
    # position embeddings themselves).
    n = model.hf.config.qformer_config.max_position_embeddings
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(n)[None]
    return out


def _legacy_tokenizer_json(path: str) -> None:
    """Rewrite tokenizer.json for the tokenizers release transformers 4.33 uses (merges as strings)."""
    with open(path) as f:
        data = json.load(f)
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    data["model"].pop("ignore_merges", None)
    with open(path, "w") as f:
        json.dump(data, f)


def prepare(work: str) -> None:
    from engine.models.tokenizer import local_tokenizer

    os.makedirs(work, exist_ok=True)
    for kind in ("opt", "t5", "llama", "qformer"):
        folder = os.path.join(work, "tokenizer_" + kind)
        local_tokenizer(kind).save_pretrained(folder)
        _legacy_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    configs = {}
    for arch in ARCHS:
        model = engine_tiny(arch)
        cfg = model.hf.config
        text = cfg.text_config.to_dict()
        if text["model_type"] == "t5":  # transformers 5 writes every T5 as tied; the untied head says so here
            text["tie_word_embeddings"] = bool(text.pop("scale_decoder_outputs", True))
        configs[arch] = {"text": text, "vision": cfg.vision_config.to_dict(),
                         "qformer": cfg.qformer_config.to_dict(), "num_query_tokens": cfg.num_query_tokens}
        torch.save(full_lavis_state_dict(arch), os.path.join(work, f"{arch}_full.pth"))
    with open(os.path.join(work, "configs.json"), "w") as f:
        json.dump(configs, f, indent=1, default=str)
    torch.save(make_images(), os.path.join(work, "images.pt"))
    print(f"wrote {work}")


# ----------------------------------------------------------------- LAVIS side (LAVIS's environment)
def _load_lavis():
    import importlib
    import importlib.util
    import types

    root = None
    for entry in sys.path:
        if entry and os.path.isfile(os.path.join(entry, "lavis", "models", "blip2_models", "blip2_opt.py")):
            root = entry
            break
    if root is None:
        raise SystemExit("LAVIS's source is not on PYTHONPATH (a folder holding lavis/models/blip2_models/)")
    for name in ("lavis", "lavis.models", "lavis.models.blip2_models", "lavis.common"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, *name.split("."))]
        sys.modules[name] = module
    # The registry checks a model class against lavis.models.BaseModel: give the bare package that name.
    sys.modules["lavis.models"].BaseModel = importlib.import_module("lavis.models.base_model").BaseModel
    mods = {name: importlib.import_module(f"lavis.models.blip2_models.{name}")
            for name in ("blip2", "blip2_opt", "blip2_t5", "blip2_vicuna_instruct", "blip2_t5_instruct")}
    mods["eva_vit"] = importlib.import_module("lavis.models.eva_vit")
    mods["Qformer"] = importlib.import_module("lavis.models.blip2_models.Qformer")
    return mods


def _patch_lavis(mods, work: str, arch: str) -> None:
    """Replace LAVIS's downloads (EVA ViT-g, bert-base-uncased, the LLM and its tokenizer) by tiny ones."""
    from functools import partial

    import transformers
    from torch import nn
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(work, "configs.json")) as f:
        cfg = json.load(f)[arch]
    vision, qformer, text = cfg["vision"], cfg["qformer"], cfg["text"]
    blip2 = mods["blip2"]

    def tokenizer(kind, **kwargs):
        return PreTrainedTokenizerFast.from_pretrained(os.path.join(work, "tokenizer_" + kind), **kwargs)

    def vit(img_size, drop_path_rate, use_checkpoint, precision):
        return mods["eva_vit"].VisionTransformer(
            img_size=img_size, patch_size=vision["patch_size"], use_mean_pooling=False,
            embed_dim=vision["hidden_size"], depth=vision["num_hidden_layers"],
            num_heads=vision["num_attention_heads"], mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
            qkv_bias=True, drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_checkpoint=use_checkpoint)

    class TinyBertConfig:
        @staticmethod
        def from_pretrained(name):
            c = mods["Qformer"].BertConfig(
                vocab_size=qformer["vocab_size"], hidden_size=qformer["hidden_size"],
                num_hidden_layers=qformer["num_hidden_layers"], num_attention_heads=qformer["num_attention_heads"],
                intermediate_size=qformer["intermediate_size"], hidden_act="gelu",
                max_position_embeddings=qformer["max_position_embeddings"], layer_norm_eps=qformer["layer_norm_eps"],
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=qformer["pad_token_id"])
            return c

    class TinyBertLMHeadModel:
        @staticmethod
        def from_pretrained(name, config):
            return mods["Qformer"].BertLMHeadModel(config)

    def init_tokenizer(cls, truncation_side="right"):
        tok = tokenizer("qformer", truncation_side=truncation_side)
        tok.add_special_tokens({"bos_token": "[DEC]"})  # as LAVIS (already there: no new id)
        return tok

    def llm_loader(cls, config_cls):
        class Loader:
            @staticmethod
            def from_pretrained(name, *args, **kwargs):
                config = kwargs.get("config") or config_cls(**{k: v for k, v in text.items()
                                                               if k not in ("architectures",)})
                return cls(config)  # fp32 (LAVIS asks for fp16, for CUDA)

        return Loader

    # The tiny Q-Former has cross-attention in every layer (a size choice, like its width): LAVIS's
    # init_Qformer takes the frequency as an argument; give it the tiny config's.
    if not hasattr(blip2, "_lavis_init_qformer"):
        blip2._lavis_init_qformer = blip2.Blip2Base.init_Qformer.__func__
    init_qformer = blip2._lavis_init_qformer

    def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
        return init_qformer(cls, num_query_token, vision_width, qformer["cross_attention_frequency"])

    blip2.Blip2Base.init_Qformer = classmethod(init_Qformer)
    blip2.create_eva_vit_g = vit
    blip2.BertConfig = TinyBertConfig
    blip2.BertLMHeadModel = TinyBertLMHeadModel
    blip2.Blip2Base.init_tokenizer = classmethod(init_tokenizer)
    opt = mods["blip2_opt"]
    opt.AutoTokenizer = type("A", (), {"from_pretrained": staticmethod(lambda n, **kw: tokenizer("opt"))})
    opt.OPTForCausalLM = llm_loader(transformers.OPTForCausalLM, transformers.OPTConfig)
    for name in ("blip2_t5", "blip2_t5_instruct"):
        t5 = mods[name]
        t5.T5TokenizerFast = type("T", (), {"from_pretrained": staticmethod(
            lambda n, **kw: tokenizer("t5", **kw))})
        if not hasattr(t5, "_lavis_t5"):  # the first patch keeps LAVIS's own classes
            t5._lavis_t5 = (t5.T5Config, t5.T5ForConditionalGeneration)
        real_config, real_model = t5._lavis_t5
        t5.T5Config = type("C", (), {"from_pretrained": staticmethod(
            lambda n: real_config(**{k: v for k, v in text.items() if k not in ("architectures",)}))})
        t5.T5ForConditionalGeneration = llm_loader(real_model, real_config)
    import lavis.models.blip2_models.modeling_llama as llama

    transformers.LlamaTokenizer = type("L", (), {"from_pretrained": staticmethod(
        lambda n, **kw: tokenizer("llama", **kw))})
    llama.LlamaForCausalLM.from_pretrained = classmethod(
        lambda cls, n, **kw: cls(transformers.LlamaConfig(**{k: v for k, v in text.items()
                                                               if k not in ("architectures",)})))


def _build_lavis(mods, arch: str, setup: Dict[str, Any]):
    kwargs = dict(vit_model="eva_clip_g", img_size=IMAGE_SIZE, drop_path_rate=0, use_grad_checkpoint=False,
                  vit_precision="fp32", freeze_vit=True, num_query_token=None, prompt=setup["model_prompt"],
                  max_txt_len=setup["max_txt_len"])
    if arch == "blip2_opt":
        cls, llm = mods["blip2_opt"].Blip2OPT, dict(opt_model="tiny-opt")
    elif arch == "blip2_t5":
        cls, llm = mods["blip2_t5"].Blip2T5, dict(t5_model="tiny-flan-t5")
    elif arch == "blip2_vicuna_instruct":
        cls, llm = mods["blip2_vicuna_instruct"].Blip2VicunaInstruct, dict(
            llm_model="tiny-vicuna", max_output_txt_len=setup["max_output_txt_len"])
    else:
        cls, llm = mods["blip2_t5_instruct"].Blip2T5Instruct, dict(
            t5_model="tiny-flan-t5", max_output_txt_len=setup["max_output_txt_len"])
    return cls, {**kwargs, **llm}


def _samples(arch: str, setup: Dict[str, Any], image: torch.Tensor) -> Dict[str, Any]:
    if arch == "blip2_opt":  # LAVIS's caption datasets: text_input = blip_caption's prompt + caption
        return {"image": image, "text_input": [p + t for p, t in zip(setup["prompts"], setup["targets"])]}
    return {"image": image, "text_input": list(setup["prompts"]), "text_output": list(setup["targets"])}


def _llm(model):
    for name in ("opt_model", "t5_model", "llm_model"):
        if hasattr(model, name):
            return getattr(model, name)
    raise AttributeError("no LLM")


def target_logits(logits: torch.Tensor, labels: torch.Tensor, decoder_only: bool, n: int = 4) -> torch.Tensor:
    """The logits that predict the first `n` target tokens of sample 0 ([n, vocab])."""
    if decoder_only:
        logits, labels = logits[:, :-1], labels[:, 1:]
    rows = (labels[0] != -100).nonzero().flatten()[:n]
    return logits[0, rows].float()


def _loss_and_logits(model, samples, decoder_only: bool):
    """LAVIS's forward returns the loss only: the LLM's logits and labels are taken with a hook."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["logits"], seen["labels"] = output.logits.detach().clone(), kwargs["labels"].detach().clone()

    handle = _llm(model).register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        loss = model(samples)["loss"]
    handle.remove()
    return loss, target_logits(seen["logits"], seen["labels"], decoder_only)


def _generate(model, arch, setup, image, beams):
    run = setup["run"]
    samples = {"image": image, "prompt": list(setup["prompts"])}
    if arch == "blip2_opt":
        samples = {"image": image}  # LAVIS's caption task: the model's own prompt
    with torch.no_grad():
        return model.generate(samples, num_beams=beams, max_length=run["max_len"], min_length=run["min_len"])


def _reference(model, arch, setup, image):
    model.eval()
    loss, logits = _loss_and_logits(model, _samples(arch, setup, image), _FAMILY[arch] != "t5")
    return {"loss": float(loss), "greedy": _generate(model, arch, setup, image, 1),
            "beam": _generate(model, arch, setup, image, setup["run"]["num_beams"])}, logits


def lavis(work: str, out: str) -> None:
    mods = _load_lavis()
    os.makedirs(out, exist_ok=True)
    image = pixels(torch.load(os.path.join(work, "images.pt")))
    torch.save(torch.load(os.path.join(work, "images.pt")), os.path.join(out, "images.pt"))
    for arch in ARCHS:
        setup = SETUPS[arch]
        _patch_lavis(mods, work, arch)
        with open(os.path.join(work, "configs.json")) as f:
            nq = json.load(f)[arch]["num_query_tokens"]
        cls, kwargs = _build_lavis(mods, arch, setup)
        kwargs["num_query_token"] = nq
        torch.manual_seed(0)
        model = cls(**kwargs)
        for p in model.parameters():  # LAVIS casts T5 to bf16 (for CUDA autocast); fp32 on the CPU
            p.data = p.data.float()
        full = torch.load(os.path.join(work, f"{arch}_full.pth"))
        missing, unexpected = model.load_state_dict(full, strict=False)
        own = model.state_dict()
        if unexpected or [k for k in missing if not k.endswith(("position_ids", "rotary_emb.inv_freq"))]:
            raise SystemExit(f"{arch}: the full checkpoint does not fit LAVIS's model: missing {missing}, "
                             f"unexpected {unexpected}")
        for k, v in full.items():
            if not torch.equal(own[k].float(), v.float()):
                raise SystemExit(f"{arch}: {k} did not load ({own[k].dtype} {own[k].flatten()[:3]} vs "
                                 f"{v.flatten()[:3]})")
        before, logits_before = _reference(model, arch, setup, image)
        record: Dict[str, Any] = {"arch": arch, "setup": setup, "full_keys": sorted(own), "before": before}
        # Train as LAVIS's runner: its parameter groups, AdamW, the loss of forward().
        model.train()
        opt = torch.optim.AdamW(model.get_optimizer_params(weight_decay=0.05, lr_scale=1), lr=TRAIN_LR)
        samples = _samples(arch, setup, image)
        for _ in range(TRAIN_STEPS):
            loss = model(samples)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in trained:
                    p.copy_(p.bfloat16().float())
        record["after"], logits_after = _reference(model, arch, setup, image)
        torch.save(torch.stack([logits_before, logits_after]), os.path.join(out, f"{arch}_logits.pt"))
        record["trained_keys"] = sorted(trained)
        # What LAVIS's runner saves (RunnerBase._save_checkpoint): the state dict without the parameters
        # that do not require grad (by name: tied second names stay; left out here, see the module doc).
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        state = {k: v for k, v in model.state_dict().items() if grads.get(k, True)}
        buffers = {n for n, _ in model.named_buffers()}
        aliases = sorted(k for k in state if k not in grads and k not in buffers)
        for k in aliases:
            del state[k]
        record["runner_aliases_left_out"] = aliases
        state = {k: (v.bfloat16() if k in trained else v) for k, v in state.items()}
        config = {"model": {"arch": arch, "model_type": "tiny", "prompt": setup["model_prompt"],
                            "max_txt_len": setup["max_txt_len"], "image_size": IMAGE_SIZE, "freeze_vit": True},
                  "datasets": {"coco_caption": {
                      "vis_processor": {"train": {"name": "blip2_image_train", "image_size": IMAGE_SIZE},
                                        "eval": {"name": "blip_image_eval", "image_size": IMAGE_SIZE}},
                      "text_processor": {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}}}},
                  "run": {"task": "captioning", **setup["run"]}}
        if setup.get("text_prompt") is not None:
            config["datasets"]["coco_caption"]["text_processor"]["train"]["prompt"] = setup["text_prompt"]
        if "max_output_txt_len" in setup:
            config["model"]["max_output_txt_len"] = setup["max_output_txt_len"]
        torch.save({"model": state, "config": config, "epoch": 0}, os.path.join(out, f"{arch}_checkpoint.pth"))
        with open(os.path.join(out, f"{arch}.json"), "w") as f:
            json.dump(record, f)
        print(arch, "loss", record["before"]["loss"], "->", record["after"]["loss"],
              "| beam", record["after"]["beam"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "prepare":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        prepare(argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "lavis":
        lavis(argv[1], argv[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
