"""Calibration: measure what one change to a layer does to the model, then pick layers from it.

ShortV's Layer Contribution, VTW's withdrawal search and ViCA's layer choice are the same
experiment (arXiv 2504.00502, 2405.05803, 2602.07574): change one layer, compare the next-token
distribution at the last prompt position with the unchanged model's, average the KL over N
calibration samples. YOPO's head activity and VisiPruner's stages need per-head attention
probabilities instead. This module holds that engine (variants, KL, attention statistics gathered
by a layer hook on the model's own forward) and the pure decision functions that turn scores into
layer choices; `train/tools/analyze.py` turns those into plan files.

Every variant is relative to the model's *current* plan (a checkpoint may carry one), and the
model's plan is always restored afterwards.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Keys, apply_rope, causal_mask, expand_kv, split_heads
from .decoder import LayerHook, LayerStep
from .mllm import MLLM
from .plan import Plan
from .streams import Stream, concat

class PromptBatch(Protocol):
    """What calibration reads from a batch (`data.batch.Batch` is one): left-padded prompts and images."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    pixel_values: Tensor | None
    image_sizes: Tensor | None


KL_DIRECTIONS = ("mod_base", "base_mod")  # KL(p_modified || p_base) (ShortV/VTW code) or the reverse

# --- variants: one change relative to the current plan ------------------------------------------


def with_layer(plan: Plan, i: int, **changes) -> Plan:
    """`plan` with layer i's policy fields replaced (the name records the change)."""
    layers = list(plan.layers)
    layers[i] = replace(layers[i], **changes)
    what = ",".join(f"{k}={v}" for k, v in changes.items())
    return replace(plan, name=f"{plan.name}+L{i}[{what}]", layers=tuple(layers))


def visual_present(plan: Plan) -> list[bool]:
    """Whether visual tokens are still in the sequence at each layer (after any withdrawal)."""
    out, alive = [], True
    for p in plan.layers:
        alive = alive and not p.drop_visual
        out.append(alive)
    return out


def freeze_visual(plan: Plan, i: int) -> Plan:
    """ShortV's sparse layer: visual tokens get no attention output and no FFN in layer i (text
    still reads their current K/V). Visual-only knobs are reset because they mean nothing then."""
    p = plan.layers[i]
    if not p.updates_visual:
        return plan
    return with_layer(plan, i, visual_update="frozen", visual_self_attn="full", window=0, visual_ffn=1.0)


def knock_out_text_to_visual(plan: Plan, i: int) -> Plan:
    """Text cannot read visual tokens in layer i (ViCA's non-T2V layers, VisiPruner's shallow ones)."""
    if plan.layers[i].text_reads_visual == "none":
        return plan
    return with_layer(plan, i, text_reads_visual="none")


def withdraw_visual(plan: Plan, k: int) -> Plan:
    """VTW: every visual token leaves before layer k; later token-set changes have nothing left
    to act on and are removed. A no-op (the same plan) when they already left earlier."""
    if not visual_present(plan)[k] or plan.layers[k].drop_visual:
        return plan
    layers = list(plan.layers)
    layers[k] = replace(layers[k], drop_visual=True, select=None)
    for j in range(k + 1, len(layers)):
        layers[j] = replace(layers[j], drop_visual=False, select=None)
    return replace(plan, name=f"{plan.name}+withdraw@L{k}", layers=tuple(layers))


@dataclass(frozen=True)
class Variant:
    """One change to the model: a different plan and/or text tokens frozen in one layer (ShortV's
    text LC, which no plan field expresses: text must always be updated in a real plan)."""

    plan: Plan | None = None
    freeze_text: int | None = None


# --- the engine ------------------------------------------------------------------------------


@contextmanager
def plan_applied(model: MLLM, plan: Plan | None) -> Iterator[None]:
    """Run with `plan` (None: unchanged) and always restore the model's own plan."""
    original = model.plan
    if plan is not None and plan is not original:
        model.set_plan(plan)
    try:
        yield
    finally:
        model.plan = original  # set_plan already validated it; gated blocks it created stay harmless


