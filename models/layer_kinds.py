"""Layer kinds: what each kind of decoder layer can do with visual tokens, checked when a plan is set.

A hybrid LLM declares a kind per layer (transformers' `layer_types`; Qwen3.5: three `linear_attention`
layers, then one `full_attention` layer, repeated). Every other LLM has only full-attention layers.

* `full_attention`: softmax attention over keys and values. Every policy field has a meaning here
  (models/decoder.py).
* `linear_attention` (Gated DeltaNet, models/linear_attention.py): a causal depthwise conv over the
  tokens, then the gated delta rule, a recurrent state that every token updates and decays. There is
  no attention distribution and no key a query could skip, so a token is either in the recurrence or
  absent from it; masking is not dropping. What such a layer honours:
  - dense (every token present runs), and everything applied before the layer: drops, selections that
    read no attention (random, uniform), gated cross-attention blocks, routers (routed-out tokens are
    absent from the recurrence);
  - `visual_update=frozen` (ShortV): visual tokens feed the conv and the state that text reads, but get
    no output of their own (no gate, gated norm, out_proj, residual update or FFN); with
    `visual_kv_source=embed` (ViCA's T2V layers) what they feed is the projector output under this
    layer's norm;
  - `text_reads_visual=none` with frozen tokens (ViCA's other layers, a bypass): visual tokens are
    absent from the recurrence, the layer runs on text alone;
  - `visual_ffn` (YOPO's neuron fraction) on a dense MLP: the FFN is the same in both kinds.
  It refuses (`linear_refusal`) what presumes attention: `text_reads_visual=sink` (moving attention
  mass), `mask_semantics=post_softmax_zero` (no softmax), `visual_heads` (every head runs the same
  tokens through one conv), `visual_self_attn` local / none (a recurrence gives each token the state of
  everything before it: no window), updated visual tokens that text does not read (a second
  recurrence without them) and updated tokens whose input is the projector output (queries, keys and
  values come from one projection and one conv). Attention-scored selections (FastV, PDrop,
  VisiPruner) need a full-attention layer to score (`check_layer_kinds`); `place_scored_selections` moves
  them to the next layer where one exists.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from .validation import ConfigError

# `LayerPolicy` and `Plan` (models/plan.py) appear in annotations only: models/config.py reads the kinds,
# and models/plan.py builds on the config module, so this module imports neither.

log = logging.getLogger(__name__)

FULL, LINEAR = "full_attention", "linear_attention"
KINDS = (FULL, LINEAR)
NAMES = {FULL: "full-attention", LINEAR: "linear-attention (Gated DeltaNet)"}


def layer_kinds(text_config) -> tuple[str, ...]:
    """Each decoder layer's kind, from the text config's `layer_types` (all full attention without one)."""
    n = text_config.num_hidden_layers
    types = tuple(getattr(text_config, "layer_types", None) or (FULL,) * n)
    unknown = sorted(set(types) - set(KINDS))
    if unknown:
        raise ConfigError(f"model.text.layer_types holds {unknown}; the decoder runs {list(KINDS)} layers (sliding-window "
                          "attention is not supported: set text.use_sliding_window=false)")
    return types


def linear_refusal(p: "LayerPolicy") -> str | None:
    """Why a linear-attention layer cannot run policy `p` (None: it can)."""
    if p.text_reads_visual == "sink":
        return "text_reads_visual=sink moves text's attention mass onto one visual token, but the layer has no attention distribution"
    if p.mask_semantics == "post_softmax_zero":
        return "mask_semantics=post_softmax_zero zeroes attention probabilities after the softmax, but the layer has no softmax"
    if p.visual_heads is not None:
        return ("visual_heads restricts which heads touch visual tokens, but every head runs the same tokens through one conv and "
                "recurrence")
    if p.updates_visual and p.visual_self_attn != "full":
        return (f"visual_self_attn={p.visual_self_attn} limits what a visual token attends to, but the recurrence gives every "
                "token the state of all tokens before it: no window exists")
    if p.updates_visual and not p.text_reads:
        return ("visual tokens updated while text does not read them would need a second recurrence without them; freeze them "
                "(visual_update=frozen) or let text read them")
    if p.updates_visual and p.visual_kv_source == "embed":
        return ("visual_kv_source=embed with updated visual tokens: queries, keys and values come from one projection and one "
                "conv of the same input; use it with visual_update=frozen")
    return None


def scored_layer(p: "LayerPolicy", i: int) -> int | None:
    """The layer whose attention probabilities rank the visual tokens of layer `i`'s selection (None: no
    selection, or one that reads no attention)."""
    if p.select is None or not p.select.reads_attention:
        return None
    return i - 1 if p.select.source == "previous" else i


def check_layer_kinds(plan: "Plan", kinds: tuple[str, ...]) -> None:
    """Refuse a plan that asks a layer kind for what it cannot do, naming the layer and the kind."""
    for i, (p, kind) in enumerate(zip(plan.layers, kinds)):
        reason = linear_refusal(p) if kind == LINEAR else None
        if reason:
            raise ConfigError(f"plan {plan.name!r}: layer {i} is a {NAMES[kind]} layer, where {reason}")
        scored = scored_layer(p, i)
        if scored is not None and kinds[scored] != FULL:
            raise ConfigError(
                f"plan {plan.name!r}: the selection before layer {i} ranks visual tokens by layer {scored}'s attention, but layer "
                f"{scored} is a {NAMES[kinds[scored]]} layer, which has no attention probabilities; select after a full-attention "
                f"layer ({_full_layers(kinds)}) or with a scorer that reads none (random, uniform)")


def place_scored_selections(plan: "Plan", kinds: tuple[str, ...]) -> "Plan":
    """`plan` with every attention-scored selection whose scoring layer is not a full-attention one moved
    to the first later layer where it is (FastV's K=2 on Qwen3.5 selects before layer 4, after full-
    attention layer 3), each move said in one log line; a ConfigError where no such layer exists or the
    move would cross another token-set change."""
    layers = list(plan.layers)
    for i in range(len(layers)):
        p = layers[i]
        scored = scored_layer(p, i)
        if scored is None or kinds[scored] == FULL:
            continue
        shift = i - scored  # 1: scored by the previous layer, 0: by the layer itself
        target = next((j for j in range(i + 1, len(layers)) if kinds[j - shift] == FULL), None)
        what = f"plan {plan.name!r}: the selection before layer {i} ranks visual tokens by layer {scored}'s attention, a {NAMES[kinds[scored]]} layer"
        if target is None:
            raise ConfigError(f"{what}, and no later layer is scored by a full-attention one; select earlier or with a blind scorer "
                              "(random, uniform)")
        crossed = [j for j in range(i + 1, target + 1) if layers[j].select is not None or layers[j].drop_visual]
        if crossed:
            raise ConfigError(f"{what}; moving it to layer {target} would cross the token-set change of layer {crossed[0]}: place "
                              f"the selection after a full-attention layer ({_full_layers(kinds)}) yourself")
        layers[i], layers[target] = replace(p, select=None), replace(layers[target], select=p.select)
        where = f"layer {target}, after full-attention layer {target - 1}" if shift else f"full-attention layer {target}"
        log.warning("%s; it moves to %s", what, where)
    return replace(plan, layers=tuple(layers))


def _full_layers(kinds: tuple[str, ...]) -> str:
    full = [i for i, k in enumerate(kinds) if k == FULL]
    return ", ".join(map(str, full[:6])) + (", ..." if len(full) > 6 else "")
