"""The oracle for plans on a hybrid LLM (Qwen3.5: linear-attention and full-attention layers): transformers'
own layer forwards on the tokens each layer keeps, one row at a time, no masks (the test oracle, never used
in production).

In a linear-attention layer a masked token still sits in its neighbours' conv window and still decays
the recurrent state, so "these tokens are absent from layer l" can only mean "layer l's forward on the
shortened sequence". For every row and layer this builds that sequence (the valid tokens that take part,
in sequence order, each at its own RoPE position) and runs the modules of a transformers text model
loaded with the model's weights (`Qwen3_5TextModel`, eager attention): the token mixer
(`Qwen3_5GatedDeltaNet`, or `Qwen3_5Attention` under a causal mask) on the layer's norm of those tokens,
then the residual and the MLP of the tokens that are updated. The plans' semantics written that way:

* a token that left (pre-LLM pruning or pooling through `model.encode_images`, a selection, a drop) is in
  no later layer's sequence; a router's skipped tokens are in no sequence of that layer (the kept ones'
  MLP output is weighed by the gate, the skipped ones scaled by it when `skipped=scaled`);
* `visual_update=frozen`: visual tokens are in the sequence (text reads them) with their current hidden
  state, or with the projector output under `visual_kv_source=embed`, but keep their hidden state;
* `text_reads_visual=none`: visual tokens are not in the sequence (with frozen tokens: a text-only layer);
* selections scored by attention read the eager probabilities of the row's scoring token (the last prompt
  token) in the scoring layer, averaged over heads (`attn_last`); blind ones `models/blind_scores.py`.
Budgets per image and ties follow tests/reference.py (`_keep_top`). Policies that only attention can
express (head subsets, windows, sinks, post-softmax zeros) are refused by the model on a linear layer
and raise NotImplementedError here.
"""

from __future__ import annotations

import torch
from transformers import AutoModel

from models.blind_scores import blind_scores
from models.layer_kinds import LINEAR
from models.streams import Place, Stream
from tests.reference import _keep_top, _routed, embedded_prompt

EXPRESSIBLE = dict(text_reads_visual=("full", "none"), visual_self_attn=("full",), mask_semantics=("renorm",))


