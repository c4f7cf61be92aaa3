"""Plans over time on Qwen2-VL and Qwen2.5-VL video: every plan that applies equals the slow masked
reference (fp32, <= 1e-5) in prefill and decode on a left-padded batch of a video row and an image-then-
video row, M-RoPE positions with time throughout; and the temporal semantics hold: budgets per video or
per time step, kept tokens keep their (t, h, w) triples, uniform frame subsampling never runs the
tower on the steps it drops (whose h * w / 4 tokens leave), temporal pooling merges the same cell of
adjacent steps at the first step's slot, per-frame pooling stays inside each step."""

from __future__ import annotations

import math

import pytest
import torch

from models.generation import greedy_generate
from models.streams import Layout, Place
from tests.helpers import qwen_visual_batch, tiny_qwen_config
from tests.reference import reference_generate, reference_logits
from tests.test_plans import ids, plan_model

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
ROWS = [["video 0"], ["image 2", "video 1"]]  # 2 steps of 4 x 4, then 3 steps of 3 x 5 (+ an image of 3 x 5)
VARIANTS = [
    ("dense", {}), ("fastv", {}), ("fastv", {"per": "unit"}), ("pdrop", {"positions": "keep"}),
    ("pdrop", {"positions": "keep", "per": "unit"}), ("vtw", {}), ("vica", {}), ("random", {"per": "unit"}),
    ("uniform", {"keep": 0.25}), ("pool", {}), ("temporal_pool", {}), ("frames", {}), ("dominant", {}),
    ("pmod", {}), ("gamma_mod", {}),  # routers keep a budget of each item (a video: all its steps)
]


def video_model(family: str, name: str, knobs: dict, seed: int = 0):
    return plan_model(name, knobs, seed=seed, config=tiny_qwen_config(family, text_layers=8))


def batch(model, pad_left=(0, 3), seed=0):
    ids_, mask, _, items = qwen_visual_batch(model.config, ROWS, pad_left=list(pad_left), seed=seed)
    return ids_, mask, items


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_prefill_matches_masked_reference_on_video(family, variant):
    model = video_model(family, *variant)
    input_ids, mask, items = batch(model)
    with torch.no_grad():
        got = model(input_ids, mask, logits="all", **items).logits
    want = reference_logits(model, input_ids, mask, items["pixel_values"], image_sizes=items["image_sizes"],
                            step_seconds=items["step_seconds"])
    text = mask.bool() & ~torch.isin(input_ids, torch.tensor(model.config.visual_token_ids))
    assert torch.isfinite(got[text]).all()
    assert (got - want)[text].abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_decode_matches_masked_reference_on_video(family, variant):
    model = video_model(family, *variant, seed=1)
    input_ids, mask, items = batch(model, pad_left=(2, 0), seed=2)
    got = greedy_generate(model, input_ids, mask, max_new_tokens=4, eos_token_id=[-1], **items)
    want = reference_generate(model, input_ids, mask, items["pixel_values"], max_new_tokens=4, image_sizes=items["image_sizes"],
                              step_seconds=items["step_seconds"])
    assert torch.equal(got, want)


def layer_inputs(model, input_ids, mask, items) -> list:
    seen = []
    with torch.no_grad():
        model(input_ids, mask, logits="last", layer_hook=lambda step: seen.append(step.vis_in) and None, **items)
    return seen


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name, knobs", [("fastv", {"per": "unit"}), ("pdrop", {"positions": "keep"}), ("frames", {}),
                                         ("temporal_pool", {})])
def test_kept_tokens_keep_their_time_row_and_column(family, name, knobs):
    """After every plan step, each visual token's RoPE tables are those of its own prompt (t, h, w)
    triple, found through its slot: the time of its step, never a rank among the survivors."""
    from models.mllm import take_positions

    model = video_model(family, name, knobs)
    input_ids, mask, items = batch(model)
    positions = model.prompt_positions(input_ids, mask, items["image_sizes"], step_seconds=items["step_seconds"])
    layout = Layout.from_inputs(input_ids, mask, model.config.visual_token_ids)
    counts = set()
    for vis in layer_inputs(model, input_ids, mask, items):
        cos, sin = model.rope(vis.h, take_positions(positions, torch.gather(layout.vis_index, 1, vis.at(Place.SLOT))))
        assert torch.equal(vis.cos[vis.valid], cos[vis.valid]) and torch.equal(vis.sin[vis.valid], sin[vis.valid])
        counts.add(int(vis.valid.sum()))
    assert min(counts) < int(layout.vis_valid.sum())  # the plan did drop tokens


