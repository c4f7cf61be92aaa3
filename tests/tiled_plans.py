"""Checks the plan tests of other families share (tests/test_plans_next.py, tests/test_plans_internvl.py,
tests/test_plans_mobilevlm.py, tests/test_plans_qwen.py, tests/test_plans_qwen3_vl.py, tests/test_plans_qwen3_text.py): a plan's prefill and decode equal the masked reference on a batch (with
`image_sizes` for tiling families, None otherwise), and the places of the visual keys a layer reads."""

from __future__ import annotations

import torch

from models.generation import greedy_generate
from tests.reference import reference_generate, reference_logits


def assert_prefill_matches_reference(model, input_ids, mask, pixels, sizes) -> None:
    with torch.no_grad():
        got = model(input_ids, mask, pixels, logits="all", image_sizes=sizes).logits
    want = reference_logits(model, input_ids, mask, pixels, image_sizes=sizes)
    text = mask.bool() & (input_ids != model.config.image_token_id)
    assert torch.isfinite(got[text]).all()
    assert (got - want)[text].abs().max().item() <= 1e-5


def assert_decode_matches_reference(model, input_ids, mask, pixels, sizes, steps: int = 4) -> None:
    got = greedy_generate(model, input_ids, mask, pixels, max_new_tokens=steps, eos_token_id=[-1], image_sizes=sizes)
    want = reference_generate(model, input_ids, mask, pixels, max_new_tokens=steps, image_sizes=sizes)
    assert torch.equal(got, want)


def visual_keys(model, input_ids, mask, pixels, sizes, layer):
    """Per row, the places of the visual keys `layer` reads, and the visual stream they come from."""
    out = model(input_ids, mask, pixels, logits="last", use_cache=True, image_sizes=sizes)
    keys = out.cache.keys[layer]
    with torch.no_grad():
        _, _, vis = model.embed_inputs(input_ids, mask, pixels, sizes)
    rows = []
    for b in range(input_ids.shape[0]):
        orders = keys.order[b][keys.is_visual[b] & keys.valid[b]]
        rows.append(vis.place[b][vis.valid[b] & torch.isin(vis.order[b], orders)])
    return rows, vis