def transformers_text_model(model):
    """A transformers text model (eager attention) holding `model`'s LLM weights."""
    config = model.text_config.__class__.from_dict(model.text_config.to_dict())
    config._attn_implementation = "eager"
    hf = AutoModel.from_config(config).eval()
    missing, unexpected = hf.load_state_dict(model.language_model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def _check_expressible(p, li):
    bad = [f for f, ok in EXPRESSIBLE.items() if getattr(p, f) not in ok]
    if bad or p.visual_heads is not None or p.visual_ffn != 1.0 or (p.updates_visual and not p.text_reads):
        raise NotImplementedError(f"layer {li}: the hybrid reference writes plans as layer forwards on token sequences; {bad or p}")


def _causal(n: int, dtype) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


@torch.no_grad()
def hybrid_reference_logits(model, input_ids, attention_mask, pixel_values, query_pos=None, image_sizes=None, prompt_len=None,
                            hf=None):
    """Text logits [B, L, V] of `model` under its plan, from transformers' layers on each layer's tokens
    (`prompt_len`: only the first columns hold images, as in tests/reference.py)."""
    cfg, plan, lm = model.config, model.plan, model.language_model
    hf = hf or transformers_text_model(model)
    b, L = input_ids.shape
    h, valid, pos, is_vis, present, inject, place, keys = embedded_prompt(model, input_ids, attention_mask, pixel_values,
                                                                          image_sizes, prompt_len)
    assert inject is None, "no DeepStack in a hybrid LLM"
    embed, projected, entered = h.clone(), h.clone(), is_vis & present
    image = place[..., Place.IMAGE]
    cos, sin = hf.rotary_emb(h, model.family.rope_positions(cfg, attention_mask, is_vis, image_sizes))
    if query_pos is None:
        query_pos = pos.masked_fill(~valid, -1).max(1).values
    scorer = (pos == query_pos[:, None]) & valid & ~is_vis  # [B, L]: each row's scoring token
    scores = None  # [B, L] the previous layer's head-mean attention of the scoring token
    for li, (layer, kind) in enumerate(zip(hf.layers, model.layer_kinds)):
        p = plan.layers[li]
        _check_expressible(p, li)
        if p.drop_visual:
            present = present & ~is_vis
        elif p.select is not None and p.select.source == "previous" and not p.select.reads_attention:
            seen = Stream(h, pos, is_vis & present, cos, sin, place=place)
            present = _keep_top(blind_scores(p.select, seen, keys), is_vis, p.select, present, place)
        elif p.select is not None and p.select.source == "previous":
            present = _keep_top(scores, is_vis, p.select, present, place)
        if p.xattn:
            block = model.xattn[str(li)]
            h = torch.where(~is_vis[..., None], block(h, pos, block.visual_keys(projected, pos, entered)), h)
        gate, absent = torch.ones_like(valid, dtype=h.dtype), torch.zeros_like(valid)
        if p.route is not None:
            candidates = is_vis & present & ~place[..., Place.EXTRA].bool()
            kept, gate = _routed(model, li, p.route, h, candidates, place)
            absent = candidates & ~kept
        source = torch.where(is_vis[..., None], embed, h) if p.visual_kv_source == "embed" else h
        if p.select is not None and p.select.source == "current":  # scored by this layer's own attention, then the kept run
            if kind == LINEAR:
                raise NotImplementedError(f"layer {li}: a linear-attention layer has no attention to score with")
            members = valid & (~is_vis | (present & torch.tensor(p.text_reads)))
            current = _attention_scores(layer, source, cos, sin, members, scorer)
            present = _keep_top(current, is_vis, p.select, present, place)
        here = present & ~absent
        members = valid & (~is_vis | (here & torch.tensor(p.text_reads)))
        updated = valid & (~is_vis | (here & torch.tensor(p.updates_visual)))
        new_h, new_scores = h.clone(), torch.zeros(b, L)
        for r in range(b):
            idx = torch.nonzero(members[r]).flatten()  # in sequence order: the order is the row's running count
            x = layer.input_layernorm(source[r, idx])[None]
            if kind == LINEAR:
                mixed = layer.linear_attn(hidden_states=x)[0]
            else:
                mixed, probs = layer.self_attn(hidden_states=x, position_embeddings=(cos[r, idx][None], sin[r, idx][None]),
                                               attention_mask=_causal(len(idx), x.dtype))
                mixed = mixed[0]
                query = torch.nonzero(scorer[r, idx]).flatten()
                if len(query):
                    new_scores[r, idx] = probs[0, :, query[0]].mean(0)
            out = updated[r, idx]
            h1 = h[r, idx] + mixed
            h2 = h1 + layer.mlp(layer.post_attention_layernorm(h1)[None])[0] * gate[r, idx, None]
            new_h[r, idx[out]] = h2[out]
        if p.route is not None and p.route.skipped == "scaled":
            new_h = torch.where(absent[..., None], h * gate[..., None], new_h)
        h, scores = new_h, new_scores
    return model.lm_head(lm.norm(h))


def _attention_scores(layer, source, cos, sin, members, scorer) -> torch.Tensor:
    """[B, L] head-mean attention of each row's scoring token over `members` in this layer (eager)."""
    b, L = members.shape
    out = torch.zeros(b, L)
    for r in range(b):
        idx = torch.nonzero(members[r]).flatten()
        x = layer.input_layernorm(source[r, idx])[None]
        _, probs = layer.self_attn(hidden_states=x, position_embeddings=(cos[r, idx][None], sin[r, idx][None]),
                                   attention_mask=_causal(len(idx), x.dtype))
        query = torch.nonzero(scorer[r, idx]).flatten()[0]
        out[r, idx] = probs[0, :, query].mean(0)
    return out


@torch.no_grad()
def hybrid_reference_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens, image_sizes=None):
    """Greedy decoding by re-running the reference on the growing sequence (no cache), the visual tokens
    scored by the last prompt token as the engine does at prefill."""
    hf = transformers_text_model(model)
    query_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0).max(1).values
    ids, mask, out = input_ids, attention_mask, []
    for _ in range(max_new_tokens):
        logits = hybrid_reference_logits(model, ids, mask, pixel_values, query_pos, image_sizes, prompt_len=input_ids.shape[1], hf=hf)
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)
