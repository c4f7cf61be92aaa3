"""A slow masked reference for visual-compute plans (the test oracle, never used in production).

Every token of the original sequence is computed in every layer with full attention matrices;
plans act only through masks: pre-softmax -inf for blocked keys (renorm semantics), zeroed
probabilities after the softmax (post_softmax_zero), zeroed outputs for tokens that are not
updated, pruned heads or FFN neurons, and a `present` mask for tokens that left the sequence.
Pre-LLM steps act through the tokens and keep mask of `model.encode_images` (pooled tokens fill
the first slots of each image span, the other slots are absent); selections that read no
attention use the scores of `models/blind_scores.py`. A routed layer (`LayerPolicy.route`) leaves the
visual tokens its router does not pick out of that layer only (neither queries nor keys), weighs the
kept ones' FFN output by the gate and overwrites the others' outputs with their input (times the gate
when `skipped=scaled`). Budgets apply per image (per tile for
uniform lattices) and layout tokens (LLaVA-NeXT's newlines) are always kept, written here as
plain loops over each row's groups (models/selection.py vectorises the same rule). Local windows
are the neighbours on the token's own tile grid.
The physical engine in `models/decoder.py` must give the same text logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.attention import apply_rope
from models.blind_scores import blind_scores, row_image_keys
from models.mllm import images_of_rows
from models.moe import RouterLogits, is_moe
from models.plan import Select
from models.streams import Place, Stream, visual_mask


def _heads(x, dh, norm=None):
    """[B, N, H*dh] -> [B, H, N, dh], then the layer's per-head norm (Qwen3's q_norm / k_norm) if any."""
    b, n, _ = x.shape
    out = x.view(b, n, -1, dh).transpose(1, 2)
    return out if norm is None else norm(out)


def _scores_and_select(probs_q, v, vis_mask, sel: Select, present, place):
    """Scores of present visual tokens from one query's probs [B, H, L]; returns the new present mask."""
    if sel.scorer == "attn_last":
        s = probs_q.mean(1)
    else:
        s = (probs_q.unsqueeze(-1) * v).pow(2).sum((1, 3)).sqrt()
    return _keep_top(s, vis_mask, sel, present, place)


def _keep_top(s, vis_mask, sel: Select, present, place):
    """The present mask after keeping, in every image of every row (every tile or time step for
    `per=unit` and `uniform`), the best-scoring present visual tokens (scores [B, L]); layout tokens
    always stay."""
    extra = place[..., Place.EXTRA].bool()
    new = present & (~vis_mask | extra)
    for b in range(s.shape[0]):
        groups = {}
        for j in range(s.shape[1]):
            if vis_mask[b, j] and present[b, j] and not extra[b, j]:
                per_unit = sel.per == "unit" or sel.scorer == "uniform"
                key = (int(place[b, j, Place.IMAGE]),) + ((int(place[b, j, Place.UNIT]),) if per_unit else ())
                groups.setdefault(key, []).append(j)
        for members in groups.values():
            n = len(members)
            if sel.keep is not None:
                k = sel.budget(n)
            else:
                k = max(min(sel.min_keep, n), sum(float(s[b, j]) > sel.threshold for j in members))
            for j in sorted(members, key=lambda j: (-float(s[b, j]), j))[:k]:
                new[b, j] = True
    return new


def _routed(model, layer, route, h, candidates, place):
    """The visual tokens a routed layer keeps [B, L] and every token's gate [B, L] (1 off the candidates):
    the router's scores of the layer input, then per image of each row the `route.budget(n)` best, ties
    to the earlier token, as plain loops."""
    x = h
    if route.router_input == "normed":
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.text_config.rms_norm_eps)
    router = model.routers[model.plan.routers[layer]]
    s = x @ router.weight[0] + router.bias[0]
    w = 1 + route.gate_scale * torch.tanh(s) if route.gate == "tanh" else torch.sigmoid(s)
    kept = torch.zeros_like(candidates)
    for b in range(h.shape[0]):
        images = {}
        for j in range(h.shape[1]):
            if candidates[b, j]:
                images.setdefault(int(place[b, j, Place.IMAGE]), []).append(j)
        for members in images.values():
            for j in sorted(members, key=lambda j: (-float(s[b, j]), j))[: route.budget(len(members))]:
                kept[b, j] = True
    return kept, torch.where(candidates, w, torch.ones_like(w))


