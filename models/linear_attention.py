"""The executor of linear-attention layers (Gated DeltaNet: Qwen3.5, Qwen3.6) over transformers' modules
and weights.

Such a layer has no keys and values to leave out of a query's view: every token present runs through
a causal depthwise conv (a window of the last `K` tokens, 4 in the releases) and the gated delta rule,
a recurrent state that each token decays and updates and every later token reads. Masking a token
therefore still changes its neighbours (it sits in their conv window and decays the state); the only
honest way to skip a token is to remove it from the layer's input. So the tokens that take part are
gathered in sequence order, each sample into a row of its own (a packed row's samples become separate
rows, so every sample's conv and state start from zero at its first token, `sample_rows`), their
projections computed once per token, and only those rows run the conv and the recurrence:
transformers' `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule`, which are
flash-linear-attention's fused kernels on a GPU where it is installed and the torch reference
elsewhere. Padding at the end of a row (a shorter sample) neither decays nor writes the state (zero key
and value, zero log-decay), so the final state is the one after each row's last token.

What a policy means here (models/layer_kinds.py says it and refuses the rest when the plan is set):
* dense: every token present enters the recurrence and gets its output;
* `visual_update=frozen` (ShortV): visual tokens enter the recurrence (their input projections, their
  conv channels, their state update), so text reads the state they wrote, but they get no output of
  their own: no gate projection, gated norm, out_proj, residual update or FFN;
  with `visual_kv_source=embed` (ViCA's T2V layers) their input is the projector output under this
  layer's norm;
* `text_reads_visual=none` (ViCA's other layers; a bypass): visual tokens are absent from the
  recurrence and from the layer.
The FFN after the token mixer is the same as in a full-attention layer (`models.moe.feed_forward`).

Decoding keeps `RecurrentState` per linear layer instead of keys and values: the conv's last K-1
inputs and the delta rule's state after each row's last token; a new token continues both, in place
(`decode_linear_layer`, one layer of models/decoding.py's fixed-shape step).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule

from .attention import sequence_order
from .moe import RouterLogits, feed_forward
from .plan import LayerPolicy
from .streams import Stream


class RecurrentState(NamedTuple):
    """A linear-attention layer's decode cache: the conv inputs of each row's last K-1 tokens [B, C, K-1]
    (zeros before the row's first token) and the delta rule's state [B, value heads, key dim, value dim]."""

    conv: Tensor
    state: Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)

    @property
    def visual_nbytes(self) -> int:
        """No bytes belong to visual tokens: the state has a fixed size whatever wrote it."""
        return 0


class SampleRows(NamedTuple):
    """The tokens of `[B, N]` streams laid out one sample per row of an [S, L] grid, in sequence order:
    stream token (b, t) sits at grid row `row[b, t]`, column `col[b, t]`. `valid` [S, L] marks the cells
    holding a valid token; the others (padding, after each row's last valid token) must neither write nor
    decay the state. `length` [S]: each row's valid tokens."""

    row: Tensor
    col: Tensor
    valid: Tensor
    length: Tensor

    def grid(self, values: Tensor) -> Tensor:
        """Per-token `values` [B, N, ...] on the grid [S, L, ...] (zeros where no token sits)."""
        out = values.new_zeros(*self.valid.shape, *values.shape[2:])
        out[self.row, self.col] = values
        return out

    def tokens(self, values: Tensor, n: int) -> Tensor:
        """Grid `values` [S, L, ...] back at the first `n` stream tokens of each row: [B, n, ...]."""
        return values[self.row[:, :n], self.col[:, :n]]


def sample_rows(order: Tensor, valid: Tensor, start: Tensor | None) -> SampleRows:
    """Where each token of the streams' `order` / `valid` / `start` [B, N] goes when every sample (a row,
    or each sample of a packed row: `start`) is a row of its own, in sequence order. Unpacked rows keep
    their shape (valid tokens first, padding last): no host sync. A packed row's samples become rows of
    the longest sample's width plus one column that takes every padding token: the sample count and that
    width are read back (packed rows are for training and prefill)."""
    b, n = order.shape
    sort = sequence_order(order, valid)  # valid tokens by order, padding last
    ok = torch.gather(valid, 1, sort)
    if start is None:
        return SampleRows(torch.arange(b, device=order.device)[:, None].expand(b, n), torch.argsort(sort, dim=1), ok, ok.sum(1))
    s = torch.gather(start, 1, sort)
    first = torch.zeros_like(ok)
    first[:, 0] = True
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    tokens = (sort + torch.arange(b, device=order.device)[:, None] * n)[ok]
    first = first[ok]
    sample = first.long().cumsum(0) - 1
    heads = torch.nonzero(first).flatten()
    at = torch.arange(len(tokens), device=order.device) - heads[sample]
    samples, longest = len(heads), int(at.max()) + 1 if len(tokens) else 0
    row = torch.zeros(b * n, dtype=torch.long, device=order.device)
    col = torch.full((b * n,), longest, dtype=torch.long, device=order.device)  # padding: the last column of row 0
    row[tokens], col[tokens] = sample, at
    grid_valid = torch.zeros(samples, longest + 1, dtype=torch.bool, device=order.device)
    grid_valid[sample, at] = True
    return SampleRows(row.view(b, n), col.view(b, n), grid_valid, grid_valid.sum(1))


def conv_inputs(attn: nn.Module, x: Tensor) -> Tensor:
    """The channels the conv mixes (query, key and value, before the conv) of normed inputs x [..., d]."""
    return attn.in_proj_qkv(x)


def gates(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """beta (how much a token writes) and g (the log-decay of the state at the token), transformers' way."""
    beta = attn.in_proj_b(x).sigmoid()
    g = -attn.A_log.float().exp() * F.softplus(attn.in_proj_a(x).float() + attn.dt_bias)
    return beta, g


def heads(attn: nn.Module, mixed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key and value heads [..., heads, dim] of the conv's output."""
    q, k, v = torch.split(mixed, [attn.key_dim, attn.key_dim, attn.value_dim], dim=-1)
    return (q.unflatten(-1, (-1, attn.head_k_dim)), k.unflatten(-1, (-1, attn.head_k_dim)), v.unflatten(-1, (-1, attn.head_v_dim)))


def output(attn: nn.Module, core: Tensor, x: Tensor) -> Tensor:
    """The layer's output of the delta rule's read `core` [..., value heads, dv]: the gated RMSNorm with the
    gate z of the same tokens' normed inputs x [..., d], then out_proj."""
    z = attn.in_proj_z(x).unflatten(-1, (-1, attn.head_v_dim))
    normed = attn.norm(core.reshape(-1, attn.head_v_dim), z.reshape(-1, attn.head_v_dim))
    return attn.out_proj(normed.reshape(*x.shape[:-1], -1))


def mix(attn: nn.Module, x: Tensor, rows: SampleRows, n_out: int) -> tuple[Tensor, RecurrentState]:
    """Transformers' `Qwen3_5GatedDeltaNet` on the tokens of `rows` (normed inputs x [B, N, d]): the output
    [B, n_out, d] of the first `n_out` tokens of each row and each grid row's final state. Every valid
    token enters the conv and the recurrence; only the first `n_out` are read out."""
    width = attn.conv1d.kernel_size[0]
    u = rows.grid(conv_inputs(attn, x)).transpose(1, 2)  # [S, C, L]
    mixed = F.conv1d(F.pad(u, (width - 1, 0)), attn.conv1d.weight, attn.conv1d.bias, groups=u.shape[1])  # each token's last `width`
    mixed = ACT2FN[attn.activation](mixed).transpose(1, 2)
    q, k, v = heads(attn, mixed)
    valid = rows.valid
    k, v = k * valid[..., None, None], v * valid[..., None, None]  # padding writes nothing ...
    beta, g = (rows.grid(t) for t in gates(attn, x))
    g = g * valid[..., None]  # ... and decays nothing
    core, state = torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=True,
                                               use_qk_l2norm_in_kernel=True)
    out = output(attn, rows.tokens(core, n_out), x[:, :n_out])
    return out, RecurrentState(last_inputs(u, rows.length, width), state)


def last_inputs(u: Tensor, length: Tensor, width: int) -> Tensor:
    """[S, C, width-1]: each row's conv inputs of its last width-1 valid tokens (`length` [S] of them),
    zeros before its first."""
    padded = F.pad(u, (width - 1, 0))  # token t at column t + width - 1
    cols = length[:, None] + torch.arange(width - 1, device=u.device)  # the last width-1 tokens' columns
    return torch.gather(padded, 2, cols[:, None, :].expand(-1, u.shape[1], -1))


def decode_linear_layer(layer: nn.Module, h: Tensor, cache: RecurrentState) -> Tensor:
    """One decoding step of a linear-attention decoder layer on the new tokens h [B, 1, d]: the conv
    window and the delta rule's state continue from `cache`, which is updated in place (fixed shapes and
    addresses, as models/decoding.py's compiled step needs); the FFN as in a full-attention layer."""
    attn = layer.linear_attn
    x = layer.input_layernorm(h)
    window = torch.cat([cache.conv, conv_inputs(attn, x[:, 0])[:, :, None]], dim=2)  # [B, C, K]
    mixed = ACT2FN[attn.activation](F.conv1d(window, attn.conv1d.weight, attn.conv1d.bias, groups=window.shape[1]))
    q, k, v = heads(attn, mixed.transpose(1, 2))  # [B, 1, heads, dim]
    beta, g = gates(attn, x)
    core, state = torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=cache.state, output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True)
    cache.conv.copy_(window[:, :, 1:])
    cache.state.copy_(state)
    h = h + output(attn, core[:, 0], x[:, 0])[:, None]
    return h + feed_forward(layer.mlp, layer.post_attention_layernorm(h), h.new_ones(h.shape[:2], dtype=torch.bool))[0]


def run_linear_layer(layer: nn.Module, p: LayerPolicy, text: Stream, vis: Stream, visual_ffn_weight: Tensor | None = None
                     ) -> tuple[Stream, Stream, RecurrentState, tuple[RouterLogits, ...]]:
    """One linear-attention decoder layer under policy `p` on a prompt (see the module docstring): the
    text and visual streams after it, its decode cache and its MoE router logits."""
    attn, norm = layer.linear_attn, layer.input_layernorm
    feeds = vis.n > 0 and p.text_reads  # visual tokens in the recurrence (text reads what they wrote)
    updated = feeds and p.updates_visual
    streams = [text, vis] if feeds else [text]
    x = [norm(text.h)] + ([norm(vis.embed if p.visual_kv_source == "embed" else vis.h)] if feeds else [])
    starts = None if text.start is None else torch.cat([s.start for s in streams], 1)
    rows = sample_rows(torch.cat([s.order for s in streams], 1), torch.cat([s.valid for s in streams], 1), starts)
    out, state = mix(attn, torch.cat(x, 1), rows, text.n + (vis.n if updated else 0))  # frozen tokens get no output
    h_text, router = _ffn(layer, text.h + out[:, : text.n], text.valid)
    if updated:
        h_vis, routed = _ffn(layer, vis.h + out[:, text.n :], vis.valid, p.visual_ffn, visual_ffn_weight)
        vis, router = vis.with_h(h_vis), router + routed
    return text.with_h(h_text), vis, state, router


def _ffn(layer: nn.Module, h: Tensor, valid: Tensor, fraction: float = 1.0, weight: Tensor | None = None):
    """h + the layer's FFN of it (a fraction of a dense MLP's neurons; weighed per token by a router's gate)."""
    if fraction <= 0:
        return h, ()
    ffn, routed = feed_forward(layer.mlp, layer.post_attention_layernorm(h), valid, fraction)
    return h + (ffn if weight is None else ffn * weight[..., None]), () if routed is None else (routed,)
