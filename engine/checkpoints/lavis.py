"""Import LAVIS BLIP-2 checkpoints (LAVIS's own runs and its Sherlock fork) into the transformers naming.

LAVIS's runner saves ``checkpoint_*.pth`` = ``{"model": state_dict, "optimizer", "config", "scaler",
"epoch"}`` and keeps in ``model`` only the parameters that were trained (plus buffers); the Sherlock fork
does the same, so a typical file holds the Q-Former, ``query_tokens`` and the projection
(``opt_proj`` / ``t5_proj`` / ``llm_proj``). Everything a file does not hold is kept from a base
checkpoint and listed as such.

Key mapping (LAVIS -> transformers), as in transformers' own conversion scripts
(``convert_blip_2_original_to_pytorch.py``, ``convert_instructblip_original_to_pytorch.py``) and
checked against the module names of ``Blip2ForConditionalGeneration`` and
``InstructBlipForConditionalGeneration``::

    query_tokens                                   -> query_tokens
    visual_encoder.cls_token                       -> vision_model.embeddings.class_embedding
    visual_encoder.pos_embed                       -> vision_model.embeddings.position_embedding
    visual_encoder.patch_embed.proj.*              -> vision_model.embeddings.patch_embedding.*
    visual_encoder.blocks.N.norm1|norm2.*          -> vision_model.encoder.layers.N.layer_norm1|layer_norm2.*
    visual_encoder.blocks.N.attn.qkv.weight        -> vision_model.encoder.layers.N.self_attn.qkv.weight
    visual_encoder.blocks.N.attn.q_bias + v_bias   -> ...layers.N.self_attn.qkv.bias = cat(q_bias, 0, v_bias)
    visual_encoder.blocks.N.attn.proj.*            -> ...layers.N.self_attn.projection.*
    visual_encoder.blocks.N.mlp.fc1|fc2.*          -> ...layers.N.mlp.fc1|fc2.*
    ln_vision.*                                    -> vision_model.post_layernorm.*
    Qformer.bert.embeddings.LayerNorm.*            -> qformer.layernorm.* (BLIP-2)
                                                      qformer.embeddings.layernorm.* (InstructBLIP)
    Qformer.bert.embeddings.word_embeddings.*      -> qformer.embeddings.word_embeddings.* (InstructBLIP)
    Qformer.bert.embeddings.position_embeddings.*  -> qformer.embeddings.position_embeddings.* (InstructBLIP)
    Qformer.bert.encoder.layer.N.attention.self.*  -> qformer.encoder.layer.N.attention.attention.*
    Qformer.bert.encoder.layer.N.crossattention.self.* -> qformer.encoder.layer.N.crossattention.attention.*
    Qformer.bert.encoder.layer.N.<other>           -> qformer.encoder.layer.N.<other> (output, intermediate_query, ...)
    opt_proj | t5_proj | llm_proj                  -> language_projection
    opt_model | t5_model | llm_model               -> language_model

Keys with no place in the transformers class are dropped with a reason (the stage-1 heads
``Qformer.cls``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``; recomputed buffers; BLIP-2's
Q-Former text branch, which LAVIS's blip2_opt/blip2_t5 delete as well). Any other key is "unmapped" and
stops the import unless the caller allows it; nothing is ever skipped silently.
"""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file

from engine.checkpoints.common import check_out_dir
from engine.checkpoints.hf import save_hf_folder
from engine.models.blip2 import build_vlm, resize_vision
from engine.models.parts import part_of
from engine.models.zoo import ARCHS
from engine.registry import DATASETS

# LAVIS attribute names of the language model and its input projection, per LLM family.
LLM_PREFIXES = {"opt": ("opt_model", "opt_proj"), "t5": ("t5_model", "t5_proj"), "llama": ("llm_model", "llm_proj")}

