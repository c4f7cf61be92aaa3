"""Every plan preset on Qwen2-VL and Qwen2.5-VL equals the slow masked reference (fp32, <= 1e-5) in
prefill and decode, on a batch of three images of different grids (3 x 5, 5 x 2 and 4 x 3 tokens)
with left padding, M-RoPE positions throughout; and the Qwen semantics of each plan hold: a kept
token keeps its (t, h, w) triple, pooling and the uniform lattice follow each image's own grid,
`dominant` reads the tower's last block (put back from window order for Qwen2.5-VL), PDrop keeps the
survivors' triples by default, and plans that cannot apply fail when they are set, saying why."""

from __future__ import annotations

import math

import pytest
import torch

from models import MLLM
from models.streams import Place
from tests.helpers import qwen_batch, tiny_qwen_config
from tests.test_plans import VARIANTS, ids, plan_model
from tests.tiled_plans import assert_decode_matches_reference, assert_prefill_matches_reference

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
REFUSED = {"cls_knee": "no CLS token", "pdrop": "renumbers RoPE positions"}
REFUSED_KNOBS = {"pdrop": {"positions": "renumber"}}  # PDrop's released code renumbers; by default it keeps positions here
RUNNABLE = [v for v in VARIANTS if not (v[0] in REFUSED and v[1] == REFUSED_KNOBS.get(v[0], {}))]
assert ("pdrop", {}) in RUNNABLE


def qwen_plan_model(family: str, name: str, knobs: dict, layers: int = 8, seed: int = 0) -> MLLM:
    """An 8-layer tiny Qwen model under the preset, gates opened."""
    return plan_model(name, knobs, seed=seed, config=tiny_qwen_config(family, text_layers=layers))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", RUNNABLE, ids=ids)
def test_prefill_matches_masked_reference_on_qwen(family, variant):
    model = qwen_plan_model(family, *variant)
    input_ids, mask, pixels, grids, _ = qwen_batch(model.config, pad_left=[0, 2, 5])
    assert_prefill_matches_reference(model, input_ids, mask, pixels, grids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", RUNNABLE, ids=ids)
def test_decode_matches_masked_reference_on_qwen(family, variant):
    model = qwen_plan_model(family, *variant, seed=1)
    input_ids, mask, pixels, grids, _ = qwen_batch(model.config, pad_left=[0, 3, 1], seed=2)
    assert_decode_matches_reference(model, input_ids, mask, pixels, grids)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_plans_that_cannot_apply_fail_when_set(name):
    with pytest.raises(ValueError, match=REFUSED[name]):
        qwen_plan_model("qwen2_vl", name, REFUSED_KNOBS.get(name, {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_pdrop_keeps_positions_on_m_rope_by_default_and_says_so(family):
    """`arch=pdrop` on M-RoPE: every selection keeps positions, and the plan's name (what the run's summary
    line and metrics.json report) says so; on 1-D RoPE the preset still renumbers, as PyramidDrop's code does."""
    plan = qwen_plan_model(family, "pdrop", {}).plan
    selections = [p.select for p in plan.layers if p.select is not None]
    assert plan.name == "pdrop[positions=keep]" and not plan.renumbers and len(selections) == 3
    assert plan_model("pdrop", {}).plan.name == "pdrop" and plan_model("pdrop", {}).plan.renumbers


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name, knobs", [("fastv", {}), ("random", {}), ("pdrop", {}), ("dominant", {})])
def test_kept_tokens_keep_their_position_triples(family, name, knobs):
    """After every selection, each visual token's RoPE tables are those of its own prompt (t, h, w)
    triple (found through its slot), never of a rank among the survivors."""
    from models.mllm import take_positions
    from models.streams import Layout

    model = qwen_plan_model(family, name, knobs)
    input_ids, mask, pixels, grids, _ = qwen_batch(model.config, pad_left=[0, 2, 5])
    positions = model.prompt_positions(input_ids, mask, grids)
    layout = Layout.from_inputs(input_ids, mask, model.config.image_token_id)
    seen = []
    model(input_ids, mask, pixels, logits="last", image_sizes=grids, layer_hook=lambda step: seen.append(step.vis_in) and None)
    counts = set()
    for vis in seen:
        sequence_index = torch.gather(layout.vis_index, 1, vis.at(Place.SLOT))
        cos, sin = model.rope(vis.h, take_positions(positions, sequence_index))
        valid = vis.valid
        assert torch.equal(vis.cos[valid], cos[valid]) and torch.equal(vis.sin[valid], sin[valid])
        counts.add(int(valid.sum()))
    assert min(counts) < int(layout.vis_valid.sum())  # the plan did drop tokens


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_pool_and_uniform_follow_each_image_grid(family):
    """2 x 2 pooling gives ceil(rows/2) x ceil(cols/2) tokens per image, and the 1/4 lattice keeps
    ceil(n/4) tokens of every image, on grids of 3 x 5, 5 x 2 and 4 x 3 tokens."""
    _, _, pixels, grids, _ = qwen_batch(tiny_qwen_config(family))
    pooled = qwen_plan_model(family, "pool", {"kernel": 2}).encode_images(pixels, grids)
    shapes = [(h // 2, w // 2) for _, h, w in grids.tolist()]
    per_image = torch.bincount(pooled.image_of_token[pooled.keep], minlength=len(shapes)).tolist()
    assert per_image == [math.ceil(r / 2) * math.ceil(c / 2) for r, c in shapes]
    model = qwen_plan_model(family, "uniform", {"keep": 0.25})
    input_ids, mask, pixels, grids, _ = qwen_batch(model.config)
    seen = []
    model(input_ids, mask, pixels, logits="last", image_sizes=grids, layer_hook=lambda step: seen.append(step.vis_out) and None)
    vis = seen[-1]
    assert vis.valid.sum(1).tolist() == [math.ceil(r * c / 4) for r, c in shapes]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_dominance_is_the_last_blocks_attention_in_raster_order(family):
    """The tower score of each token is the attention its four patches receive in the last block
    (mean over heads and queries, within the image), recomputed here from the HF tower's own
    recorded input, in raster order also for Qwen2.5-VL's windows."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    model = qwen_plan_model(family, "dominant", {})
    _, _, pixels, grids, _ = qwen_batch(model.config)
    tokens = model.family.encode(model, pixels, grids, "dominance")
    tower, family_ = model.vision_tower, model.family
    recorded = {}
    hook = tower.blocks[-1].attn.register_forward_hook(
        lambda m, args, kwargs, out: recorded.update(x=args[0], pe=kwargs["position_embeddings"]), with_kwargs=True)
    family_.run_tower(tower, pixels, grids, dominance=False)
    hook.remove()
    order = family_.unit_order(tower, grids)
    attn, start = tower.blocks[-1].attn, 0
    want = []
    for _, h, w in grids.tolist():
        n = h * w
        qkv = attn.qkv(recorded["x"][start : start + n]).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3)
        cos, sin = (t[start : start + n] for t in recorded["pe"])
        q, k = apply_rotary_pos_emb_vision(qkv[0].transpose(0, 1), qkv[1].transpose(0, 1), cos, sin)
        probs = torch.softmax(q.transpose(0, 1) @ k.transpose(0, 1).transpose(-1, -2) * attn.scaling, -1)
        want.append(probs.mean((0, 1)).view(-1, 4).mean(1))
        start += n
    assert torch.allclose(tokens.scores["dominance"], torch.cat(want)[torch.argsort(order)], atol=1e-6)
    assert family != "qwen2_5_vl" or not torch.equal(order, torch.arange(len(order)))  # the windows do permute
