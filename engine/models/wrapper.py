"""The `VisionLanguageModel` wrapper the trainer uses, around a transformers BLIP-2 / InstructBLIP model.

The wrapper owns what transformers leaves to the caller: tokenising prompt and target, the
`<image>` placeholder ids the Q-Former outputs are written over, label masking, and
generation/scoring on lists of strings, as LAVIS does them. engine/models/blip2.py builds it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .parts import gathered, part_of, used_outside_its_module
from .tokenizer import IMAGE_TOKEN

IGNORE_INDEX = -100  # label value transformers' losses skip
DEFAULT_MAX_OUTPUT_TXT_LEN = 256  # LAVIS's InstructBLIP default for max_output_txt_len
# How run.max_len / run.min_len count (see `generation_lengths`).
LENGTH_COUNTING = ("lavis", "new_tokens")


def vit_image_size(config) -> int:
    """The image size a BLIP-2 config's ViT was made for (its position embeddings' grid)."""
    size = config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _ds_numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves an empty tensor on each rank


def _pad(rows: List[List[int]], value: int, left: bool = False) -> torch.Tensor:
    """Stack ragged rows of ids into a [B, longest] tensor, padding right (or left) with `value`."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            start = width - len(r) if left else 0
            out[i, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class _GeneratedRepetitionPenalty(LogitsProcessor):
    """Repetition penalty on the generated tokens only (+ `lead`, a token counted as generated).

    transformers penalises every id of `input_ids`, which for a decoder-only BLIP-2 holds the image
    placeholders and the prompt. LAVIS generates from `inputs_embeds`, so there only the generated tokens
    and the one leading bos transformers puts before them are penalised; this reproduces that.
    """

    def __init__(self, penalty: float, start: int, lead: Optional[int]):
        self.penalty, self.start, self.lead = float(penalty), int(start), lead

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = input_ids[:, self.start:]
        if self.lead is not None:
            ids = torch.cat([ids.new_full((ids.shape[0], 1), self.lead), ids], dim=1)
        if ids.shape[1] == 0:
            return scores
        ids = ids.clamp(max=scores.shape[-1] - 1)
        picked = scores.gather(1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, ids, picked)


class TextInputs:
    """Prompt and target strings -> the language model's tensors, labels masked, as LAVIS builds them.

    A plain picklable object (tokenizers and a few ids), so the trainer's DataLoader workers run it in their
    collate and the training process receives ready tensors. `VisionLanguageModel.text` is one.
    """

    def __init__(self, tokenizer, qformer_tokenizer=None, *, instruct: bool, decoder_only: bool, max_txt_len: int,
                 max_output_txt_len: int, num_query_tokens: int, image_token_id: int, bos_id: Optional[int],
                 eos_id: int, pad_id: int):
        self.tokenizer, self.qformer_tokenizer = tokenizer, qformer_tokenizer
        self.instruct, self.decoder_only = instruct, decoder_only
        self.max_txt_len, self.max_output_txt_len = max_txt_len, max_output_txt_len
        self.num_query_tokens, self.image_token_id = num_query_tokens, image_token_id
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # Sentencepiece-like tokenizers (T5, LLaMA) start a lone word with a word-boundary
        # marker, so "dog" alone tokenises as it does inside "a dog"; byte-level BPE (OPT)
        # needs the space. See `_split`.
        a, a_dog, dog = self._ids(["a", "a dog", "dog"])
        self._prefix_space = a_dog[len(a):] == dog

    def _ids(self, texts: Sequence[str]) -> List[List[int]]:
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if any(self.image_token_id in row for row in ids):
            raise ValueError(f"a prompt or target contains the image placeholder token {IMAGE_TOKEN!r}; remove it")
        return ids

    def _split(self, prompt: str, target: str) -> Tuple[str, str]:
        """Prompt and target are tokenised apart (so the prompt's tokens are known exactly);
        a prompt's trailing whitespace moves to the target, so "a photo of " + "dog"
        tokenises as "a photo of" + " dog", as the joined text would."""
        head = prompt.rstrip()
        if head == prompt or self._prefix_space:
            return head, target
        return head, prompt[len(head):] + target

    def _qformer_inputs(self, prompt: Sequence[str], device) -> Dict[str, torch.Tensor]:
        enc = self.qformer_tokenizer(list(prompt), padding="longest", truncation=True, max_length=self.max_txt_len,
                                     return_tensors="pt")
        return {"qformer_input_ids": enc["input_ids"].to(device),
                "qformer_attention_mask": enc["attention_mask"].to(device)}

    def _encoder_rows(self, prompt: Sequence[str], truncate: bool = True) -> List[List[int]]:
        """T5 encoder ids: `[<image> x Nq] prompt [eos]`. In training at most max_txt_len text tokens
        (eos included), as LAVIS: blip2_t5 cuts the prompt's end, blip2_t5_instruct its start (the end of
        an instruction matters most). LAVIS generates from the whole prompt (`truncate=False`)."""
        keep = max(self.max_txt_len - 1, 0)
        head = [self.image_token_id] * self.num_query_tokens
        rows = []
        for p in self._ids([p.strip() for p in prompt]):
            if truncate and len(p) > keep:
                p = p[len(p) - keep:] if self.instruct else p[:keep]
            rows.append(head + p + [self.eos_id])
        return rows

    def build_inputs(self, prompt: Sequence[str], text_output: Sequence[str], device=None,
                     lean: bool = False) -> Dict[str, torch.Tensor]:
        """Tensors for `self.hf(pixel_values=..., **inputs)`, labels included, as LAVIS builds them.

        BLIP-2 OPT (LAVIS blip2_opt): `[<image> x Nq][bos] prompt target [eos] [pad...]`, cut at
        `max_txt_len` text tokens (bos included; truncation drops the tail). The loss skips bos + prompt
        when there is a prompt; with an empty prompt the bos stays in the loss, as in LAVIS.
        InstructBLIP Vicuna (LAVIS blip2_vicuna_instruct): `[bos] prompt` cut from the left at
        `max_txt_len` (bos included), `target [eos]` cut from the right at `max_output_txt_len - 1`
        (LAVIS counts a bos it then drops); the loss skips bos + prompt always.
        Labels equal the input ids on the trained positions and are -100 elsewhere; the model shifts them.
        Encoder-decoder (T5): encoder `[<image> x Nq] prompt [eos]`, labels `target [eos]` cut at
        `max_txt_len` (blip2_t5) or `max_output_txt_len` (blip2_t5_instruct) tokens, eos included.

        `lean` (training): leave out the masks that change no trained position, so the model need not inspect
        them on the device (transformers reads a mask back to choose its attention kernel). Rows are padded on
        the right and the decoders attend causally, so no real token ever sees a pad: the decoder-only
        `attention_mask` and T5's `decoder_attention_mask` go; T5's encoder mask goes when no row is padded.
        The loss is the same (pads carry label -100).
        """
        if len(prompt) != len(text_output):
            raise ValueError(f"{len(prompt)} prompts but {len(text_output)} targets")
        nq, img = self.num_query_tokens, self.image_token_id
        inputs: Dict[str, torch.Tensor] = {}
        if self.instruct:
            inputs.update(self._qformer_inputs(prompt, device))
        bos = [self.bos_id] if self.bos_id is not None else []
        if self.decoder_only:
            rows, labels = [], []
            if self.instruct:
                # LAVIS tokenises instruction and answer apart, each exactly as given.
                keep_in = max(self.max_txt_len - len(bos), 0)
                keep_out = max(self.max_output_txt_len - 1, 0)
                for p, t in zip(self._ids(prompt), self._ids(text_output)):
                    head = bos + (p[len(p) - keep_in:] if len(p) > keep_in else p)
                    tail = (t + [self.eos_id])[:keep_out]
                    rows.append([img] * nq + head + tail)
                    labels.append([IGNORE_INDEX] * (nq + len(head)) + tail)
            else:
                heads, tails = zip(*(self._split(p, t) for p, t in zip(prompt, text_output)))
                for raw, p, t in zip(prompt, self._ids(heads), self._ids(tails)):
                    head = bos + p
                    text = (head + t + [self.eos_id])[: self.max_txt_len]
                    n_head = min(len(head), len(text)) if raw else 0  # LAVIS: `if self.prompt:` mask it
                    rows.append([img] * nq + text)
                    labels.append([IGNORE_INDEX] * (nq + n_head) + text[n_head:])
            input_ids = _pad(rows, self.pad_id)
            inputs.update(input_ids=input_ids, labels=_pad(labels, IGNORE_INDEX))
            if not lean:
                inputs["attention_mask"] = _pad([[1] * len(r) for r in rows], 0)
        else:
            rows = self._encoder_rows(prompt)
            limit = self.max_output_txt_len if self.instruct else self.max_txt_len
            keep = max(limit - 1, 0)  # room for the eos, which T5 keeps (as LAVIS)
            targets = [t[:keep] + [self.eos_id] for t in self._ids(text_output)]
            inputs.update(input_ids=_pad(rows, self.pad_id), labels=_pad(targets, IGNORE_INDEX))
            if not lean or len({len(r) for r in rows}) > 1:
                inputs["attention_mask"] = _pad([[1] * len(r) for r in rows], 0)
            if not lean:
                inputs["decoder_attention_mask"] = _pad([[1] * len(t) for t in targets], 0)
        return inputs if device is None else {k: v.to(device) for k, v in inputs.items()}


def text_inputs_for(config, tokenizer, qformer_tokenizer=None, *, instruct: bool, max_txt_len: int,
                    max_output_txt_len: Optional[int] = None) -> TextInputs:
    """The `TextInputs` of a model with this BLIP-2 / InstructBLIP `config` and these tokenizers: what
    `VisionLanguageModel` carries, and what engine/models/blip2.py `build_text_inputs` makes without a model."""
    decoder_only = bool(config.use_decoder_only_language_model)
    # The end of text is the checkpoint's, not the tokenizer's: OPT's BLIP-2 checkpoints end every
    # target with "\n" and stop generation there (LAVIS blip2_opt; text_config.eos_token_id 50118 in
    # the official folders) although OPT's tokenizer says </s>. T5 and Vicuna end with </s>.
    eos = getattr(config.text_config, "eos_token_id", None)
    eos_id = int(eos) if eos is not None else tokenizer.eos_token_id
    return TextInputs(tokenizer, qformer_tokenizer, instruct=instruct, decoder_only=decoder_only,
                      max_txt_len=int(max_txt_len),
                      max_output_txt_len=int(max_output_txt_len or DEFAULT_MAX_OUTPUT_TXT_LEN),
                      num_query_tokens=int(config.num_query_tokens), image_token_id=int(config.image_token_index),
                      bos_id=tokenizer.bos_token_id if decoder_only else None, eos_id=eos_id,
                      pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id)


def _keys_mask(mask: torch.Tensor) -> torch.Tensor:
    """A [batch, keys] padding mask as the [batch, 1, 1, keys] boolean mask attention broadcasts. Given in 4D,
    transformers uses it as it is; given in 2D, it first reads it back to the host (`.all()`) to see whether
    it could be left out, a sync in every training step with padded text."""
    return mask[:, None, None, :].bool()


class VisionLanguageModel(nn.Module):
    """A BLIP-2 model that takes images and strings.

    Attributes: `hf` (the transformers model), `tokenizer`, `qformer_tokenizer`
    (InstructBLIP only), `family`, `instruct`, `max_txt_len`, `image_size`.
    """

    def __init__(self, hf: nn.Module, tokenizer, *, family: str, instruct: bool, max_txt_len: int,
                 qformer_tokenizer=None, freeze_vit: bool = True, max_output_txt_len: Optional[int] = None):
        super().__init__()
        self.hf = hf
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        if qformer_tokenizer is not None:
            # LAVIS's InstructBLIP cuts long instructions from the left (keeps their end) for the Q-Former too.
            qformer_tokenizer.truncation_side = "left"
        self.family = family
        self.instruct = instruct
        self.max_txt_len = int(max_txt_len)
        # InstructBLIP (as LAVIS): the prompt is cut at max_txt_len, the target at max_output_txt_len.
        self.max_output_txt_len = int(max_output_txt_len or DEFAULT_MAX_OUTPUT_TXT_LEN)
        self.freeze_vit = freeze_vit
        cfg = hf.config
        self.image_size = vit_image_size(cfg)
        # Tokenising, truncating, padding and masking: a plain object, so DataLoader workers can do it (collate).
        self.text = text_inputs_for(cfg, tokenizer, qformer_tokenizer, instruct=instruct, max_txt_len=self.max_txt_len,
                                    max_output_txt_len=self.max_output_txt_len)
        self.num_query_tokens, self.image_token_id = self.text.num_query_tokens, self.text.image_token_id
        self.decoder_only = self.text.decoder_only
        self.bos_id, self.eos_id, self.pad_id = self.text.bos_id, self.text.eos_id, self.text.pad_id
        # The training forward uses query_tokens, the BLIP-2 model's own parameter, outside that model's forward:
        # ZeRO-3 gathers it for this module's forward instead.
        used_outside_its_module(self, hf.query_tokens)

    # ---------------------------------------------------------------- inputs (TextInputs)
    def _ids(self, texts: Sequence[str]) -> List[List[int]]:
        return self.text._ids(texts)

    def _split(self, prompt: str, target: str) -> Tuple[str, str]:
        return self.text._split(prompt, target)

    def _qformer_inputs(self, prompt: Sequence[str], device) -> Dict[str, torch.Tensor]:
        return self.text._qformer_inputs(prompt, device)

    def _encoder_rows(self, prompt: Sequence[str], truncate: bool = True) -> List[List[int]]:
        return self.text._encoder_rows(prompt, truncate)

    def build_inputs(self, prompt: Sequence[str], text_output: Sequence[str], device=None,
                     lean: bool = False) -> Dict[str, torch.Tensor]:
        """See `TextInputs.build_inputs`."""
        return self.text.build_inputs(prompt, text_output, device, lean=lean)

    def _pixels(self, image: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        dtype = self.hf.vision_model.embeddings.patch_embedding.weight.dtype
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            # transformers would interpolate the position embeddings on every call, silently; a size other
            # than the checkpoint's is asked for with model.image_size, which resizes them once.
            raise ValueError(f"images of {tuple(image.shape[-2:])} px, but the ViT takes {self.image_size} px; "
                             f"give {self.image_size} px images, or set model.image_size to train and run at "
                             f"another size")
        return image.to(dtype=dtype), False

    # ---------------------------------------------------------------- API
    def forward(self, image: torch.Tensor, prompt: Optional[Sequence[str]] = None,
                text_output: Optional[Sequence[str]] = None,
                inputs: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Mean cross-entropy over the target tokens (target + eos) of the batch. The text comes as strings
        (`prompt`, `text_output`) or as `inputs`, built by `self.text.build_inputs(..., lean=True)` (the
        trainer's DataLoader workers do that) and already on the device."""
        pixels, _ = self._pixels(image)
        if inputs is None:
            inputs = self.build_inputs(prompt, text_output, image.device, lean=True)
        return self._loss(pixels, inputs)

    def _loss(self, pixels: torch.Tensor, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of transformers' BLIP-2 / InstructBLIP forward, composed from the same modules without
        what needs the host to look at device values: the Q-Former's cross-attention gets no all-ones image
        mask (transformers would check it is all ones), the image features are put before the text embeddings
        (the placeholders always lead the row) instead of scattered through a mask, and masks the collate left
        out (`TextInputs.build_inputs(lean=True)`) stay out."""
        hf = self.hf
        image_embeds = hf.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
        query = hf.query_tokens.expand(image_embeds.shape[0], -1, -1)  # gathered for this forward under ZeRO-3
        if self.instruct:
            text_mask = inputs["qformer_attention_mask"]
            mask = torch.cat([text_mask.new_ones(query.shape[:2]), text_mask], dim=1)
            out = hf.qformer(input_ids=inputs["qformer_input_ids"], attention_mask=_keys_mask(mask), query_embeds=query,
                             encoder_hidden_states=image_embeds, return_dict=True)
            query_output = out.last_hidden_state[:, :query.shape[1]]
        else:
            query_output = hf.qformer(query_embeds=query, encoder_hidden_states=image_embeds,
                                      return_dict=True).last_hidden_state
        if query_output.dtype != image_embeds.dtype:  # the Q-Former may be kept in fp32
            query_output = query_output.to(image_embeds.dtype)
        features = hf.language_projection(query_output)
        ids = inputs["input_ids"]
        text = hf.get_input_embeddings()(ids[:, self.num_query_tokens:])
        embeds = torch.cat([features.to(text.dtype), text], dim=1)
        labels = inputs["labels"]
        if self.decoder_only:
            logits = hf.language_model(inputs_embeds=embeds, attention_mask=inputs.get("attention_mask"),
                                       use_cache=False).logits
            return hf.loss_function(logits=logits[:, -labels.size(1):], labels=labels,
                                    vocab_size=hf.config.text_config.vocab_size)
        mask = inputs.get("attention_mask")
        return hf.language_model(inputs_embeds=embeds, attention_mask=None if mask is None else _keys_mask(mask),
                                 decoder_attention_mask=inputs.get("decoder_attention_mask"), labels=labels,
                                 use_cache=False, return_dict=True).loss

    @torch.no_grad()
    def score(self, image: torch.Tensor, prompt: Sequence[str], text_output: Sequence[str]) -> torch.Tensor:
        """Mean log-likelihood per sample of `text_output` (+ eos) given image and prompt, shape [B]."""
        pixels, interpolate = self._pixels(image)
        inputs = self.build_inputs(prompt, text_output, image.device)
        # T5 needs the labels (its decoder inputs are the shifted labels); decoder-only
        # models would only spend time on a batch-mean loss we do not use.
        labels = inputs.pop("labels") if self.decoder_only else inputs["labels"]
        logits = self.hf(pixel_values=pixels, interpolate_pos_encoding=interpolate, use_cache=False, **inputs).logits
        if self.decoder_only:
            logits, labels = logits[:, :-1], labels[:, 1:]  # logits at position i predict token i + 1
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view(labels.shape)
        n = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
        return -nll.sum(1) / n

    def generation_lengths(self, max_len: int, min_len: int, counting: str = "lavis") -> Tuple[int, int]:
        """(max_new_tokens, min_new_tokens) for a recipe's max_len / min_len.

        `new_tokens`: both count generated tokens only. `lavis`: as LAVIS's own generate() counts them
        (with the transformers release LAVIS pins, 4.33): BLIP-2 OPT and InstructBLIP Vicuna generate from
        `inputs_embeds` and transformers starts their output with one bos token, which `max_length` and
        `min_length` both count; Flan-T5 passes `max_new_tokens` (new tokens) but `min_length`, which counts
        the decoder's start token. So max_len 30 / min_len 8 give 29 / 7 new tokens for OPT and Vicuna and
        30 / 7 for Flan-T5.
        """
        if counting not in LENGTH_COUNTING:
            raise ValueError(f"length counting {counting!r} is not one of {', '.join(LENGTH_COUNTING)}")
        if counting == "new_tokens":
            return int(max_len), int(min_len)
        lead = 1  # the leading bos (decoder-only) or decoder start token (T5)
        max_new = max_len - lead if self.decoder_only else max_len
        return max(int(max_new), 1), max(int(min_len) - lead, 0)

    def hf_generation_config(self, *, num_beams: int = 5, max_len: int = 30, min_len: int = 1,
                             repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                             length_counting: str = "lavis"):
        """A `GenerationConfig` with which plain transformers generates what `generate` does: the
        checkpoint's end token, and the lengths in new tokens. (A repetition penalty other than 1 also
        counts the prompt in plain transformers; `generate` counts the generated tokens only.)"""
        max_new, min_new = self.generation_lengths(max_len, min_len, length_counting)
        cfg = self.hf.config.text_config
        kwargs = dict(num_beams=num_beams, max_new_tokens=max_new, min_new_tokens=min_new,
                      repetition_penalty=repetition_penalty, length_penalty=length_penalty, do_sample=False,
                      eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        if self.decoder_only:
            kwargs["bos_token_id"] = self.bos_id
        else:
            kwargs["decoder_start_token_id"] = getattr(cfg, "decoder_start_token_id", None) or self.pad_id
        return GenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(self, image: torch.Tensor, prompt: Sequence[str], *, num_beams: int = 5, max_len: int = 30,
                 min_len: int = 1, repetition_penalty: float = 1.0, length_penalty: float = 1.0, top_p: float = 0.9,
                 use_nucleus_sampling: bool = False, synced_gpus: bool = False,
                 length_counting: str = "lavis") -> List[str]:
        """Generate text per image; returns the new text only, stripped. `max_len` / `min_len` count as
        `length_counting` says (see `generation_lengths`)."""
        pixels, interpolate = self._pixels(image)
        if len(prompt) != image.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {len(prompt)} prompts")
        device, nq, img = image.device, self.num_query_tokens, self.image_token_id
        inputs: Dict[str, torch.Tensor] = {}
        if self.instruct:
            inputs.update(self._qformer_inputs(prompt, device))
        if self.decoder_only:
            bos = [self.bos_id] if self.bos_id is not None else []
            if self.instruct:  # LAVIS's InstructBLIP: the whole prompt, exactly as given
                rows = [[img] * nq + bos + p for p in self._ids(prompt)]
            else:  # LAVIS's BLIP-2 OPT: cut at max_txt_len
                heads = [self._split(p, "")[0] for p in prompt]
                rows = [[img] * nq + (bos + p)[: self.max_txt_len] for p in self._ids(heads)]
            # Left padding: every row's last position is where generation continues.
            input_ids = _pad(rows, self.pad_id, left=True)
            attention = _pad([[1] * len(r) for r in rows], 0, left=True)
        else:
            rows = self._encoder_rows(prompt, truncate=False)
            input_ids = _pad(rows, self.pad_id)
            attention = _pad([[1] * len(r) for r in rows], 0)
        max_new, min_new = self.generation_lengths(max_len, min_len, length_counting)
        options = dict(num_beams=num_beams, max_new_tokens=max_new, min_new_tokens=min_new,
                       repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                       do_sample=use_nucleus_sampling, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                       synced_gpus=synced_gpus)
        if self.decoder_only and repetition_penalty != 1.0:
            lead = getattr(self.hf.config.text_config, "bos_token_id", None) if length_counting == "lavis" else None
            options["repetition_penalty"] = 1.0
            options["logits_processor"] = LogitsProcessorList(
                [_GeneratedRepetitionPenalty(repetition_penalty, input_ids.shape[1], lead)])
        if use_nucleus_sampling:
            options["top_p"] = top_p
        rerank = length_counting == "lavis" and num_beams > 1 and not use_nucleus_sampling
        if rerank:  # every finished beam and its score, to rank them as LAVIS does (see `_lavis_best`)
            options.update(num_return_sequences=num_beams, output_scores=True, return_dict_in_generate=True)
        # hf.generate reads query_tokens outside any submodule's forward, so
        # ZeRO-3 would leave it partitioned (an empty tensor) without this.
        with gathered([self.hf.query_tokens]):
            out = self.hf.generate(pixel_values=pixels, input_ids=input_ids.to(device),
                                   attention_mask=attention.to(device), interpolate_pos_encoding=interpolate,
                                   **inputs, **options)
        scores = out.sequences_scores if rerank else None
        out = out.sequences if rerank else out
        if self.decoder_only and out.shape[1] >= input_ids.shape[1] and torch.equal(
                out[:, : input_ids.shape[1]].cpu(), input_ids.repeat_interleave(out.shape[0] // len(rows), 0)):
            out = out[:, input_ids.shape[1]:]  # the LLM returns prompt + continuation
        elif not self.decoder_only:
            out = out[:, 1:]  # the decoder's start token
        if rerank:
            out = self._lavis_best(out, scores, num_beams, max_new, length_penalty)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _lavis_best(self, seqs: torch.Tensor, scores: torch.Tensor, num_beams: int, max_new: int,
                    length_penalty: float) -> torch.Tensor:
        """The best of each sample's `num_beams` finished beams as LAVIS's transformers (4.33) ranks them.

        Both divide a beam's summed log-probability by its length ** length_penalty. A beam that ended
        with the end token has the same length in both (its tokens, end included). A beam cut at the
        length limit counts one token more in LAVIS: its output starts with the leading bos (decoder-only)
        or the decoder's start token (T5), which transformers 5 does not count.
        """
        seqs, scores = seqs.cpu(), scores.float().cpu()
        ended = (seqs == self.eos_id).any(1)
        n = max_new
        lavis = torch.where(ended, scores, scores * (n / (n + 1)) ** length_penalty)
        best = lavis.view(-1, num_beams).argmax(1) + torch.arange(0, seqs.shape[0], num_beams)
        return seqs[best]

    # ---------------------------------------------------------------- parameters
    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vit:
            self.hf.vision_model.eval()  # a frozen ViT stays in eval mode, as in LAVIS
        return self

    def trainable_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        """(name, parameter) pairs that require grad, in module order."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def parameter_summary(self) -> Dict[str, Dict[str, int]]:
        """Parameter counts per part (vision, qformer incl. query tokens and projection, llm, lora, all)."""
        summary = {k: {"total": 0, "trainable": 0} for k in ("vision", "qformer", "llm", "lora", "all")}
        for name, p in self.hf.named_parameters():
            n = _ds_numel(p)
            for part in (part_of(name), "all"):
                summary[part]["total"] += n
                summary[part]["trainable"] += n if p.requires_grad else 0
        return summary


# -------------------------------------------------------------------- builders
