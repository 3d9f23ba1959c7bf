"""Model builders and the VisionLanguageModel wrapper, on every registered arch's tiny model (CPU)."""
import inspect
import json

import pytest
import torch

from engine.models import (
    checkpoint_image_size,
    DEFAULT_TARGETS,
    IGNORE_INDEX,
    WeightsNotFoundError,
    merge_lora,
)
from engine.registry import MODELS

ARCHS = [entry.name for entry in MODELS]
PROMPTS = ["a photo of ", "question: what is in the highlighted region?"]
TARGETS = ["a red circle", "a blue square on the left of a green triangle"]


def build(arch, **kwargs):
    kwargs.setdefault("model_type", "tiny")
    return MODELS.get(arch)(**kwargs)


def images(n=2, seed=0, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text_ids(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_registry_has_the_four_archs_each_with_tiny_and_official_checkpoints():
    assert {"blip2_opt", "blip2_t5", "blip2_vicuna_instruct", "blip2_t5_instruct"} <= set(ARCHS)
    for entry in MODELS:
        assert "tiny" in entry.zoo and entry.zoo["tiny"].hf_name is None
        assert checkpoint_image_size(entry.name, "tiny") == 64
        for model_type, zoo_entry in entry.zoo.items():
            if model_type != "tiny":
                assert zoo_entry.hf_name.startswith("Salesforce/") and zoo_entry.config
        assert "model_type" in inspect.signature(entry.obj).parameters
    assert MODELS.get("blip2_opt").zoo["caption_coco_opt2.7b"].hf_name == "Salesforce/blip2-opt-2.7b-coco"
    assert MODELS.get("blip2_opt").zoo["caption_coco_opt2.7b"].defaults["prompt"] == "a photo of "
    # LAVIS's and the official COCO-finetuned models take 364 px images; the others 224.
    for arch, model_type in (("blip2_opt", "caption_coco_opt2.7b"), ("blip2_opt", "caption_coco_opt6.7b"),
                             ("blip2_t5", "caption_coco_flant5xl")):
        assert checkpoint_image_size(arch, model_type) == 364
    assert checkpoint_image_size("blip2_opt", "pretrain_opt2.7b") == 224


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_grads_only_on_trainable(arch):
    model = build(arch)
    loss = model(images(), PROMPTS, TARGETS)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    summary = model.parameter_summary()
    assert summary["vision"]["trainable"] == 0 and summary["llm"]["trainable"] == 0  # BLIP-2 defaults
    assert summary["qformer"]["trainable"] > 0
    trained = ("hf.qformer.", "hf.query_tokens", "hf.language_projection.", "hf.vision_model.post_layernorm.")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert name.startswith(trained), name
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, name
    # LAVIS's freeze_vit freezes the ViT proper; ln_vision (post_layernorm) trains with the Q-Former.
    assert model.hf.vision_model.post_layernorm.weight.requires_grad
    assert not model.hf.vision_model.encoder.layers[0].mlp.fc1.weight.requires_grad
    assert not build(arch, freeze_qformer=True, freeze_llm=False).hf.vision_model.post_layernorm.weight.requires_grad


def test_end_of_text_is_the_checkpoints():
    """OPT ends text with "\n" (LAVIS, official text_config.eos_token_id 50118), not its tokenizer's </s>;
    InstructBLIP Vicuna starts with </s> and ends with </s>; Flan-T5 ends with </s> and has its own head."""
    opt = build("blip2_opt")
    assert opt.eos_id == opt.hf.config.text_config.eos_token_id != opt.tokenizer.eos_token_id
    assert opt.tokenizer.decode([opt.eos_id]) == "\n"
    assert opt.tokenizer("\n", add_special_tokens=False)["input_ids"] == [opt.eos_id]
    assert opt.build_inputs([""], ["a dog"])["labels"][0, -1] == opt.eos_id
    vicuna = build("blip2_vicuna_instruct")
    assert vicuna.tokenizer.bos_token == vicuna.tokenizer.eos_token == "</s>" and vicuna.bos_id == vicuna.eos_id
    assert vicuna.tokenizer("a dog")["input_ids"][0] == vicuna.eos_id
    for arch in ("blip2_t5", "blip2_t5_instruct"):
        t5 = build(arch)
        assert t5.tokenizer.convert_ids_to_tokens(t5.eos_id) == "</s>"
        lm = t5.hf.language_model
        assert lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight  # untied, as Flan-T5
        assert not torch.equal(lm.get_output_embeddings().weight, lm.get_input_embeddings().weight)
        assert t5.hf.config.text_config.dense_act_fn == "gelu"  # as LAVIS and the official folders


@pytest.mark.parametrize("arch", ARCHS)
def test_label_masking_exact_positions(arch):
    model = build(arch, max_txt_len=32)
    nq, img, eos = model.num_query_tokens, model.image_token_id, model.eos_id
    batch = model.build_inputs(["a photo of ", "why?"], ["a dog", "because it is raining outside today"], "cpu")
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    if model.decoder_only:
        bos, pad = model.bos_id, model.pad_id
        if model.instruct:  # LAVIS InstructBLIP: prompt and target tokenised apart, each exactly as given
            heads = [text_ids(model, "a photo of "), text_ids(model, "why?")]
            tails = [text_ids(model, "a dog"), text_ids(model, "because it is raining outside today")]
        else:  # LAVIS BLIP-2 OPT: the joined text; the prompt's trailing space goes with the target
            heads = [text_ids(model, "a photo of"), text_ids(model, "why?")]
            tails = [text_ids(model, " a dog"), text_ids(model, " because it is raining outside today")]
            assert heads[0] + tails[0] == text_ids(model, "a photo of a dog")
            tails[1] = text_ids(model, "because it is raining outside today")
        rows = [([bos] + h, t + [eos]) for h, t in zip(heads, tails)]
        width = nq + max(len(h) + len(t) for h, t in rows)
        for i, (head, tail) in enumerate(rows):
            n_pad = width - nq - len(head) - len(tail)
            assert ids[i] == [img] * nq + head + tail + [pad] * n_pad
            assert labels[i] == [IGNORE_INDEX] * (nq + len(head)) + tail + [IGNORE_INDEX] * n_pad
            assert batch["attention_mask"][i].tolist() == [1] * (width - n_pad) + [0] * n_pad
    else:
        enc = [[img] * nq + text_ids(model, "a photo of") + [eos], [img] * nq + text_ids(model, "why?") + [eos]]
        dec = [text_ids(model, "a dog") + [eos], text_ids(model, "because it is raining outside today") + [eos]]
        for i in range(2):
            assert ids[i][: len(enc[i])] == enc[i] and set(ids[i][len(enc[i]):]) <= {model.pad_id}
            assert labels[i] == dec[i] + [IGNORE_INDEX] * (len(labels[i]) - len(dec[i]))
    # every row carries exactly num_query_tokens image placeholders, where transformers puts the image
    assert (batch["input_ids"] == img).sum(1).tolist() == [nq, nq]
    if model.instruct:
        assert batch["qformer_input_ids"].shape[0] == 2 and batch["qformer_attention_mask"].sum() > 0


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_vicuna_instruct"])
def test_empty_prompt_masks_as_lavis(arch):
    # LAVIS blip2_opt masks the prompt only `if self.prompt`: with none, bos stays in the loss.
    # LAVIS InstructBLIP always masks its input part (bos included).
    model = build(arch)
    nq = model.num_query_tokens
    labels = model.build_inputs([""], ["a dog"])["labels"][0].tolist()
    target = text_ids(model, "a dog") + [model.eos_id]
    if arch == "blip2_opt":
        assert labels == [IGNORE_INDEX] * nq + [model.bos_id] + target
    else:
        assert labels == [IGNORE_INDEX] * (nq + 1) + target


@pytest.mark.parametrize("arch", ARCHS)
def test_truncation_as_lavis(arch):
    model = build(arch, max_txt_len=6, max_output_txt_len=5)
    prompt, target = "a long prompt about the picture", "a very long target " * 5
    batch = model.build_inputs([prompt], [target], "cpu")
    nq = model.num_query_tokens
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    p, t = text_ids(model, prompt), text_ids(model, target)
    if model.family == "opt":  # BLIP-2 OPT: bos + prompt + target + eos cut at max_txt_len together
        assert len(ids) == nq + 6 and ids[nq:] == [model.bos_id] + p[:5]
    elif model.family == "llama":  # InstructBLIP: prompt cut from the left, target (+ eos) at max_output_txt_len - 1
        assert ids[nq:] == [model.bos_id] + p[-5:] + t[:4]
        assert labels == [IGNORE_INDEX] * (nq + 6) + t[:4]
    elif model.instruct:  # InstructBLIP T5: encoder prompt cut from the left; target at max_output_txt_len
        assert ids[nq:] == p[-5:] + [model.eos_id] and labels == t[:4] + [model.eos_id]
    else:  # BLIP-2 T5: prompt and target each cut at max_txt_len, eos kept
        assert ids[nq:] == p[:5] + [model.eos_id] and labels == t[:5] + [model.eos_id]
    if model.instruct:  # the Q-Former reads the end of a long instruction too
        q = model._qformer_inputs([prompt * 10], "cpu")["qformer_input_ids"][0]
        assert q.shape[0] == 6 and q[-1].item() == model.qformer_tokenizer.sep_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_lengths_count_as_lavis(arch):
    model = build(arch).eval()
    seen = {}
    real = model.hf.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    model.hf.generate = spy
    model.generate(images(1), [""], num_beams=1, max_len=7, min_len=7)
    if model.decoder_only:  # LAVIS: a leading bos counts in max_length and min_length
        assert (seen["max_new_tokens"], seen["min_new_tokens"]) == (6, 6)
    else:  # LAVIS: max_new_tokens, but min_length counts the decoder start token
        assert (seen["max_new_tokens"], seen["min_new_tokens"]) == (7, 6)
    model.generate(images(1), [""], num_beams=1, max_len=7, min_len=3, length_counting="new_tokens")
    assert (seen["max_new_tokens"], seen["min_new_tokens"]) == (7, 3)
    with pytest.raises(ValueError, match="new_tokens"):
        model.generate(images(1), [""], max_len=7, length_counting="tokens")


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_t5_instruct"])
def test_image_size_is_the_checkpoints_unless_asked(arch, tmp_path):
    model = build(arch)
    with pytest.raises(ValueError, match=r"\(96, 96\) px, but the ViT takes 64 px"):
        model(images(size=96), PROMPTS, TARGETS)
    resized = build(arch, image_size=96).eval()  # the position embeddings interpolated once, in the weights
    emb = resized.hf.vision_model.embeddings
    assert resized.image_size == resized.hf.config.vision_config.image_size == 96
    assert emb.position_embedding.shape[1] == (96 // 8) ** 2 + 1
    torch.testing.assert_close(emb.position_embedding[:, :1], model.hf.vision_model.embeddings.position_embedding[:, :1])
    assert torch.isfinite(resized(images(size=96), PROMPTS, TARGETS))
    resized.hf.save_pretrained(tmp_path)  # and a folder says so: plain transformers runs it at 96 px
    reloaded = type(resized.hf).from_pretrained(tmp_path)
    assert reloaded.config.vision_config.image_size == 96
    torch.testing.assert_close(reloaded.vision_model.embeddings.position_embedding, emb.position_embedding)
    with pytest.raises(ValueError, match="multiple of the ViT's patch size 8"):
        build(arch, image_size=100)


@pytest.mark.parametrize("arch", ARCHS)
def test_image_changes_the_loss(arch):
    # Without the <image> placeholder ids transformers silently drops the image; prove it is used.
    model = build(arch).eval()
    dark, bright = torch.zeros(2, 3, 64, 64), torch.full((2, 3, 64, 64), 2.0)
    with torch.no_grad():
        a, a_again, b = (model(x, PROMPTS, TARGETS).item() for x in (dark, dark.clone(), bright))
    assert a == a_again  # deterministic, so any difference below comes from the image
    assert abs(a - b) > 1e-5  # a random tiny model is near-uniform; the image moves the loss by ~1e-4
    image = images().requires_grad_(True)
    model(image, PROMPTS, TARGETS).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_batched_left_padding(arch):
    model = build(arch).eval()
    prompts = ["a photo of ", "question: what is in the picture? answer:"]
    out = model.generate(images(), prompts, num_beams=2, max_len=5)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) for s in out)
    # greedy decoding of a padded batch equals decoding each sample alone
    batch = model.generate(images(), prompts, num_beams=1, max_len=6)
    alone = [model.generate(images()[i:i + 1], [p], num_beams=1, max_len=6)[0] for i, p in enumerate(prompts)]
    assert batch == alone
    assert len(model.generate(images(1), [""], num_beams=1, max_len=3, use_nucleus_sampling=True)) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_score_is_mean_target_loglik(arch):
    model = build(arch).eval()
    scores = model.score(images(), PROMPTS, TARGETS)
    assert scores.shape == (2,) and torch.all(scores < 0)
    with torch.no_grad():
        loss = model(images()[:1], PROMPTS[:1], TARGETS[:1])
    torch.testing.assert_close(scores[0], -loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_two_samples(arch):
    # A frozen random tiny LLM barely responds to the soft prompt, so train it too here.
    model = build(arch, freeze_llm=False)
    opt = torch.optim.Adam([p for _, p in model.trainable_parameters()], lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(images(), PROMPTS, TARGETS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def _checkpointed(model):
    parts = {"vision": model.hf.vision_model, "qformer": model.hf.qformer, "llm": model.hf.language_model}
    return {k for k, m in parts.items() if any(getattr(x, "gradient_checkpointing", False) for x in m.modules())}


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_t5_instruct"])
def test_grad_checkpointing_leaves_gradients_unchanged(arch):
    plain = build(arch, freeze_vit=False, freeze_llm=False)
    every = build(arch, freeze_vit=False, freeze_llm=False, use_grad_checkpoint=True, checkpoint_qformer=True,
                  checkpoint_llm=True)
    assert _checkpointed(plain) == set() and _checkpointed(every) == {"vision", "qformer", "llm"}
    for m in (plain, every):
        torch.manual_seed(0)  # the same dropout masks (the real models' dropout): checkpointing replays them
        m(images(), PROMPTS, TARGETS).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), every.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name, rtol=0, atol=0)


def test_use_grad_checkpoint_is_lavis_s_vit_only():
    # The recipes' setting: frozen ViT and LLM. Nothing is recomputed: a frozen ViT builds no graph, and the
    # LLM and Q-Former are checkpointed only when their own keys say so.
    frozen = build("blip2_opt", use_grad_checkpoint=True)
    assert _checkpointed(frozen) == set()
    assert _checkpointed(build("blip2_opt", freeze_vit=False, use_grad_checkpoint=True)) == {"vision"}
    assert _checkpointed(build("blip2_opt", checkpoint_llm=True)) == {"llm"}
    assert _checkpointed(build("blip2_opt", checkpoint_qformer=True)) == {"qformer"}
    only_llm = build("blip2_t5", freeze_qformer=True, freeze_llm=False, checkpoint_llm=True)
    s = only_llm.parameter_summary()
    assert s["qformer"]["trainable"] == 0 and s["vision"]["trainable"] == 0
    assert s["llm"]["trainable"] == s["llm"]["total"] > 0
    only_llm(images(), PROMPTS, TARGETS).backward()  # checkpointing with frozen vision tower and Q-Former
    assert not only_llm.hf.vision_model.training  # a frozen ViT stays in eval mode


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_only_on_llm_targets(arch):
    model = build(arch, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    targets = DEFAULT_TARGETS[model.family]
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert adapted, "no LoRA modules"
    for name in adapted:
        assert name.startswith("hf.language_model."), name
        assert name.split(".")[-2] in targets, name
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name or name.startswith(("hf.qformer.", "hf.query_tokens", "hf.language_projection.",
                                                       "hf.vision_model.post_layernorm.")), name
        elif "lora_" in name:
            pytest.fail(f"{name} is frozen")
    s = model.parameter_summary()
    assert s["lora"]["trainable"] == s["lora"]["total"] > 0 and s["llm"]["trainable"] == 0
    model(images(), PROMPTS, TARGETS).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_lora_on_qformer_and_merge():
    model = build("blip2_opt", lora={"r": 4, "alpha": 8, "on": ["llm", "qformer"]}).eval()
    names = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert any(n.startswith("hf.qformer.") for n in names) and any(n.startswith("hf.language_model.") for n in names)
    assert not any(n.startswith("hf.vision_model.") for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at zero; make the adapters do something
                p.normal_(0, 0.1)
        before = model(images(), PROMPTS, TARGETS)
        assert merge_lora(model.hf) == len(names)
        assert not any("lora_" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(images(), PROMPTS, TARGETS), before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="allowed parts"):
        build("blip2_opt", lora={"r": 4, "on": ["visual"]})


def test_unknown_model_type_names_close_match():
    with pytest.raises(ValueError, match="pretrain_opt2.7b"):
        build("blip2_opt", model_type="pretrain_opt27b")


def test_missing_weights_name_path_and_checkpoint(tmp_path):
    missing = tmp_path / "blip2-opt-2.7b"
    with pytest.raises(WeightsNotFoundError) as err:
        build("blip2_opt", model_type="pretrain_opt2.7b", pretrained=str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "Salesforce/blip2-opt-2.7b" in msg and "huggingface-cli download" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(WeightsNotFoundError, match="Salesforce/instructblip-vicuna-7b"):
        build("blip2_vicuna_instruct", model_type="vicuna7b", pretrained=None)
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        build("blip2_t5", model_type="pretrain_flant5xl", pretrained=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {"model_type": "opt"}}))
    with pytest.raises(ValueError, match="'t5'"):
        build("blip2_t5", model_type="pretrain_flant5xl", pretrained=str(tmp_path))


def test_dtype_and_quantization_guards():
    with pytest.raises(ValueError, match="bf16"):
        build("blip2_t5", torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="bf16"):
        build("blip2_t5_instruct", torch_dtype="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            build("blip2_opt", load_in_8bit=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_from_local_checkpoint_folder(arch, tmp_path):
    model = build(arch).eval()
    image_token = model.hf.config.image_token_index
    if arch == "blip2_opt":
        model.hf.config.image_token_index = None  # as in checkpoints older than the <image> placeholder
    model.hf.save_pretrained(tmp_path)
    model.hf.config.image_token_index = image_token
    model.tokenizer.save_pretrained(tmp_path)
    if model.instruct:
        model.qformer_tokenizer.save_pretrained(tmp_path / "qformer_tokenizer")
    official = next(t for t in MODELS.get(arch).zoo if t != "tiny")
    loaded = build(arch, model_type=official, pretrained=str(tmp_path)).eval()
    assert loaded.image_token_id == model.tokenizer.convert_tokens_to_ids("<image>")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images(), PROMPTS, TARGETS), model(images(), PROMPTS, TARGETS))


def test_random_mode_builds_official_opt27b_on_meta():
    with torch.device("meta"):
        model = build("blip2_opt", model_type="pretrain_opt2.7b", pretrained="random")
    s = model.parameter_summary()
    assert s["all"]["total"] == 3_744_679_936  # BLIP-2 OPT-2.7b, tied embeddings
    assert s["qformer"]["trainable"] == s["all"]["trainable"] == 107_133_696  # + ln_vision
    assert model.hf.query_tokens.is_meta and model.image_size == 224


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_gives_transformers_loss_without_reading_masks(arch):
    """The training loss (lean inputs, no padding masks for the causal decoders, no all-ones image mask)
    equals transformers' forward on the full inputs, on a batch with padding in every part."""
    model = build(arch).eval()
    prompts = ["a photo of ", "question: what is in the highlighted region? answer:"]
    lean = model.build_inputs(prompts, TARGETS, lean=True)
    full = model.build_inputs(prompts, TARGETS)
    assert "attention_mask" in full and (full.get("attention_mask") == 0).any()  # this batch is padded
    if model.decoder_only:
        assert "attention_mask" not in lean
    else:
        assert "decoder_attention_mask" not in lean and "attention_mask" in lean  # prompts of two lengths
    from helpers import load_script

    dispatch, function, reads = load_script("bench", "step_ops").op_counter()
    with torch.no_grad():
        with dispatch, function:
            ours = model(images(), inputs=lean)
        theirs = model.hf(pixel_values=images(), use_cache=False, **full).loss
        strings = model(images(), prompts, TARGETS)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert float(strings) == float(ours)
    # Padded prompts: the masks go in as 4D, which transformers takes as they are, without reading them back.
    # (LLaMA's model still checks its position ids for packed sequences: one read.)
    assert reads["reads"] == (1 if arch == "blip2_vicuna_instruct" else 0), dict(reads["read_names"])


def test_compiled_layers_give_the_eager_loss_and_gradients_in_bf16():
    """run.compile: torch.compile of the repeated layers (ViT, Q-Former, OPT blocks) on the CPU, bf16."""
    from engine.models import compile_layers

    eager = build("blip2_opt", freeze_vit=False, freeze_llm=False, torch_dtype=torch.bfloat16).eval()
    compiled = build("blip2_opt", freeze_vit=False, freeze_llm=False, torch_dtype=torch.bfloat16).eval()
    assert compile_layers(compiled) == 2 + 2 + 2  # two layers in each of the three stacks
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    losses = []
    for m in (eager, compiled):
        loss = m(images().bfloat16(), PROMPTS, TARGETS)
        loss.backward()
        losses.append(loss.float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)  # bf16: ~3 significant digits
    grads = [torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])
             for m in (eager, compiled)]
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_a_checkpoint_loads_straight_into_the_run_dtype_on_the_given_device(tmp_path):
    saved = build("blip2_opt")
    saved.hf.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)
    from engine.models import build_vlm

    loaded = build_vlm("blip2_opt", model_type="tiny", pretrained=str(tmp_path), torch_dtype=torch.bfloat16,
                       device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    for (name, a), (_, b) in zip(saved.hf.named_parameters(), loaded.hf.named_parameters()):
        torch.testing.assert_close(a.to(torch.bfloat16), b, msg=name, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["blip2_t5", "blip2_t5_instruct", "blip2_vicuna_instruct"])
def test_lean_norms_and_shared_t5_bias_give_transformers_loss_and_gradients(arch):
    """The T5/LLaMA RMS norms with one backward per norm and the T5 attention that merges its position
    bias and mask once per stack: the same loss (bitwise, dropout on) and gradients as transformers' own
    modules, with fewer kernels in the step."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

    from engine.models.attention import SHARED_BIAS_SDPA
    from engine.models.norms import LeanLlamaRMSNorm, LeanT5LayerNorm
    from helpers import load_script

    op_counter = load_script("bench", "step_ops").op_counter

    lean = build(arch, freeze_llm=False).train()
    norms = [m for m in lean.hf.language_model.modules() if isinstance(m, (LeanT5LayerNorm, LeanLlamaRMSNorm))]
    assert norms and all(isinstance(m, (T5LayerNorm, LlamaRMSNorm)) for m in norms)
    attn = [m for m in lean.hf.language_model.modules() if isinstance(m, T5Attention)]
    assert all(m.config._attn_implementation == SHARED_BIAS_SDPA for m in attn) and bool(attn) == ("t5" in arch)
    assert lean.hf.config.text_config._attn_implementation == "sdpa"  # what an exported config.json says
    plain = build(arch, freeze_llm=False).train()
    for m in plain.hf.language_model.modules():  # back to transformers' own classes and dispatch
        if isinstance(m, (LeanT5LayerNorm, LeanLlamaRMSNorm)):
            m.__class__ = m.__class__.__bases__[0]
        if isinstance(m, T5Attention):
            m.config._attn_implementation = "sdpa"
    inputs = lean.build_inputs(PROMPTS, TARGETS, lean=True)
    results = []
    for model in (lean, plain):
        torch.manual_seed(3)
        dispatch, _, ops = op_counter()
        with dispatch:
            loss = model(images(), inputs=inputs)
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, ops["kernels"]))
    (loss_a, grads_a, ops_a), (loss_b, grads_b, ops_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any("language_model." in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ops_a <= ops_b - 4 * len(norms), (ops_a, ops_b)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_inputs_without_the_model_are_the_models(arch, tmp_path):
    """build_text_inputs (the training collate's text side, for tools that need no network) makes exactly the
    tensors the built model's own `text` makes, for the tiny model and for a checkpoint folder."""
    from engine.models import build_text_inputs

    model = build(arch, max_txt_len=12)
    targets = TARGETS + ["a much longer target that runs past the twelve tokens of max_txt_len for sure"]
    prompts = PROMPTS + [""]

    def same(text, reference):
        a, b = text.build_inputs(prompts, targets, lean=True), reference.build_inputs(prompts, targets, lean=True)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert vars(text).keys() == vars(reference).keys()

    same(build_text_inputs(arch, model_type="tiny", max_txt_len=12), model.text)
    if arch == "blip2_opt":
        model.hf.config.image_token_index = None  # as in checkpoints older than the <image> placeholder
    model.hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    if model.instruct:
        model.qformer_tokenizer.save_pretrained(tmp_path / "qformer_tokenizer")
    official = next(t for t in MODELS.get(arch).zoo if t != "tiny")
    loaded = build(arch, model_type=official, pretrained=str(tmp_path), max_txt_len=12)
    same(build_text_inputs(arch, model_type=official, pretrained=str(tmp_path), max_txt_len=12), loaded.text)