def _ranks(present):
    """RoPE positions after a renumbering selection: each token's rank among the present tokens."""
    return (present.long().cumsum(-1) - 1).clamp(min=0)


def visual_places(model, is_vis, tokens):
    """[B, L, len(Place)]: each visual position's place (its image numbered within the row)."""
    b, L = is_vis.shape
    place = torch.zeros(b, L, len(Place), dtype=torch.long)
    if not is_vis.any():
        return place
    rows = images_of_rows(is_vis.sum(1), tokens.counts, model.config.image_token_id)
    image_in_row = [sum(1 for r in rows[:i] if r == rows[i]) for i in range(len(rows))]
    place[is_vis] = tokens.place
    place[..., Place.IMAGE][is_vis] = torch.repeat_interleave(torch.tensor(image_in_row), tokens.counts)
    return place


def embedded_prompt(model, input_ids, attention_mask, pixel_values, image_sizes=None, prompt_len=None):
    """What both masked references (this one and tests/hybrid_reference.py) start from: the prompt's
    embeddings with the visual tokens in their placeholders (h [B, L, d]), `valid`, each position's order
    `pos`, `is_vis` (only the first `prompt_len` columns hold images), `present` (pre-LLM drops), DeepStack's
    injections per position (None without), each position's place and the rows' random-selection keys."""
    b, L = input_ids.shape
    valid = attention_mask.bool()
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    is_vis = visual_mask(input_ids, attention_mask, model.config.visual_token_ids)
    if prompt_len is not None:
        is_vis[:, prompt_len:] = False
    h = model.language_model.embed_tokens(input_ids)
    present = valid.clone()
    tokens = model.encode_images(pixel_values, image_sizes) if is_vis.any() else None
    inject = None
    if tokens is not None:
        h[is_vis] = tokens.h.to(h.dtype)
        if tokens.keep is not None:
            present[is_vis] = tokens.keep
        if tokens.inject is not None:  # DeepStack: added to the visual tokens present after layers 0..K-1
            inject = h.new_zeros(b, L, *tokens.inject.shape[1:])
            inject[is_vis] = tokens.inject.to(h.dtype)
    place = visual_places(model, is_vis, tokens)
    image = place[..., Place.IMAGE]
    keys = row_image_keys(model.family.image_pixels(model.config, pixel_values, image_sizes), image.masked_fill(~is_vis, -1).max(1).values + 1) if is_vis.any() else None
    return h, valid, pos, is_vis, present, inject, place, keys


