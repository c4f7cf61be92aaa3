"""Every plan preset on Qwen3.5 (a hybrid LLM: layers 0-2 and 4-6 Gated DeltaNet, 3 and 7 full attention)
either runs and equals the reference built from transformers' own layer forwards on each layer's tokens
(tests/hybrid_reference.py; fp32, <= 1e-5, prefill and greedy decode), or is refused with one message
that names the layer and its kind. Attention-scored selections move after the next full-attention layer
(FastV's K=2 selects before layer 4), in one log line. Packed rows keep samples apart in the recurrence:
changing one sample changes no bit of another's logits, and each sample equals itself alone."""

from __future__ import annotations

import logging

import pytest
import torch

from models.generation import greedy_generate
from tests.helpers import qwen_batch, tiny_qwen3_5_config
from tests.hybrid_reference import hybrid_reference_generate, hybrid_reference_logits
from tests.test_plans import PRESETS, ids, plan_model

REFUSED = {
    "cls_knee": "no CLS token",
    # PyramidDrop's three stages (before layers 2, 4, 6 of 8) each score with their own layer's attention: the tiny
    # model's two full-attention layers (3, 7) cannot hold them (the second would move across the third)
    "pdrop": "selection before layer 4 .* would cross the token-set change of layer 6",
    "visipruner": "layer 0 is a linear-attention .* no attention distribution",  # its sink at layer 0
    "yopo": "layer 0 is a linear-attention .* visual_heads",  # its head subsets (and local windows)
}
RUNNABLE = [(name, {}) for name in PRESETS if name not in REFUSED] + [
    ("fastv", {"K": 16}),  # before layer 4: already after full-attention layer 3, nothing moves
    ("random", {"K": 16, "keep": 0.5}),  # a blind selection before a linear layer: no scores needed
    ("shortv", {"N": 4, "ranked_layers": [0, 3, 5, 6], "reference_depth": 8}),  # frozen in linear and full layers
]


def qwen35_plan_model(name: str, knobs: dict, moe: bool = False, seed: int = 0):
    return plan_model(name, knobs, seed=seed, config=tiny_qwen3_5_config(moe=moe, text_layers=8))


def check_prefill_and_decode(model, seed: int = 0):
    input_ids, mask, pixels, grids, _ = qwen_batch(model.config, pad_left=[0, 2, 5], seed=seed)
    with torch.no_grad():
        got = model(input_ids, mask, pixels, logits="all", image_sizes=grids).logits
    want = hybrid_reference_logits(model, input_ids, mask, pixels, image_sizes=grids)
    text = mask.bool() & (input_ids != model.config.image_token_id)
    assert torch.isfinite(got[text]).all()
    assert (got - want)[text].abs().max().item() <= 1e-5
    n = int(grids[:2].prod(-1).sum())  # the first two rows' images
    generated = greedy_generate(model, input_ids[:2], mask[:2], pixels[:n], max_new_tokens=3, eos_token_id=[-1], image_sizes=grids[:2])
    assert torch.equal(generated, hybrid_reference_generate(model, input_ids[:2], mask[:2], pixels[:n], 3, image_sizes=grids[:2]))


@pytest.mark.parametrize("variant", RUNNABLE, ids=ids)
def test_prefill_and_decode_match_transformers_layers_on_the_kept_tokens(variant):
    check_prefill_and_decode(qwen35_plan_model(*variant))


@pytest.mark.parametrize("variant", [("fastv", {}), ("vica", {}), ("shortv", {})], ids=ids)
def test_prefill_and_decode_match_on_qwen3_5_moe(variant):
    check_prefill_and_decode(qwen35_plan_model(*variant, moe=True), seed=1)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_presets_a_hybrid_llm_cannot_run_are_refused_naming_layer_and_kind(name):
    with pytest.raises(ValueError, match=REFUSED[name]):
        qwen35_plan_model(name, {})


def test_fastv_moves_after_the_next_full_attention_layer_in_one_line(caplog):
    """FastV's K=2 of 32 is layer 1 of 8, scored by layer 0 (linear): it selects before layer 4 instead."""
    with caplog.at_level(logging.WARNING, logger="models.layer_kinds"):
        model = qwen35_plan_model("fastv", {})
    assert [i for i, p in enumerate(model.plan.layers) if p.select is not None] == [4]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "selection before layer 1 ranks visual tokens by layer 0's attention" in line and "moves to layer 4" in line


def packed(model, rows, pixels_of, grids_of):
    """The rows (ids) packed into one row with their images, and its forward's logits [L, V]."""
    ids = torch.cat(rows)[None]
    sample = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)])[None]
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), torch.cat(pixels_of), logits="all", image_sizes=torch.cat(grids_of),
                     sample_index=sample).logits[0]


@pytest.mark.parametrize("variant", [("dense", {}), ("vica", {}), ("fastv", {}), ("shortv", {})], ids=ids)
def test_packed_samples_are_isolated_in_the_recurrence(variant):
    """Three samples packed into one row: each equals itself alone (<= 1e-5), and changing the middle
    sample's text and image changes no bit of the first's or the last's logits (each sample's conv window and
    recurrent state start from zero at its first token; attention stays inside it)."""
    model = qwen35_plan_model(*variant)
    ids, mask, pixels, grids, _ = qwen_batch(model.config, seed=3)
    rows = [ids[i][mask[i].bool()] for i in range(3)]
    patches = grids.prod(-1).tolist()
    pix = list(pixels.split(patches))
    grid = [grids[i : i + 1] for i in range(3)]
    got = packed(model, rows, pix, grid)
    start = 0
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = model(row[None], torch.ones_like(row)[None], pix[i], logits="all", image_sizes=grid[i]).logits[0]
        text = row != model.config.image_token_id
        assert (got[start : start + len(row)][text] - alone[text]).abs().max().item() <= 1e-5
        start += len(row)
    changed = list(rows)
    changed[1] = torch.where(rows[1] == model.config.image_token_id, rows[1], (rows[1] * 7 + 3) % 90 + 7)
    pix2 = list(pix)
    pix2[1] = torch.randn_like(pix[1])
    other = packed(model, changed, pix2, grid)
    first, last = slice(0, len(rows[0])), slice(len(rows[0]) + len(rows[1]), None)
    for part in (first, last):  # bit for bit (pruned visual tokens have NaN logits, the same ones)
        torch.testing.assert_close(got[part], other[part], rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(got[len(rows[0]) : len(rows[0]) + len(rows[1])], other[len(rows[0]) : len(rows[0]) + len(rows[1])])