def kl_divergence(base_logp: Tensor, mod_logp: Tensor, direction: str = "mod_base") -> Tensor:
    """Per-sample KL [B] between next-token distributions given as log-probabilities [B, V].

    `mod_base` = KL(p_mod || p_base), what ShortV's `nn.KLDivLoss(log_softmax(orig), softmax(mod))`
    and VTW compute; `base_mod` = KL(p_base || p_mod), the textbook "how much is lost" direction."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"KL direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    p, q = (mod_logp, base_logp) if direction == "mod_base" else (base_logp, mod_logp)
    return (p.exp() * (p - q)).sum(-1).clamp(min=0.0)  # rounding can give -1e-12


def last_logits(model: MLLM, batch: PromptBatch, hook: LayerHook | None = None) -> Tensor:
    """Next-token logits [B, V] at the end of each prompt (prefill under the model's plan), with
    `hook` observing or replacing each layer's output."""
    return model(batch.prompt_ids, batch.prompt_mask, batch.pixel_values, logits="last", layer_hook=hook,
                 image_sizes=getattr(batch, "image_sizes", None), step_seconds=getattr(batch, "step_seconds", None)).logits


def _freeze_text_hook(layer: int) -> LayerHook:
    """Text tokens pass layer `layer` unchanged (their K/V were still read by visual tokens)."""

    def hook(step: LayerStep) -> tuple[Stream, Stream] | None:
        return (step.text_in, step.vis_out) if step.index == layer else None

    return hook


def next_token_logprobs(model: MLLM, batch: PromptBatch, variant: Variant | None = None) -> Tensor:
    """log p(next token | prompt) [B, vocab] at the last prompt position, under `variant`."""
    variant = variant or Variant()
    with plan_applied(model, variant.plan):
        hook = None if variant.freeze_text is None else _freeze_text_hook(variant.freeze_text)
        logits = last_logits(model, batch, hook)
    return logits.float().log_softmax(-1)


# --- attention statistics (YOPO head activity, VisiPruner stages) ---------------------------------


@dataclass
class AttentionMap:
    """Causal attention of one layer over every token present (text first, then visual)."""

    probs: Tensor  # [B, H, S, S] queries x keys
    values: Tensor  # [B, H, S, dh] (expanded to query heads)
    is_visual: Tensor  # [B, S]
    valid: Tensor  # [B, S]


def layer_attention(layer: nn.Module, text: Stream, vis: Stream) -> AttentionMap:
    """Recompute layer attention from its own norm, projections and RoPE over the full sequence,
    ignoring the plan's restrictions (the plain causal model on the tokens that reach the layer).
    Offline analysis: the full probability matrix, clarity over speed."""
    seq = concat([text, vis]) if vis.n else text
    attn = layer.self_attn
    dh = attn.head_dim
    x = layer.input_layernorm(seq.h)
    q = apply_rope(split_heads(attn.q_proj(x), dh), seq.cos, seq.sin)
    k = apply_rope(split_heads(attn.k_proj(x), dh), seq.cos, seq.sin)
    v = split_heads(attn.v_proj(x), dh)
    is_visual = torch.cat([torch.zeros_like(text.valid), torch.ones_like(vis.valid)], 1)
    allowed = causal_mask(seq.order, seq.valid, Keys(k, v, seq.order, seq.valid, is_visual))  # the decoder's own rule
    h = q.shape[1]
    k, v = expand_kv(k, h).float(), expand_kv(v, h).float()
    logits = (q.float() @ k.transpose(-1, -2)) * attn.scaling
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return AttentionMap(probs, v, is_visual, seq.valid)


def head_visual_ratio(m: AttentionMap) -> Tensor:
    """YOPO's head activity [B, H]: attention mass on visual keys / mass on the other keys, summed
    over every valid query row (as `gen_mask_llava.py` sums over the whole map)."""
    p = m.probs * m.valid[:, None, :, None]
    vis = m.is_visual[:, None, None, :].to(p.dtype)
    return (p * vis).sum((2, 3)) / (p * (1 - vis)).sum((2, 3)).clamp(min=1e-12)


def last_token_contributions(m: AttentionMap, last: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """VisiPruner's value-aware test at the last prompt position: for each visual token j,
    c_j = concat_h P[h, last, j] V[h, j]; returns cos(o, o - c_j) [B, V], ||c_j|| [B, V] and the
    last position's attention mass on visual tokens (head mean) [B]. Invalid slots: cos 1, norm 0."""
    rows = torch.arange(m.probs.shape[0], device=last.device)
    p_last = m.probs[rows, :, last]  # [B, H, S]
    b, h, s = p_last.shape
    o = (p_last.unsqueeze(-1) * m.values).sum(2).reshape(b, -1)  # [B, H*dh]
    cols = m.is_visual[0]  # visual tokens occupy the same columns in every row
    c = (p_last[:, :, cols].unsqueeze(-1) * m.values[:, :, cols]).permute(0, 2, 1, 3).reshape(b, int(cols.sum()), -1)
    ok = m.valid[:, cols]
    cos = F.cosine_similarity(o[:, None], o[:, None] - c, dim=-1).masked_fill(~ok, 1.0)
    norm = c.norm(dim=-1).masked_fill(~ok, 0.0)
    return cos, norm, p_last[:, :, cols].sum(-1).mean(1)


@dataclass
class AttentionStats:
    """Per-sample, per-layer attention statistics gathered under the model's plan."""

    head_ratio: list[list[list[float]]] = field(default_factory=list)  # [N][L][H]
    visual_mass_last: list[list[float]] = field(default_factory=list)  # [N][L]
    token_cos: list[list[Tensor]] = field(default_factory=list)  # [N][L] -> [V_l] (visual tokens present)
    token_norm: list[list[Tensor]] = field(default_factory=list)  # [N][L] -> [V_l]


def attention_stats_batch(model: MLLM, batch: PromptBatch, stats: AttentionStats) -> None:
    """Append one batch's statistics to `stats` (one pass over the layers, plan unchanged)."""
    per_layer: list[tuple] = []

    def hook(s: LayerStep):
        m = layer_attention(s.layer, s.text_in, s.vis_in)
        cos, norm, mass = last_token_contributions(m, s.query_idx)
        per_layer.append((head_visual_ratio(m), mass, cos, norm, s.vis_in.valid))
        return None

    last_logits(model, batch, hook)
    for b in range(batch.prompt_ids.shape[0]):
        stats.head_ratio.append([r[b].tolist() for r, *_ in per_layer])
        stats.visual_mass_last.append([float(mass[b]) for _, mass, *_ in per_layer])
        stats.token_cos.append([cos[b][ok[b]].cpu() for *_, cos, _, ok in per_layer])
        stats.token_norm.append([norm[b][ok[b]].cpu() for *_, norm, ok in per_layer])


# --- the calibration loop ---------------------------------------------------------------------


@torch.no_grad()
def calibrate(
    model: MLLM,
    batches: Sequence[PromptBatch],
    variants: dict[object, Variant],
    attention: bool = False,
    direction: str = "mod_base",
    progress: bool = True,
) -> tuple[dict[object, list[float]], AttentionStats | None]:
    """Per-sample KL of every variant against the current model on every calibration batch, plus
    attention statistics when asked; a progress bar counts forward passes."""
    from tqdm.auto import tqdm

    model.eval()
    linear = [i for i, kind in enumerate(model.layer_kinds) if kind != "full_attention"]
    if attention and linear:
        raise ValueError(f"attention statistics (YOPO's head activity, VisiPruner's stages) read every layer's attention, but "
                         f"layers {linear} of this model are linear-attention layers, which have none (models/layer_kinds.py)")
    kl: dict[object, list[float]] = {key: [] for key in variants}
    stats = AttentionStats() if attention else None
    total = len(batches) * (1 + len(variants) + int(attention))
    with tqdm(total=total, desc="calibration forwards", unit="fwd", file=sys.stderr, disable=not progress) as bar:
        for batch in batches:
            base = next_token_logprobs(model, batch)
            bar.update()
            for key, variant in variants.items():
                kl[key] += kl_divergence(base, next_token_logprobs(model, batch, variant), direction).tolist()
                bar.update()
            if stats is not None:
                attention_stats_batch(model, batch, stats)
                bar.update()
    return kl, stats


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


# --- decisions (pure functions of the scores) --------------------------------------------------


def rank_ascending(scores: Sequence[float]) -> list[int]:
    """Layers from least to most important (ShortV's `argsort(LC)`; ties: lower layer first;
    unmeasured (NaN) layers last)."""
    return sorted(range(len(scores)), key=lambda i: (math.isnan(scores[i]), scores[i], i))


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """The k layers with the largest scores, in layer order (ViCA's T2V layers; NaN never wins)."""
    if not 0 < k <= len(scores):
        raise ValueError(f"K={k} must be in 1..{len(scores)} (the number of layers)")
    return sorted(sorted(range(len(scores)), key=lambda i: (math.isnan(scores[i]), -scores[i], i))[:k])


def vtw_layer(kl: Sequence[float], eta: float, min_layer: int) -> int | None:
    """VTW's rule: the first layer K >= min_layer whose withdrawal KL is <= eta (None: none is)."""
    return next((k for k in range(min_layer, len(kl)) if kl[k] <= eta), None)


def yopo_heads(ratios: Tensor, tau: float, vote: float, full_layers: int) -> tuple[list[list[int]], Tensor]:
    """YOPO's head masks from activity ratios [N, L, H]: a head is active on a sample when its
    ratio > tau and kept when active on more than `vote` of the samples (YOPO: > 40 of 100). The
    first `full_layers` layers keep every head; a layer with no kept head keeps its most active one
    (a plan needs a non-empty head set). Returns kept heads per layer and the vote fractions [L, H]."""
    votes = (ratios > tau).float().mean(0)
    activity = ratios.mean(0)
    kept = []
    for layer in range(votes.shape[0]):
        heads = list(range(votes.shape[1])) if layer < full_layers else [h for h in range(votes.shape[1]) if votes[layer, h] > vote]
        kept.append(heads or [int(activity[layer].argmax())])
    return kept, votes


def visipruner_sample(cos: Sequence[Tensor], norm: Sequence[Tensor], layer_threshold: float, token_threshold: float,
                      exit_threshold: float, exit_count: int) -> tuple[int | None, int | None]:
    """VisiPruner's per-sample stages (the released code's rules, on dense statistics): the
    filtering layer F is the first where removing some single visual token moves the last
    position's attention output below cosine `layer_threshold`; the tokens kept there have a
    contribution norm > `token_threshold`; after F, a layer where no kept token moves the output
    below `exit_threshold` counts towards the exit, and vision leaves after the `exit_count`-th such
    layer (cumulative, as in the code). Returns (F, exit layer), None where a stage never starts."""
    f = next((layer for layer, c in enumerate(cos) if c.numel() and float(c.min()) < layer_threshold), None)
    if f is None:
        return None, None
    kept = norm[f] > token_threshold
    if not bool(kept.any()):
        kept = norm[f] == norm[f].max()
    count = 0
    for layer in range(f + 1, len(cos)):
        if _kept_min_cos(cos[layer], kept) >= exit_threshold:
            count += 1
            if count == exit_count:
                return f, layer + 1
    return f, None


def _kept_min_cos(cos: Tensor, kept: Tensor) -> float:
    """Smallest cosine among the kept tokens; every token present is tested when the token set
    changed since the filtering layer (a pruning plan), none present means no impact."""
    if cos.numel() == 0:
        return 1.0
    return float(cos[kept].min()) if cos.numel() == kept.numel() else float(cos.min())


def visipruner_stages(filters: Sequence[int | None], exits: Sequence[int | None], depth: int) -> dict:
    """Static boundaries for the `visipruner` plan builder from per-sample detections: medians,
    where a sample that never filters (or never exits) counts as `depth` (a static plan serves
    every sample). shallow = F (before the first layer where a single visual token matters, text
    reading of visual tokens carries nothing token-specific), middle = F + 1 (the selection is
    scored by layer F), exit = the median exit, clamped the way the builder needs
    (1 <= shallow < middle < exit < depth). `detected` is False when most samples never filter."""
    if depth < 4:
        raise ValueError(f"visipruner needs at least 4 layers (shallow < middle < exit), the model has {depth}")
    counts = {"samples_filtering": sum(x is not None for x in filters), "samples_exiting": sum(x is not None for x in exits)}
    f = _median_or(filters, depth)
    if f >= depth:
        return {"detected": False, **counts}
    e = _median_or(exits, depth)
    shallow = max(1, f)
    middle = max(f + 1, shallow + 1)
    exit_ = max(e, middle + 1)
    clamped = exit_ >= depth
    if clamped:
        exit_ = depth - 1
        middle = min(middle, exit_ - 1)
        shallow = min(shallow, middle - 1)
    return {"detected": True, "filter_layer": f, "shallow": shallow, "middle": middle, "exit": exit_, "exit_clamped": clamped, **counts}


def _median_or(values: Sequence[int | None], missing: int) -> int:
    """Median (upper middle) with None counted as `missing`."""
    ordered = sorted(missing if v is None else v for v in values)
    return ordered[len(ordered) // 2]
