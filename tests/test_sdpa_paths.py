"""Which SDPA path every layer of every plan preset takes, asserted on CPU so that a change that
would cost GPUs their flash kernels (a materialised mask, K/V expanded in memory) fails here.

Dense layers (and layers that treat the visual tokens present like text) run as one causal sequence
and text-only layers run on the text stream: both call SDPA with is_causal and native GQA, also on
padded batches. Layers that restrict what text reads keep their masks; decoding never builds more
than one mask row per query."""

import dataclasses

import pytest
import torch

from models.attention import SdpaCall, record_sdpa_calls
from models.decoder import runs_as_one_sequence
from models.generation import greedy_generate
from tests.helpers import image_batch
from tests.test_plans import VARIANTS, ids, plan_model

CAUSAL = ("causal", "native")  # tiny_config: 4 query heads over 2 K/V heads


def calls_per_layer(model, run) -> list[list[tuple[str, str]]]:
    """(mask kind, GQA mode) of the SDPA calls made inside each decoder layer while `run()` runs."""
    per_layer: list[list[SdpaCall]] = []
    with record_sdpa_calls() as calls:
        starts = []
        hooks = [layer.register_forward_pre_hook(lambda *_: starts.append(len(calls))) for layer in model.language_model.layers]
        hooks += [layer.register_forward_hook(lambda *_: per_layer.append(calls[starts.pop():])) for layer in model.language_model.layers]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
    return [[(c.mask, c.gqa) for c in layer] for layer in per_layer]


def expected_prefill(plan) -> list[list[tuple[str, str]]]:
    """The path each layer's policy implies (prefill)."""
    out, visual_left = [], True
    for p in plan.layers:
        if p.select is not None and p.select.source == "current" and p.select.positions == "renumber":
            p = dataclasses.replace(p, select=None)  # a probe scores, the layer then runs without a selection
        visual_left = visual_left and not p.drop_visual
        if not visual_left or runs_as_one_sequence(p):
            out.append([CAUSAL])
            continue
        text_sees_visual = p.text_reads or p.mask_semantics == "post_softmax_zero"
        calls = []
        if not text_sees_visual:
            calls.append(CAUSAL)
        elif p.mask_semantics == "renorm" and p.text_reads_visual != "sink":
            calls.append(("mask", "expanded"))
        # else: post-softmax zeroing or a sink: eager attention, no SDPA
        if p.updates_visual and p.visual_self_attn == "full":
            calls.append(("mask", "mha"))  # visual queries over their heads' K/V
        out.append(calls)
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
@pytest.mark.parametrize("pad_left", [None, [0, 2, 5]], ids=["no-padding", "left-padding"])
def test_prefill_paths_of_every_preset(variant, pad_left):
    model = plan_model(*variant)
    input_ids, mask, pixels = image_batch(model.config, batch=3, pad_left=pad_left, suffix=7)
    with torch.no_grad():
        got = calls_per_layer(model, lambda: model(input_ids, mask, pixels, logits="last", use_cache=True))
    assert got == expected_prefill(model.plan)


def test_dense_and_text_only_layers_never_build_a_mask():
    """The two fast cases spelled out: every dense layer, and ViCA's text-only layers."""
    for name, fast_layers in [("dense", range(8)), ("vica", [4, 5, 6, 7])]:
        model = plan_model(name, {})
        input_ids, mask, pixels = image_batch(model.config, batch=2)
        mask[1, -3:] = 0  # right padding, as training batches have
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, : 3 + model.config.num_image_tokens + 1] = -100
        model.train()
        got = calls_per_layer(model, lambda: model(input_ids, mask, pixels, labels=labels).loss.backward())
        for i in fast_layers:
            assert got[i] == [CAUSAL], (name, i, got[i])


@pytest.mark.parametrize("name", ["dense", "vica", "yopo", "fastv"])
def test_decode_builds_one_mask_row_per_query(name):
    model = plan_model(name, {})
    input_ids, mask, pixels = image_batch(model.config, batch=2, pad_left=[0, 3])
    with record_sdpa_calls() as calls:
        greedy_generate(model, input_ids, mask, pixels, max_new_tokens=3, eos_token_id=[-1])
    decode = [c for c in calls if c.q_len == 1]
    assert decode, "no decode-step calls recorded"
    for c in decode:
        assert c.mask == "mask" and c.mask_shape[2] == 1  # [B, 1 or H, 1, S]: no L x L
        assert c.gqa == "packed"  # one query row folded onto its K/V head, with YOPO's per-head mask too
