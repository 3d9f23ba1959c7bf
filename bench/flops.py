"""FLOPs of one BLIP-2 OPT training step, counted from the model's config (the numerator of MFU).

Counted: every matrix multiply, at 2 FLOPs per multiply-add -- the linear layers, the patch-embedding
convolution, the LM head, and attention's two products (Q K^T and A V, as full T x T products: the
causal mask is not discounted). Not counted: norms, softmax, activations, embedding lookups, the loss
and the optimizer (elementwise work, not matrix multiplies, as in the usual MFU definition). Recomputation under activation
checkpointing is not counted either: this is model FLOPs (MFU), not hardware FLOPs.

Per step, with B samples, T = LLM sequence length (the 32 query positions + the padded text), Tv = ViT
tokens (patches + class token), Q = query tokens:

  forward   = B * (ViT(Tv) + QFormer(Q, Tv) + projection + OPT(T) + LM head(T))
              ViT layer:     2 Tv (4 d^2 + 2 d f) + 4 Tv^2 d          (+ patch conv 2 P 3 p^2 d)
              Q-Former layer: 2 Q (4 h^2 + 2 h f) + 4 Q^2 h
                              + cross-attention layers: 2 Q 2 h^2 + 2 Tv 2 dv h + 4 Q Tv h
              OPT layer:      2 T (4 D^2 + 2 D F) + 4 T^2 D;  LM head 2 T D V;  projection 2 Q h D
  backward  = for every matmul that gradient flows through: 2 N T for the input gradient (when anything
              before it trains) + 2 N T for the weight gradient (when its weight trains); attention's
              products: 2x their forward. With the BLIP-2 recipe (ViT and OPT frozen, Q-Former trained):
              OPT and LM head 1x forward (input gradients only), Q-Former 2x (its K/V projections of the
              image tokens 1x: the frozen ViT needs no gradient), ViT 0.

So the familiar "6 N T" holds only for the trained Q-Former; the frozen OPT costs 4 N T and the frozen ViT 2 N T.
``tests/test_bench_train.py`` checks this count against torch's FlopCounterMode on real models.
"""
from __future__ import annotations

from typing import Dict, Tuple


def blip2_opt_step_flops(config, batch: int, seq_len: float, *, train_vit: bool, train_qformer: bool,
                         train_llm: bool) -> Dict[str, float]:
    """Forward, backward and total FLOPs of one step of a ``Blip2ForConditionalGeneration`` (OPT).

    ``config``: the model's Blip2Config; ``seq_len``: the LLM input length (query positions included),
    the mean padded length when batches differ.
    """
    v, q, t = config.vision_config, config.qformer_config, config.text_config
    # ---- vision tower
    d, f, Lv = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    size = v.image_size[0] if isinstance(v.image_size, (list, tuple)) else v.image_size
    patches = (size // v.patch_size) ** 2
    Tv = patches + 1
    vit_patch = 2 * patches * 3 * v.patch_size ** 2 * d
    vit_linear = Lv * 2 * Tv * (4 * d * d + 2 * d * f)
    vit_attn = Lv * 4 * Tv * Tv * d
    # ---- Q-Former (queries only: BLIP-2 gives it no text)
    h, fq, Lq, Q = q.hidden_size, q.intermediate_size, q.num_hidden_layers, config.num_query_tokens
    dv = q.encoder_hidden_size
    cross = sum(1 for i in range(Lq) if i % q.cross_attention_frequency == 0)
    qf_linear = Lq * 2 * Q * (4 * h * h + 2 * h * fq) + cross * 2 * Q * 2 * h * h
    qf_kv = cross * 2 * Tv * 2 * dv * h  # K and V projections of the image tokens
    qf_attn = Lq * 4 * Q * Q * h + cross * 4 * Q * Tv * h
    D = t.hidden_size
    proj = 2 * Q * h * D
    # ---- OPT
    F, L, V, T = t.ffn_dim, t.num_hidden_layers, t.vocab_size, seq_len
    if getattr(t, "word_embed_proj_dim", D) != D:
        raise ValueError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not counted here")
    llm_linear = L * 2 * T * (4 * D * D + 2 * D * F)
    llm_attn = L * 4 * T * T * D
    head = 2 * T * D * V

    forward = vit_patch + vit_linear + vit_attn + qf_linear + qf_kv + qf_attn + proj + llm_linear + llm_attn + head

    # Gradient reaches a part when that part or anything before it trains.
    grad_vit = train_vit
    grad_qf = train_vit or train_qformer
    grad_llm = grad_qf or train_llm
    backward = 0.0
    if grad_vit:
        backward += vit_patch  # weight gradient only: the pixels need none
        backward += 2 * vit_linear + 2 * vit_attn
    if grad_qf:
        backward += (qf_linear + proj) * (1 + train_qformer) + 2 * qf_attn
        # Weight grad; input grad into the image tokens for a trained ViT or a trained ln_vision (its output
        # norm, which trains with the Q-Former, as in LAVIS).
        backward += qf_kv * (train_qformer + (train_vit or train_qformer))
    if grad_llm:
        backward += (llm_linear + head) * (1 + train_llm) + 2 * llm_attn
    return {"forward": batch * forward, "backward": batch * backward, "total": batch * (forward + backward)}


def trained_parts(hf_model) -> Tuple[bool, bool, bool]:
    """(vision, qformer incl. query tokens, projection and ln_vision, llm): does any parameter of it train?"""
    parts = {"vision": False, "qformer": False, "llm": False}
    for name, p in hf_model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("vision_model.") and not name.startswith("vision_model.post_layernorm."):
            parts["vision"] = True
        elif name.startswith(("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm.")):
            # ln_vision (post_layernorm) trains with the Q-Former under freeze_vit, as in LAVIS: a norm,
            # no matrix products in its backward
            parts["qformer"] = True
        else:
            parts["llm"] = True
    return parts["vision"], parts["qformer"], parts["llm"]


def measured_flops(model, image, prompt, text_output) -> int:
    """FLOPs torch counts for one forward + backward of ``model`` (a VisionLanguageModel) on this batch.

    Attention runs on the math backend so its products are visible to FlopCounterMode (the fused CPU
    kernel is not in its table). Gradients are cleared afterwards.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss = model(image=image, prompt=prompt, text_output=text_output)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
