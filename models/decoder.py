"""The decoder forward, owned by us, over the modules and weights of an HF Llama/Qwen2 model.

Each layer attends from an explicit set of query tokens to an explicit set of keys (see
`attention.py`), which is what lets visual-compute plans skip work physically. The same layer
function serves prefill (keys = this call's tokens) and decode (keys = cached keys + new tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Keys, apply_rope, attend, causal_mask, merge_heads, split_heads
from .streams import Stream, concat


def _keys(attn: nn.Module, x: Tensor, tokens: Stream, is_visual: Tensor) -> Keys:
    k = apply_rope(split_heads(attn.k_proj(x), attn.head_dim), tokens.cos, tokens.sin)
    v = split_heads(attn.v_proj(x), attn.head_dim)
    return Keys(k, v, tokens.pos, tokens.valid, is_visual)


def layer_forward(layer: nn.Module, text: Stream, vis: Stream, past: Keys | None) -> tuple[Stream, Stream, Keys]:
    """One decoder layer over text and visual tokens; returns the updated streams and its keys."""
    attn = layer.self_attn
    tokens = concat([text, vis]) if vis.n else text
    is_visual = torch.zeros_like(tokens.valid)
    is_visual[:, text.n :] = True

    x = layer.input_layernorm(tokens.h)
    q = apply_rope(split_heads(attn.q_proj(x), attn.head_dim), tokens.cos, tokens.sin)
    keys = _keys(attn, x, tokens, is_visual)
    if past is not None:
        keys = past.append(keys)
    out = attend(q, keys, causal_mask(tokens.pos, tokens.valid, keys), attn.scaling)
    h = tokens.h + attn.o_proj(merge_heads(out))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return text.with_h(h[:, : text.n]), vis.with_h(h[:, text.n :]), keys


def run_decoder(
    lm: nn.Module,
    text: Stream,
    vis: Stream,
    cache: list[Keys] | None = None,
    use_cache: bool = False,
    gradient_checkpointing: bool = False,
) -> tuple[Stream, Stream, list[Keys] | None]:
    """Run every layer of `lm` (an HF `LlamaModel`/`Qwen2Model`); `cache` holds past keys per layer."""
    new_cache = [] if (use_cache or cache is not None) else None
    for i, layer in enumerate(lm.layers):
        past = cache[i] if cache is not None else None
        if gradient_checkpointing and torch.is_grad_enabled():
            text, vis, keys = checkpoint(layer_forward, layer, text, vis, past, use_reentrant=False)
        else:
            text, vis, keys = layer_forward(layer, text, vis, past)
        if new_cache is not None:
            new_cache.append(keys)
    return text, vis, new_cache
