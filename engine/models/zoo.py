"""Model zoo: LAVIS model_type names -> official HF checkpoint, recipe defaults, architecture.

`defaults` are model-section recipe keys the config layer fills in before the
recipe's own values (zoo < recipe < --options). Keys that are builder
arguments (see `BUILDER_KEYS`) go to the builder; the others (`prompt`) are
read by the data and task code. The image size is not a default: it is the
checkpoint's ViT's (`config`: the `caption_coco_*` models are 364 px, as
LAVIS's and the official ones), see `checkpoint_image_size`.

`config` holds the official hyperparameters as transformers config kwargs, so
`pretrained: random` builds the real architecture without any download (for
memory and throughput planning). The `tiny` entries have `config=None`: their
config depends on the local tokenizer's size and is made by `tiny_config`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Recipe keys in `defaults` that are also builder keyword arguments.
BUILDER_KEYS = ("max_txt_len",)
TINY_IMAGE_SIZE = 64  # the tiny ViT's input size (patch 8 -> 64 patches)


@dataclass(frozen=True)
class ZooEntry:
    hf_name: Optional[str]  # official checkpoint on the HF hub; None for tiny
    defaults: Dict[str, Any]  # model-section recipe defaults (LAVIS values)
    config: Optional[Dict[str, Any]] = field(default=None, repr=False)  # Blip2Config/InstructBlipConfig kwargs


# EVA ViT-g/14 and the BERT-base sized Q-Former, shared by every official checkpoint.
# initializer_range only matters for `random` mode: transformers' vision default
# (1e-10) leaves the ViT embeddings at ~0 and gives exploding grad norms.
_EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02)
_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                cross_attention_frequency=2, encoder_hidden_size=1408, vocab_size=30522)
# InstructBLIP's Q-Former vocabulary has one extra token ([DEC]).
_QFORMER_INSTRUCT = dict(_QFORMER, vocab_size=30523)


def opt_text_config(hidden: int, layers: int, heads: int, ffn: int) -> Dict[str, Any]:
    return dict(model_type="opt", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                ffn_dim=ffn, word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048,
                do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=50118, tie_word_embeddings=True)


def _flan_t5(d_model: int, d_ff: int, layers: int, heads: int) -> Dict[str, Any]:
    return dict(model_type="t5", d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers,
                num_heads=heads, vocab_size=32128, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                tie_word_embeddings=False,
                relative_attention_num_buckets=32, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def _vicuna(hidden: int, layers: int, heads: int, ffn: int) -> Dict[str, Any]:
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, intermediate_size=ffn, vocab_size=32001, max_position_embeddings=2048,
                rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _blip2(text: Dict[str, Any], instruct: bool = False, image_size: int = 224) -> Dict[str, Any]:
    return dict(vision_config=dict(_EVA_VIT_G, image_size=image_size),
                qformer_config=dict(_QFORMER_INSTRUCT if instruct else _QFORMER), text_config=text, num_query_tokens=32)


# Tiny models see 64x64 images (patch 8 -> 64 patches), see `tiny_config`.
_TINY = {"max_txt_len": 32, "prompt": ""}

ZOO_OPT = {
    "pretrain_opt2.7b": ZooEntry("Salesforce/blip2-opt-2.7b", {"max_txt_len": 32, "prompt": ""},
                                 _blip2(opt_text_config(2560, 32, 32, 10240))),
    "pretrain_opt6.7b": ZooEntry("Salesforce/blip2-opt-6.7b", {"max_txt_len": 32, "prompt": ""},
                                 _blip2(opt_text_config(4096, 32, 32, 16384))),
    "caption_coco_opt2.7b": ZooEntry("Salesforce/blip2-opt-2.7b-coco",
                                     {"max_txt_len": 32, "prompt": "a photo of "},
                                     _blip2(opt_text_config(2560, 32, 32, 10240), image_size=364)),
    "caption_coco_opt6.7b": ZooEntry("Salesforce/blip2-opt-6.7b-coco",
                                     {"max_txt_len": 32, "prompt": "a photo of "},
                                     _blip2(opt_text_config(4096, 32, 32, 16384), image_size=364)),
    "tiny": ZooEntry(None, dict(_TINY)),
}

ZOO_T5 = {
    "pretrain_flant5xl": ZooEntry("Salesforce/blip2-flan-t5-xl", {"max_txt_len": 32, "prompt": ""},
                                  _blip2(_flan_t5(2048, 5120, 24, 32))),
    "pretrain_flant5xxl": ZooEntry("Salesforce/blip2-flan-t5-xxl", {"max_txt_len": 32, "prompt": ""},
                                   _blip2(_flan_t5(4096, 10240, 24, 64))),
    "caption_coco_flant5xl": ZooEntry("Salesforce/blip2-flan-t5-xl-coco",
                                      {"max_txt_len": 32, "prompt": "a photo of "},
                                      _blip2(_flan_t5(2048, 5120, 24, 32), image_size=364)),
    "tiny": ZooEntry(None, dict(_TINY)),
}

ZOO_VICUNA_INSTRUCT = {
    "vicuna7b": ZooEntry("Salesforce/instructblip-vicuna-7b", {"max_txt_len": 128, "prompt": ""},
                         _blip2(_vicuna(4096, 32, 32, 11008), instruct=True)),
    "vicuna13b": ZooEntry("Salesforce/instructblip-vicuna-13b", {"max_txt_len": 128, "prompt": ""},
                          _blip2(_vicuna(5120, 40, 40, 13824), instruct=True)),
    "tiny": ZooEntry(None, dict(_TINY)),
}

ZOO_T5_INSTRUCT = {
    "flant5xl": ZooEntry("Salesforce/instructblip-flan-t5-xl", {"max_txt_len": 128, "prompt": ""},
                         _blip2(_flan_t5(2048, 5120, 24, 32), instruct=True)),
    "flant5xxl": ZooEntry("Salesforce/instructblip-flan-t5-xxl", {"max_txt_len": 128, "prompt": ""},
                          _blip2(_flan_t5(4096, 10240, 24, 64), instruct=True)),
    "tiny": ZooEntry(None, dict(_TINY)),
}


_BYTE_NEWLINE = "\u010a"  # "\n" in byte-level BPE ("Ċ"; id 50118 in OPT's vocabulary)


def _tiny_text(family: str, tokenizer: PreTrainedTokenizerBase) -> Dict[str, Any]:
    # Dropout as in the official checkpoints (OPT dropout 0.1 / attention 0.0, Flan-T5 0.1, LLaMA attention 0.0),
    # so the tests of exact resume see the random numbers real runs draw.
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "opt":
        # BLIP-2 OPT ends text with "\n" (LAVIS; eos_token_id 50118 in the official folders), not </s>.
        common["eos_token_id"] = tokenizer.convert_tokens_to_ids(_BYTE_NEWLINE)
        return dict(common, model_type="opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                    word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                    dropout=0.1, attention_dropout=0.0, init_std=0.02)
    if family == "t5":
        # initializer_factor 0.25: T5 draws the untied lm_head from N(0, factor), which at
        # 1.0 starts the tiny model at a loss of ~30 with grad norms in the hundreds.
        return dict(common, model_type="t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                    num_heads=4, initializer_factor=0.25, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                    relative_attention_num_buckets=8,
                    tie_word_embeddings=False, dropout_rate=0.1, decoder_start_token_id=tokenizer.pad_token_id)
    if family == "llama":
        return dict(common, model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=128, max_position_embeddings=256,
                    bos_token_id=1, initializer_range=0.02, tie_word_embeddings=False,
                    attention_dropout=0.0)  # bos <s>, as Vicuna's config
    raise ValueError(f"unknown LLM family '{family}'")


def tiny_config(family: str, instruct: bool, tokenizer: PreTrainedTokenizerBase,
                qformer_tokenizer: Optional[PreTrainedTokenizerBase] = None):
    """Config of a tiny model: same classes as the real ones, 2 layers, tiny widths, the real dropout
    (Q-Former 0.1 hidden and attention, ViT attention 0.0, as the official BLIP-2 configs).

    initializer_range is 0.02 everywhere, for the reason given at `_EVA_VIT_G`.
    """
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TINY_IMAGE_SIZE, patch_size=8, initializer_range=0.02, attention_dropout=0.0)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   cross_attention_frequency=1, max_position_embeddings=128, initializer_range=0.02,
                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    # transformers here, not at the top: the recipe schema reads this module's zoo without loading it.
    from transformers import Blip2Config, InstructBlipConfig

    if qformer_tokenizer is not None:
        qformer.update(vocab_size=len(qformer_tokenizer), pad_token_id=qformer_tokenizer.pad_token_id)
    cls = InstructBlipConfig if instruct else Blip2Config
    return cls(vision_config=vision, qformer_config=qformer, text_config=_tiny_text(family, tokenizer),
               num_query_tokens=8, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
               initializer_range=0.02)


@dataclass(frozen=True)
class ArchSpec:
    family: str  # LLM family: "opt" | "t5" | "llama"
    instruct: bool  # InstructBLIP (the Q-Former also reads the prompt)
    zoo: Dict[str, ZooEntry]


ARCHS = {
    "blip2_opt": ArchSpec("opt", False, ZOO_OPT),
    "blip2_t5": ArchSpec("t5", False, ZOO_T5),
    "blip2_vicuna_instruct": ArchSpec("llama", True, ZOO_VICUNA_INSTRUCT),
    "blip2_t5_instruct": ArchSpec("t5", True, ZOO_T5_INSTRUCT),
}


def checkpoint_image_size(arch: str, model_type: str, pretrained: Optional[str] = None) -> Optional[int]:
    """The image size of the ViT of the folder `pretrained` (its config.json), else of the official
    checkpoint of `arch`/`model_type` (the zoo; a folder not copied here yet is taken to hold it).
    None for an unknown model_type."""
    spec = ARCHS[arch]
    entry = spec.zoo.get(model_type)
    cfg_file = os.path.join(pretrained, "config.json") if pretrained and pretrained != "random" else ""
    if cfg_file and os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            size = ((json.load(f).get("vision_config") or {}).get("image_size"))
        return int(size[0] if isinstance(size, (list, tuple)) else size) if size else 224  # transformers' default
    if entry is None:
        return None
    if entry.config is None:
        return TINY_IMAGE_SIZE
    return int(entry.config["vision_config"]["image_size"])