@torch.no_grad()
@pytest.mark.parametrize("per", ["image", "unit"])
def test_budgets_apply_per_video_or_per_time_step(per):
    """FastV keeping half: per=unit keeps ceil(n / 2) tokens of every time step, per=image ceil(n / 2)
    of each video, wherever they fall."""
    model = video_model("qwen2_vl", "fastv", {"per": per})
    input_ids, mask, items = batch(model)
    kept = layer_inputs(model, input_ids, mask, items)[-1]
    for b in range(2):
        own = kept.valid[b]
        items_ = kept.image[b][own]
        for item in items_.unique().tolist():
            steps = kept.at(Place.TIME)[b][own][items_ == item]
            grid = {0: 12, 1: 15}[int(item)] if b == 1 else 16  # tokens per step of this row's items
            n_steps = {(0, 0): 2, (1, 0): 1, (1, 1): 3}[b, int(item)]
            if per == "unit":
                assert torch.bincount(steps, minlength=n_steps).tolist() == [math.ceil(grid / 2)] * n_steps
            else:
                assert len(steps) == math.ceil(n_steps * grid / 2)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_frame_subsampling_skips_the_tower_on_the_dropped_steps(family):
    """keep 0.5 of 3 steps keeps steps 0 and 2 (each centred in a half... of [0, 3)): 15 tokens of
    step 1 leave, the 2-step video keeps step 1 of [0, 2) and loses 16; kept tokens equal the dense
    encoding's (steps do not mix in the tower); the tower sees only the kept steps' patches."""
    from models.selection import frame_steps

    assert frame_steps(3, 0.5) == [0, 2] and frame_steps(2, 0.5) == [1] and frame_steps(1, 0.5) == [0] and frame_steps(8, 0.5) == [1, 3, 5, 7]
    model = video_model(family, "frames", {})
    _, _, items = batch(model)
    seen = []
    hook = model.vision_tower.patch_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    tokens = model.encode_images(items["pixel_values"], items["image_sizes"])
    hook.remove()
    sizes = items["image_sizes"]
    assert seen == [int(sizes[:, 1:].prod(-1) @ torch.tensor([1, 1, 2]))]  # video 0: 1 of 2 steps, image: 1, video 1: 2 of 3
    dense = model.family.encode(model, items["pixel_values"], sizes)
    assert torch.equal(tokens.place, dense.place)
    assert (tokens.h[tokens.keep] - dense.h[tokens.keep]).abs().max().item() <= 1e-5
    dropped = [(int(i), int(t)) for i, t in zip(tokens.image_of_token[~tokens.keep], tokens.place[~tokens.keep, Place.TIME])]
    assert sorted(set(dropped)) == [(0, 0), (2, 1)] and len(dropped) == 16 + 15  # whole steps, h * w / 4 tokens each


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_temporal_and_per_frame_pooling(family):
    """Temporal pooling: the token at (2j, r, c) becomes the mean of steps 2j and 2j + 1 at (r, c), in its
    own slot (a lone last step stays); per-frame pooling: each step's 2 x 2 windows fill that step's first
    slots, so every pooled token keeps its step's time."""
    dense = video_model(family, "dense", {})
    _, _, items = batch(dense)
    base = dense.encode_images(items["pixel_values"], items["image_sizes"])
    merged = video_model(family, "temporal_pool", {}).encode_images(items["pixel_values"], items["image_sizes"])
    video = base.image_of_token == 2  # the 3-step video: steps 0 + 1 merged, step 2 alone
    step = base.place[:, Place.TIME]
    for t, want in ((0, (base.h[video & (step == 0)] + base.h[video & (step == 1)]) / 2), (2, base.h[video & (step == 2)])):
        at = video & (step == t)
        assert merged.keep[at].all() and (merged.h[at] - want).abs().max().item() <= 1e-6
        assert torch.equal(merged.place[at], base.place[at])
    assert not merged.keep[video & (step == 1)].any()
    pooled = video_model(family, "pool", {}).encode_images(items["pixel_values"], items["image_sizes"])
    for t in range(3):
        at = video & (step == t)
        assert pooled.keep[at].sum() == 2 * 3  # 3 x 5 tokens -> 2 x 3 windows, in the step's own first slots
        assert (pooled.place[at & pooled.keep, Place.TIME] == t).all()


@pytest.mark.parametrize("name, knobs", [("dense", {}), ("frames", {}), ("temporal_pool", {}), ("pool", {}), ("fastv", {"per": "unit"}),
                                         ("uniform", {"keep": 0.25})])
def test_analytic_flops_match_the_flop_counter_on_video(name, knobs):
    """One video at a time: the tower and projector as the plan runs them (`towered_size`: only the kept
    steps under frame subsampling) and the LLM count of the video's layout equal FlopCounterMode."""
    from models.blind_scores import image_keys_for
    from models.decoder import run_decoder
    from models.flops import ImageTokens, Shape, measure_flops, plan_terms
    from models.mllm import query_index
    from models.streams import images_per_row
    from models.vision_flops import towered_size

    model = video_model("qwen2_vl", name, knobs)
    config, shape = model.config, Shape.from_hf(model.text_config)
    for row in (["video 0"], ["video 1"]):
        ids_, mask, _, items = qwen_visual_batch(config, [row])
        grid = tuple(items["image_sizes"][0].tolist())
        with torch.no_grad():
            front, _ = measure_flops(model.encode_images, items["pixel_values"], items["image_sizes"])
            _, text, vis = model.embed_inputs(ids_, mask, items["pixel_values"], items["image_sizes"], step_seconds=items["step_seconds"])
            keys = image_keys_for(model.plan, model.family.image_pixels(model.config, items["pixel_values"], items["image_sizes"]), images_per_row(vis))
            measured, _ = measure_flops(run_decoder, model.language_model, model.plan, text, vis, query_index(text, None),
                                        model.xattn, image_keys=keys)
        assert front == sum(model.family.vision_flops(config, towered_size(model.plan, grid)).values())
        terms, _ = plan_terms(shape, model.plan, ImageTokens.from_places(config.model_family.image_places(config, grid)), text.n)
        assert abs(sum(terms.values()) - measured) / measured < 0.02, (name, row, sum(terms.values()), measured)