_DROPPED = [
    (re.compile(r"^Qformer\.cls\."), "the Q-Former's language-modelling head from stage-1 pretraining"),
    (re.compile(r"^(vision_proj|text_proj|itm_head)\."), "a stage-1 (image-text matching/contrastive) head"),
    (re.compile(r"^temp$"), "the stage-1 contrastive temperature"),
    (re.compile(r"(^|\.)position_ids$"), "a buffer transformers recomputes"),
    (re.compile(r"rotary_emb\.inv_freq$"), "a buffer transformers recomputes"),
]
_BLIP2_NO_TEXT = [
    (re.compile(r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\."),
     "BLIP-2's Q-Former in transformers has no text embeddings (LAVIS blip2_opt/blip2_t5 delete them too)"),
    (re.compile(r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\."),
     "BLIP-2's Q-Former in transformers has no text feed-forward (LAVIS blip2_opt/blip2_t5 delete it too)"),
]
_VISION = [
    (re.compile(r"^visual_encoder\.cls_token$"), "vision_model.embeddings.class_embedding"),
    (re.compile(r"^visual_encoder\.pos_embed$"), "vision_model.embeddings.position_embedding"),
    (re.compile(r"^visual_encoder\.patch_embed\.proj\.(weight|bias)$"),
     r"vision_model.embeddings.patch_embedding.\1"),
    (re.compile(r"^visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)$"),
     r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$"),
     r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$"),
     r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"^visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$"),
     r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^ln_vision\.(weight|bias)$"), r"vision_model.post_layernorm.\1"),
]
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$")


class LavisImportError(ValueError):
    """A LAVIS file that cannot be imported as asked."""


def load_lavis_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The model state dict of a LAVIS ``.pth`` (``{"model": ...}`` or a bare state dict), and the LAVIS
    config when the file has one. Loaded with ``weights_only=True``: a file whose pickle holds anything
    but tensors and plain containers is refused (it could run code)."""
    if path.endswith(".safetensors"):
        return dict(load_file(path)), {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LavisImportError(
            f"{path} holds Python objects other than tensors and plain containers ({first}). It is not loaded: "
            f"unpickling it could run arbitrary code. If you trust the file, extract the weights once in a "
            f"separate step:\n    python -c \"import torch; torch.save(torch.load('{path}', weights_only=False)"
            f"['model'], 'model_only.pth')\"\nand import model_only.pth.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise LavisImportError(f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated or not a "
                               f"PyTorch checkpoint") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd, config = obj["model"], obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, config = obj, {}
    else:
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise LavisImportError(f"{path} is neither a LAVIS checkpoint (a dict with a 'model' state dict) nor a "
                               f"state dict of tensors; found {keys}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LavisImportError(f"{path}: 'model' has non-tensor entries: {bad[:10]}")
    out = OrderedDict()
    for k, v in sd.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v  # saved from a DDP-wrapped model
    return out, dict(config)


def lavis_key_to_hf(key: str, family: str, instruct: bool) -> Tuple[Optional[str], str]:
    """``(hf_key, "")`` for a mapped key, ``(None, reason)`` for a dropped one, ``(None, "")`` if unmapped.

    ``q_bias`` / ``v_bias`` are not handled here (they merge into one tensor, see `convert_state_dict`).
    """
    for pattern, why in _DROPPED + ([] if instruct else _BLIP2_NO_TEXT):
        if pattern.search(key):
            return None, why
    if key == "query_tokens":
        return key, ""
    for pattern, repl in _VISION:
        if pattern.match(key):
            return pattern.sub(repl, key), ""
    if key.startswith("Qformer.bert."):
        rest = key[len("Qformer.bert."):]
        if rest.startswith("embeddings.LayerNorm."):
            leaf = rest[len("embeddings.LayerNorm."):]
            return (f"qformer.embeddings.layernorm.{leaf}" if instruct else f"qformer.layernorm.{leaf}"), ""
        if rest.startswith("embeddings."):
            return "qformer." + rest, ""
        if rest.startswith("encoder.layer."):
            return "qformer." + re.sub(r"(attention)\.self\.", r"\1.attention.", rest), ""
        return None, ""
    model_prefix, proj_prefix = LLM_PREFIXES[family]
    if key.startswith(proj_prefix + "."):
        return "language_projection." + key[len(proj_prefix) + 1:], ""
    if key.startswith(model_prefix + "."):
        return "language_model." + key[len(model_prefix) + 1:], ""
    return None, ""


def _other_family(sd: Mapping[str, Any], family: str) -> Optional[str]:
    for fam, (model_prefix, proj_prefix) in LLM_PREFIXES.items():
        if fam != family and any(k.startswith((model_prefix + ".", proj_prefix + ".")) for k in sd):
            return fam
    return None


def convert_state_dict(sd: Mapping[str, torch.Tensor], family: str,
                       instruct: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """LAVIS names -> transformers names. Returns ``(hf_state_dict, report)``; the report has
    ``mapped`` (lavis -> hf), ``dropped`` (lavis -> reason) and ``unmapped`` (lavis keys)."""
    other = _other_family(sd, family)
    if other is not None:
        theirs = LLM_PREFIXES[other]
        raise LavisImportError(
            f"the checkpoint holds an {other!r} language model ({theirs[0]}.* / {theirs[1]}.*) but the chosen arch "
            f"uses {family!r} ({LLM_PREFIXES[family][0]}.* / {LLM_PREFIXES[family][1]}.*); check --arch")
    out: Dict[str, torch.Tensor] = OrderedDict()
    report: Dict[str, Any] = {"mapped": OrderedDict(), "dropped": OrderedDict(), "unmapped": []}
    qv: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _QV_BIAS.match(key)
        if m:
            qv.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        hf_key, why = lavis_key_to_hf(key, family, instruct)
        if hf_key is not None:
            out[hf_key] = value
            report["mapped"][key] = hf_key
        elif why:
            report["dropped"][key] = why
        else:
            report["unmapped"].append(key)
    for layer, biases in sorted(qv.items()):
        if set(biases) != {"q", "v"}:
            have = next(iter(biases))
            raise LavisImportError(f"visual_encoder.blocks.{layer}.attn has {have}_bias but not "
                                   f"{'v' if have == 'q' else 'q'}_bias; the qkv bias needs both")
        q, v = biases["q"], biases["v"]
        # EVA's attention has no key bias: transformers stores one qkv bias with zeros in the middle.
        hf_key = f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"
        out[hf_key] = torch.cat([q, torch.zeros_like(v), v])
        for name in ("q", "v"):
            report["mapped"][f"visual_encoder.blocks.{layer}.attn.{name}_bias"] = hf_key
    return out, report


# LLM weights that LAVIS's runner still saves for a frozen LLM: its checkpoints drop the parameters
# that do not train, by name, but a tied weight's second name (OPT's lm_head, T5's encoder/decoder
# embed_tokens) is not a parameter name, so the frozen copy stays, in the LLM's run dtype (fp16/bf16).
_TIED_ALIAS = re.compile(r"^language_model\.(lm_head\.weight|shared\.weight|encoder\.embed_tokens\.weight|"
                         r"decoder\.embed_tokens\.weight|model\.decoder\.embed_tokens\.weight|"
                         r"model\.embed_tokens\.weight)$")
_VOCAB_ROWS = re.compile(r"(embed_tokens|shared|lm_head)\.weight$")


def _tied_aliases_only(converted: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> List[str]:
    """The LLM keys of a checkpoint that holds no LLM weight but copies of tied embeddings (the runner
    layout of a frozen LLM); empty when it holds the LLM (a full checkpoint or a trained LLM)."""
    llm = [k for k in converted if k.startswith("language_model.")]
    if not llm or not all(_TIED_ALIAS.match(k) for k in llm):
        return []
    storage: Dict[int, int] = {}
    for t in current.values():
        storage[t.data_ptr()] = storage.get(t.data_ptr(), 0) + 1
    # Each must be tied in the base too (shares its storage with another name).
    return llm if all(k in current and storage[current[k].data_ptr()] > 1 for k in llm) else []


def apply_state_dict(hf_model: torch.nn.Module, converted: Mapping[str, torch.Tensor],
                     report: Dict[str, Any]) -> Dict[str, Any]:
    """Copy the converted tensors over the base model. Unknown keys and shape mismatches are errors;
    the report gains ``imported`` and ``kept_from_base`` (per part, with the keys).

    Two cases LAVIS checkpoints bring: a runner checkpoint of a frozen LLM still holds copies of its tied
    embeddings (OPT ``lm_head``, T5 ``embed_tokens``, fp16/bf16): they never overwrite the base's own
    (the report lists them under ``dropped``); a base whose vocabulary was extended (the ``<image>``
    token of checkpoints that predate it) takes the checkpoint's rows and keeps its added ones."""
    current = hf_model.state_dict(keep_vars=True)
    converted = dict(converted)
    lavis_of = {}
    for lavis, hf in report["mapped"].items():
        lavis_of.setdefault(hf, lavis)
    for k in _tied_aliases_only(converted, current):
        converted.pop(k)
        report["mapped"].pop(lavis_of.get(k, k), None)
        report["dropped"][lavis_of.get(k, k)] = (
            "a frozen copy of the language model's tied embeddings that LAVIS's runner saves with the trained "
            "parts; the base's own embeddings are kept")
    unknown = [f"{lavis_of.get(k, k)} -> {k}" for k in converted if k not in current]
    resized, shapes = {}, []
    for k, v in converted.items():
        if k not in current or tuple(v.shape) == tuple(current[k].shape):
            continue
        base = tuple(current[k].shape)
        if _VOCAB_ROWS.search(k) and v.dim() == 2 and v.shape[1] == base[1] and v.shape[0] < base[0]:
            resized[k] = (int(v.shape[0]), int(base[0]))
        else:
            shapes.append(f"{lavis_of.get(k, k)} -> {k}: checkpoint {tuple(v.shape)}, base {base}")
    if unknown or shapes:
        lines = ["the LAVIS checkpoint does not fit the base model:"]
        if unknown:
            lines.append(f"  {len(unknown)} key(s) with no parameter in the base: " + "; ".join(unknown[:20]))
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es): " + "; ".join(shapes[:20]))
        lines.append("  (another model size or image resolution than the base; check --model_type and --base)")
        raise LavisImportError("\n".join(lines))
    written = set()
    with torch.no_grad():
        for k, v in converted.items():
            if k in resized:  # the base's added tokens (e.g. <image>) keep their rows
                current[k][: v.shape[0]].copy_(v)
            else:
                current[k].copy_(v)
            written.add(id(current[k]))
    kept: Dict[str, List[str]] = {}
    tied = []
    for k, t in current.items():
        if k in converted:
            continue
        if id(t) in written:  # tied to an imported tensor (e.g. OPT's lm_head and embed_tokens)
            tied.append(k)
            continue
        kept.setdefault(part_of(k), []).append(k)
    report["imported"] = len(converted)
    report["tied_to_imported"] = tied
    report["kept_from_base"] = kept
    report["resized_vocabulary"] = {k: {"checkpoint_rows": a, "base_rows": b} for k, (a, b) in resized.items()}
    report["dtypes"] = sorted({str(v.dtype).replace("torch.", "") for v in converted.values()})
    return report


def summary(report: Mapping[str, Any]) -> List[str]:
    """Lines for a person: what was imported, dropped, kept from the base, and what was not mapped."""
    lines = [f"imported {report.get('imported', len(report['mapped']))} tensor(s) from "
             f"{len(report['mapped'])} LAVIS key(s) (dtype {', '.join(report.get('dtypes', [])) or '-'})"]
    for key, why in report["dropped"].items():
        lines.append(f"dropped  {key}: {why}")
    for key, rows in report.get("resized_vocabulary", {}).items():
        lines.append(f"resized  {key}: the checkpoint's {rows['checkpoint_rows']} rows imported, the base's "
                     f"{rows['base_rows'] - rows['checkpoint_rows']} added token(s) kept")
    for part, keys in sorted(report.get("kept_from_base", {}).items()):
        lines.append(f"kept from base: {part}: {len(keys)} tensor(s), e.g. {', '.join(keys[:3])}")
    for key in report["unmapped"]:
        lines.append(f"UNMAPPED {key}")
    return lines


def _lavis_prompt(lavis_config: Mapping[str, Any]) -> Optional[str]:
    """The prompt as LAVIS applied it to training targets: a dataset's text processor prompt (blip_caption
    prepends it, trailing space included: "a photo of " + "dog"), else the model's."""
    for ds in (lavis_config.get("datasets") or {}).values():
        train = (((ds or {}).get("text_processor") or {}).get("train") or {})
        if isinstance(train.get("prompt"), str):
            return train["prompt"]
    model = lavis_config.get("model") if isinstance(lavis_config.get("model"), Mapping) else {}
    return model.get("prompt") if isinstance(model.get("prompt"), str) else None


def _dataset_sections(lavis_config: Mapping[str, Any], region: str, text: str) -> Dict[str, Any]:
    """The LAVIS config's dataset sections this engine has (processors kept, the prompt moved to
    model.prompt, build_info replaced by an empty root to fill in); else a Sherlock section."""
    out: Dict[str, Any] = {}
    for name, ds in (lavis_config.get("datasets") or {}).items():
        if name not in DATASETS or not isinstance(ds, Mapping):
            continue
        section: Dict[str, Any] = {"root": ""}
        if name == "sherlock":
            section.update(region=region, text=text)
        for kind in ("vis_processor", "text_processor"):
            procs = {}
            for slot in ("train", "eval"):
                spec = dict((ds.get(kind) or {}).get(slot) or {})
                spec.pop("prompt", None)
                if spec.get("name"):
                    procs[slot] = spec
            if procs:
                section[kind] = procs
        out[name] = section
    return out or {"sherlock": {"root": "", "region": region, "text": text}}


def _recipe_for(arch: str, model_type: str, base: Optional[str], lavis_config: Mapping[str, Any],
                region: str, text: str, prompt: Optional[str], image_size: Optional[int]) -> Dict[str, Any]:
    """A recipe for the imported model that keeps the LAVIS run: its prompt exactly as applied, its text
    lengths, image size, dataset sections and generation settings where its config has them; the
    Sherlock region and text modes as given."""
    model: Dict[str, Any] = {"arch": arch, "model_type": model_type, "pretrained": base}
    lavis_model = lavis_config.get("model") if isinstance(lavis_config.get("model"), Mapping) else {}
    kept = prompt if prompt is not None else _lavis_prompt(lavis_config)
    if kept is not None:
        model["prompt"] = kept
    for key in ("max_txt_len", "max_output_txt_len", "freeze_vit"):
        if isinstance(lavis_model.get(key), (int, bool)):
            model[key] = lavis_model[key]
    if image_size is not None:
        model["image_size"] = image_size
    lavis_run = lavis_config.get("run") if isinstance(lavis_config.get("run"), Mapping) else {}
    run = {k: lavis_run[k] for k in ("num_beams", "max_len", "min_len") if isinstance(lavis_run.get(k), int)}
    if arch in ("blip2_vicuna_instruct", "blip2_t5_instruct"):
        run["repetition_penalty"] = 1.5  # LAVIS's InstructBLIP generate() default (its caption task keeps it)
    return {"model": model, "datasets": _dataset_sections(lavis_config, region, text), "run": run}


def _lavis_image_size(lavis_config: Mapping[str, Any]) -> Optional[int]:
    """The ViT input size of the LAVIS run: model.image_size, else its datasets' eval processor size."""
    lavis_model = lavis_config.get("model") if isinstance(lavis_config.get("model"), Mapping) else {}
    if isinstance(lavis_model.get("image_size"), int):
        return lavis_model["image_size"]
    for ds in (lavis_config.get("datasets") or {}).values():
        size = (((ds or {}).get("vis_processor") or {}).get("eval") or {}).get("image_size")
        if isinstance(size, int):
            return size
    return None


def import_checkpoint(path: str, out_dir: str, *, arch: str, model_type: str, base: Optional[str] = None,
                      allow_unmapped: bool = False, region: str = "highlight", text: str = "inference",
                      prompt: Optional[str] = None, dtype: str = "fp32", force: bool = False) -> Dict[str, Any]:
    """Convert a LAVIS BLIP-2 checkpoint onto a base model and write a Hugging Face folder (as the
    exporter does, with recipe.yaml and export_info.json). Returns the report.

    `base`: a Hugging Face folder of `arch`/`model_type` (e.g. the official checkpoint the LAVIS run
    started from); a `tiny` model_type without one uses the seeded tiny model. `region` / `text`: the
    Sherlock modes the LAVIS run was trained with (written into recipe.yaml for tools/infer.py).
    """
    if arch not in ARCHS:
        raise LavisImportError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    check_out_dir(out_dir, force, protect=[path] + ([base] if base else []))
    spec = ARCHS[arch]
    sd, lavis_config = load_lavis_checkpoint(path)
    converted, report = convert_state_dict(sd, spec.family, spec.instruct)
    if report["unmapped"] and not allow_unmapped:
        raise LavisImportError(
            f"{len(report['unmapped'])} key(s) of {path} have no counterpart in {arch}: "
            f"{', '.join(report['unmapped'][:30])}{' ...' if len(report['unmapped']) > 30 else ''}. "
            f"Nothing was written. Pass --allow-unmapped to import the rest anyway (they stay listed).")
    model = build_vlm(arch, model_type=model_type, pretrained=base)
    # A LAVIS run at another resolution than the base's ViT (e.g. 364 px from a 224 px base): the model
    # takes its size (position embeddings interpolated once), then the checkpoint's own, if it has them.
    size = _lavis_image_size(lavis_config)
    image_size = size if size is not None and size != model.image_size else None
    if image_size is not None:
        resize_vision(model.hf, image_size)
        model.image_size = image_size
    apply_state_dict(model.hf, converted, report)
    model.eval()
    recipe = _recipe_for(arch, model_type, base, lavis_config, region, text, prompt, image_size)
    info = {
        "source_lavis_checkpoint": path,
        "base": base or f"{arch}/{model_type} (seeded random weights)",
        "import": {k: report[k] for k in ("imported", "dropped", "unmapped", "tied_to_imported", "dtypes",
                                          "resized_vocabulary")},
        "kept_from_base": {part: len(keys) for part, keys in report["kept_from_base"].items()},
        "kept_from_base_keys": report["kept_from_base"],
        "mapping": report["mapped"],
    }
    imported_parts: Dict[str, int] = {}
    for hf_key in converted:
        imported_parts[part_of(hf_key)] = imported_parts.get(part_of(hf_key), 0) + 1
    info["imported_per_part"] = imported_parts
    save_hf_folder(model, out_dir, recipe_dict=recipe, info=info, dtype=dtype, force=force)
    return report
