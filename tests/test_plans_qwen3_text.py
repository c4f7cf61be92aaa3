"""Every plan preset on a Qwen3-MoE LLM (per-head q/k norms before RoPE in every hand-computed
projection and score; an MoE FFN that runs only on the tokens a layer keeps) equals the slow masked
reference (fp32, <= 1e-5) in prefill and decode; YOPO's FFN-neuron fraction is refused on MoE layers
(tests/test_qwen3_text.py)."""

from __future__ import annotations

import pytest
from tests.helpers import image_batch
from tests.test_plans import VARIANTS, ids, plan_model
from tests.test_qwen3_text import llava_qwen3_config
from tests.tiled_plans import assert_decode_matches_reference, assert_prefill_matches_reference

RUNNABLE = [v for v in VARIANTS if v[0] != "yopo"]  # visual_ffn < 1: refused on MoE layers


@pytest.mark.parametrize("variant", RUNNABLE, ids=ids)
def test_prefill_and_decode_match_masked_reference_on_qwen3_moe(variant):
    model = plan_model(*variant, config=llava_qwen3_config(moe=True, text_layers=8))
    input_ids, mask, pixels = image_batch(model.config, batch=3, pad_left=[0, 2, 5], suffix=7)
    assert_prefill_matches_reference(model, input_ids, mask, pixels, None)
    assert_decode_matches_reference(model, input_ids[:2], mask[:2], pixels[:2], None, steps=3)
