"""The FFN of a decoder layer on the tokens its policy sends through it: a dense SwiGLU MLP (or the
first fraction of its neurons, YOPO's sparse visual FFN), or a mixture-of-experts block (Qwen3-MoE,
Qwen3-VL-MoE, Qwen3.5-MoE): transformers' own router, fused experts and, where the block has one, its
shared expert behind a sigmoid gate, with the router logits kept for the load-balancing loss.

A plan changes which tokens reach a layer's FFN (frozen, pruned or withdrawn visual tokens never
do), so the auxiliary loss is computed over exactly the tokens each layer processed: transformers'
`load_balancing_loss_func` (Switch Transformer's loss) over the per-layer router logits of the valid
tokens that went through. Under the dense plan that is every valid token of every layer, which is
what transformers computes from the attention mask (tests/test_qwen3_text.py checks the equality).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora import linear_weight


def is_moe(mlp: nn.Module) -> bool:
    """A sparse MoE block (a `gate` router and fused `experts`), as opposed to a dense SwiGLU MLP."""
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def feed_forward(mlp: nn.Module, x: Tensor, valid: Tensor, fraction: float = 1.0) -> tuple[Tensor, "RouterLogits | None"]:
    """The FFN on `x` [B, N, d]: its output, and for an MoE block the router logits of its tokens with
    their validity (what the load-balancing loss reads); None for dense MLPs. `fraction` < 1: a dense
    MLP's first neurons only (`mlp_fraction`; refused on MoE layers when the plan is set)."""
    if not is_moe(mlp):
        return (mlp(x) if fraction >= 1.0 else mlp_fraction(mlp, x, fraction)), None
    flat = x.reshape(-1, x.shape[-1])
    logits, weights, experts = mlp.gate(flat)
    out = mlp.experts(flat, experts, weights)
    shared = getattr(mlp, "shared_expert", None)
    if shared is not None:  # Qwen3.5-MoE: every token also goes through one dense expert, gated per token
        out = out + torch.sigmoid(mlp.shared_expert_gate(flat)) * shared(flat)
    return out.view_as(x), RouterLogits(logits, valid.reshape(-1))


def mlp_fraction(mlp: nn.Module, x: Tensor, fraction: float) -> Tensor:
    """SwiGLU FFN using only its first `fraction` of intermediate neurons (YOPO's sparse visual FFN)."""
    m = max(1, round(fraction * mlp.gate_proj.out_features))

    def part(lin, rows=True):
        w, b = linear_weight(lin)
        if rows:
            return w[:m], None if b is None else b[:m]
        return w[:, :m], b

    g = F.linear(x, *part(mlp.gate_proj))
    u = F.linear(x, *part(mlp.up_proj))
    return F.linear(mlp.act_fn(g) * u, *part(mlp.down_proj, rows=False))


class RouterLogits(NamedTuple):
    """One MoE layer's router logits [n, experts] and which of the n tokens count (valid ones)."""

    logits: Tensor
    valid: Tensor


def routing_counts(layers: list[RouterLogits], num_experts: int, top_k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Over the valid tokens each MoE layer routed: top-k assignments per expert [E], router probabilities
    summed per expert [E], and the routed rows (all layers together). None: no MoE layer routed a token."""
    counts = probs = rows = None
    for layer in layers:
        p = torch.softmax(layer.logits.float(), dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices
        mask = layer.valid.to(p.dtype)
        c = p.new_zeros(num_experts).scatter_add_(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
        s, n = (p * mask[:, None]).sum(0), mask.sum()
        counts, probs, rows = (c, s, n) if counts is None else (counts + c, probs + s, rows + n)
    return None if counts is None else (counts, probs, rows)


def load_balancing_loss(layers: list[RouterLogits], num_experts: int, top_k: int) -> Tensor | None:
    """Switch Transformer's auxiliary loss over the valid tokens each MoE layer routed: transformers'
    `load_balancing_loss_func` (counts of top-k assignments and router probabilities summed over the
    layers, each divided by the routed rows of all layers), with a per-layer token mask because a plan
    routes a different token set through each layer. None: no MoE layer routed a token."""
    routed = routing_counts(layers, num_experts, top_k)
    if routed is None:
        return None
    counts, probs, rows = routed
    rows = rows.clamp(min=1)
    return num_experts * torch.sum((counts / rows) * (probs / rows))


def expert_load(layers: list[RouterLogits], num_experts: int, top_k: int) -> Tensor | None:
    """[E] each expert's share of the top-k assignments (sums to 1; 1/E each when balanced)."""
    routed = routing_counts(layers, num_experts, top_k)
    return None if routed is None else routed[0] / routed[0].sum().clamp(min=1)


def moe_layers(text_config) -> list[bool]:
    """Which decoder layers hold a sparse MoE block (transformers' rule: every `decoder_sparse_step`-th
    layer, except `mlp_only_layers`); all False for dense LLMs."""
    n = text_config.num_hidden_layers
    experts = getattr(text_config, "num_experts", 0) or 0
    if experts <= 0:
        return [False] * n
    step = getattr(text_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(text_config, "mlp_only_layers", None) or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(n)]
