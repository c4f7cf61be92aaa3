"""Every plan preset on a Qwen3-MoE LLM (per-head q/k norms before RoPE in every hand-computed
projection and score; an MoE FFN that runs only on the tokens a layer keeps) equals the slow masked
reference (fp32, <= 1e-5) in prefill and decode; YOPO's FFN-neuron fraction is refused on MoE layers
(tests/test_qwen3_text.py)."""

from __future__ import annotations

import pytest
import torch

from models.generation import greedy_generate
from tests.helpers import image_batch
from tests.reference import reference_generate, reference_logits
from tests.test_plans import VARIANTS, ids, plan_model
from tests.test_qwen3_text import llava_qwen3_config

RUNNABLE = [v for v in VARIANTS if v[0] != "yopo"]  # visual_ffn < 1: refused on MoE layers


@pytest.mark.parametrize("variant", RUNNABLE, ids=ids)
def test_prefill_and_decode_match_masked_reference_on_qwen3_moe(variant):
    model = plan_model(*variant, config=llava_qwen3_config(moe=True, text_layers=8))
    input_ids, mask, pixels = image_batch(model.config, batch=3, pad_left=[0, 2, 5], suffix=7)
    with torch.no_grad():
        got = model(input_ids, mask, pixels, logits="all").logits
    want = reference_logits(model, input_ids, mask, pixels)
    text = mask.bool() & (input_ids != model.config.image_token_id)
    assert torch.isfinite(got[text]).all()
    assert (got - want)[text].abs().max().item() <= 1e-5
    generated = greedy_generate(model, input_ids[:2], mask[:2], pixels[:2], max_new_tokens=3, eos_token_id=[-1])
    assert torch.equal(generated, reference_generate(model, input_ids[:2], mask[:2], pixels[:2], max_new_tokens=3))
