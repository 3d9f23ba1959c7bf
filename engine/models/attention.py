"""T5 attention that builds its additive mask once per stack instead of once per layer.

T5's relative position bias is computed by the first layer of a stack and handed to every later layer
with the same padding mask. transformers' `sdpa` attention merges the two into one float mask inside every
layer (and, for the decoder's causal self-attention, first builds the causal pattern from two `arange`s):
the same half-dozen kernels in each of the 24 + 24 layers of Flan-T5-XL, forward and in recomputation.
`shared_bias_sdpa` merges them once and reuses the result while the layers pass the same tensors; the
attention itself is transformers' `sdpa_attention_forward`, so the result is identical.

Registered with transformers' AttentionInterface (and its mask interface, with `sdpa`'s masks) under
``SHARED_BIAS_SDPA`` and switched on in the T5 stacks' own configs (`use_shared_bias_attention`), never in
the config that is saved: exported folders say `sdpa` as before.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.t5.modeling_t5 import T5Attention

SHARED_BIAS_SDPA = "sdpa_shared_t5_bias"


class _MergedMasks:
    """The last few merged masks and what each was made from. A decoder layer alternates self- and
    cross-attention, so two are live at a time. The inputs are held by weak references (an entry is reused
    only while its very inputs are passed again); the merged masks themselves, a few small tensors that need
    no gradient, stay until newer ones push them out."""

    SLOTS = 4

    def __init__(self):
        self.entries: list = []  # (key, weakref bias, weakref mask or None, merged), most recent last

    def get(self, bias: torch.Tensor, mask: Optional[torch.Tensor], key: tuple) -> Optional[torch.Tensor]:
        for i, (k, b, m, merged) in enumerate(self.entries):
            if k == key and b() is bias and (m() if m is not None else None) is mask:
                self.entries.append(self.entries.pop(i))
                return merged
        return None

    def put(self, bias: torch.Tensor, mask: Optional[torch.Tensor], key: tuple, merged: torch.Tensor) -> None:
        self.entries.append((key, weakref.ref(bias), weakref.ref(mask) if mask is not None else None, merged))
        del self.entries[:-self.SLOTS]


_MERGED = _MergedMasks()


def shared_bias_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     is_causal: Optional[bool] = None, position_bias: Optional[torch.Tensor] = None,
                     **kwargs: Any):
    """transformers' `sdpa_attention_forward`, with the position bias and the mask merged once per stack."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if (position_bias is None or position_bias.requires_grad or (causal and kv_len > q_len)
            or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        # A bias that trains has a graph per layer; a cropped causal prefill and traced code go the usual way.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    cache_key = (causal, q_len, kv_len, query.dtype, query.device, tuple(position_bias.shape))
    merged = _MERGED.get(position_bias, attention_mask, cache_key)
    if merged is None:
        merged = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        _MERGED.put(position_bias, attention_mask, cache_key, merged)
    # The merged mask is the whole additive mask: no further mask, no causal flag.
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                  is_causal=False, position_bias=merged, **kwargs)


AttentionInterface.register(SHARED_BIAS_SDPA, shared_bias_sdpa)
# The T5 stacks build their masks by the same name: exactly the masks they build for `sdpa` (a name
# transformers has no mask function for would get no padding mask at all).
AttentionMaskInterface.register(SHARED_BIAS_SDPA, sdpa_mask)


def use_shared_bias_attention(model: nn.Module) -> int:
    """Switch the T5 attention modules of ``model`` that use `sdpa` to `shared_bias_sdpa`; returns how many.

    The config they read is their stack's own copy (the encoder's, the decoder's), not the model's saved
    config; the stack builds its masks by the same name, as for `sdpa`."""
    n = 0
    for module in model.modules():
        if isinstance(module, T5Attention) and module.config._attn_implementation == "sdpa":
            module.config._attn_implementation = SHARED_BIAS_SDPA
            n += 1
    return n