@torch.no_grad()
def reference_logits(model, input_ids, attention_mask, pixel_values, query_pos=None, image_sizes=None, prompt_len=None,
                     step_seconds=None, router=None):
    """Text logits [B, L, V] of `model` (its plan) computed the slow masked way; only the first
    `prompt_len` columns hold images (generated tokens are text, whatever their id); videos come among
    the images in prompt order with `step_seconds` (models/video.py). `router`: a list that receives each
    MoE layer's router logits of every position, with the positions whose FFN counts (valid, present and
    updated) as the mask (`models.moe.RouterLogits`)."""
    cfg, plan, lm = model.config, model.plan, model.language_model
    tcfg = model.text_config
    b, L = input_ids.shape
    h, valid, pos, is_vis, present, inject, place, keys = embedded_prompt(model, input_ids, attention_mask, pixel_values,
                                                                          image_sizes, prompt_len)
    embed = h.clone()  # the bypass stream (ViCA's K/V source), which receives the injections too
    projected = h.clone()  # the projector output that gated cross-attention blocks read
    entered = is_vis & present  # visual tokens that enter the LLM (gated blocks read all of them)
    image, unit, row, col = (place[..., c] for c in (Place.IMAGE, Place.UNIT, Place.ROW, Place.COL))
    cos, sin = lm.rotary_emb(h, model.family.rope_positions(cfg, attention_mask, is_vis, image_sizes, step_seconds))
    if query_pos is None:
        query_pos = pos.masked_fill(~valid, -1).max(1).values
    q_idx = ((pos == query_pos[:, None]) & valid & ~is_vis).float().argmax(1)
    rows = torch.arange(b)
    causal = pos[:, None, :] <= pos[:, :, None]  # [B, Lq, Lk]
    text_q = ~is_vis
    scores_probs = None
    for li, layer in enumerate(lm.layers):
        p = plan.layers[li]
        attn = layer.self_attn
        dh, H = attn.head_dim, tcfg.num_attention_heads
        n_rep = H // tcfg.num_key_value_heads
        if p.drop_visual:
            present = present & ~is_vis
        elif p.select is not None and p.select.source == "previous" and not p.select.reads_attention:
            seen = Stream(h, pos, is_vis & present, cos, sin, place=place)
            present = _keep_top(blind_scores(p.select, seen, keys), is_vis, p.select, present, place)
        elif p.select is not None and p.select.source == "previous":
            probs_q, v_full = scores_probs
            present = _scores_and_select(probs_q, v_full, is_vis, p.select, present, place)
        if p.select is not None and p.select.source == "previous" and p.select.positions == "renumber":
            cos, sin = lm.rotary_emb(h, _ranks(valid & present))
        if p.xattn:
            block = model.xattn[str(li)]
            h = torch.where(text_q[..., None], block(h, pos, block.visual_keys(projected, pos, entered)), h)
        h_in, absent, gate = h, torch.zeros_like(valid), torch.ones_like(valid, dtype=h.dtype)
        if p.route is not None:  # tokens the router leaves out are absent from this layer only
            candidates = is_vis & present & ~place[..., Place.EXTRA].bool()
            kept, gate = _routed(model, li, p.route, h, candidates, place)
            absent = candidates & ~kept
        here = present & ~absent
        x = layer.input_layernorm(h)
        xkv = torch.where(is_vis[..., None], layer.input_layernorm(embed), x) if p.visual_kv_source == "embed" else x
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        q = apply_rope(_heads(attn.q_proj(x), dh, q_norm), cos, sin)
        k = apply_rope(_heads(attn.k_proj(xkv), dh, k_norm), cos, sin).repeat_interleave(n_rep, 1)
        v = _heads(attn.v_proj(xkv), dh).repeat_interleave(n_rep, 1)
        logits = (q @ k.transpose(-1, -2)) * attn.scaling  # [B, H, L, L]
        key_ok = valid & here
        if p.select is not None and p.select.source == "current":
            base_q = (causal & key_ok[:, None, :])[rows, q_idx]  # [B, L]
            lq = logits[rows, :, q_idx].masked_fill(~base_q[:, None], float("-inf"))
            present = _scores_and_select(torch.softmax(lq, -1), v, is_vis, p.select, present, place)
            key_ok = valid & present
            if p.select.positions == "renumber":  # scored at the old positions, the layer runs at the new ones
                cos, sin = lm.rotary_emb(h, _ranks(key_ok))
                q = apply_rope(_heads(attn.q_proj(x), dh, q_norm), cos, sin)
                k = apply_rope(_heads(attn.k_proj(xkv), dh, k_norm), cos, sin).repeat_interleave(n_rep, 1)
                logits = (q @ k.transpose(-1, -2)) * attn.scaling
        base = causal & key_ok[:, None, :]
        heads_ok = torch.zeros(H, dtype=torch.bool)
        heads_ok[list(p.visual_heads) if p.visual_heads is not None else list(range(H))] = True
        kv_vis = is_vis[:, None, None, :]  # key is visual
        # text queries
        text_block = kv_vis & ~(heads_ok[None, :, None, None] & torch.tensor(p.text_reads))
        # visual queries
        if p.visual_self_attn == "full":
            vv_ok = causal
        elif p.visual_self_attn == "local":
            same = (image[:, :, None] == image[:, None, :]) & (unit[:, :, None] == unit[:, None, :])
            near = ((row[:, :, None] - row[:, None, :]).abs() <= p.window // 2) & ((col[:, :, None] - col[:, None, :]).abs() <= p.window // 2)
            on_grid = (row >= 0) & is_vis
            vv_ok = (same & near & on_grid[:, :, None] & on_grid[:, None, :]) | torch.eye(L, dtype=torch.bool)[None]
        else:
            vv_ok = torch.eye(L, dtype=torch.bool)[None].expand(b, -1, -1)
        vis_allowed = torch.where(is_vis[:, None, :], vv_ok & key_ok[:, None, :], base)  # [B, Lq(vis rows), Lk]
        allowed = torch.where(text_q[:, None, :, None], base[:, None] & ~text_block if p.mask_semantics == "renorm" else base[:, None],
                              vis_allowed[:, None])
        allowed = allowed | ~(valid & here)[:, None, :, None]  # rows that do not matter: anything finite
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
        if p.mask_semantics == "post_softmax_zero":
            probs = torch.where(text_q[:, None, :, None] & text_block, torch.zeros_like(probs), probs)
        if p.text_reads_visual == "sink":
            first = torch.where(is_vis & key_ok, torch.arange(L), L).min(1).values
            mass = (probs * kv_vis).sum(-1, keepdim=True)
            sink_probs = probs.masked_fill(kv_vis, 0.0) + mass * F.one_hot(first.clamp(max=L - 1), L)[:, None, None, :] * (first < L)[:, None, None, None]
            probs = torch.where(text_q[:, None, :, None], sink_probs, probs)
        out = probs @ v  # [B, H, L, dh]
        scores_probs = (probs[rows, :, q_idx], v)
        vis_head_ok = heads_ok[None, :, None, None] | ~is_vis[:, None, :, None]
        out = out * vis_head_ok
        o = attn.o_proj(out.transpose(1, 2).reshape(b, L, -1))
        update = text_q | (is_vis & torch.tensor(p.updates_visual))
        h = h + o * update[..., None]
        y = layer.post_attention_layernorm(h)
        m = layer.mlp
        ffn_ok = text_q | (is_vis & torch.tensor(p.updates_visual and p.visual_ffn > 0))
        if is_moe(m):  # every token routed on its own: computing all of them and masking is exact
            ffn = m(y)
            if router is not None:
                router.append(RouterLogits(m.gate(y.reshape(-1, y.shape[-1]))[0], (ffn_ok & valid & here).reshape(-1)))
        else:
            inner = m.act_fn(m.gate_proj(y)) * m.up_proj(y)
            n_keep = max(1, round(p.visual_ffn * inner.shape[-1])) if p.visual_ffn > 0 else 0
            neuron_ok = torch.arange(inner.shape[-1]) < n_keep
            ffn = m.down_proj(torch.where(is_vis[..., None], inner * neuron_ok, inner))
        h = h + ffn * ffn_ok[..., None] * gate[..., None]
        if p.route is not None:
            h = torch.where(absent[..., None], h_in * (gate if p.route.skipped == "scaled" else torch.ones_like(gate))[..., None], h)
        if inject is not None and li < inject.shape[2]:  # frozen and routed-out tokens too; pruned or withdrawn ones are gone
            add = inject[:, :, li] * (is_vis & present & valid)[..., None]
            h, embed = h + add, embed + add
    return model.lm_head(lm.norm(h))


@torch.no_grad()
def reference_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens, image_sizes=None, step_seconds=None):
    """Greedy decoding by re-running the reference on the growing sequence (no cache), scoring
    visual tokens with the last *prompt* token as the physical engine does at prefill."""
    query_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0).max(1).values
    ids, mask, out = input_ids, attention_mask, []
    for _ in range(max_new_tokens):
        logits = reference_logits(model, ids, mask, pixel_values, query_pos, image_sizes, prompt_len=input_ids.shape[1],
                                  step_seconds=step_seconds)
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)
