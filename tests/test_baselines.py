"""The field's simple baselines as plans: seeded random and uniform selection, k x k pooling and
VisionZip's dominant tokens. (Each preset's physical forward equals the masked reference and its
FLOPs equal FlopCounterMode in tests/test_plans.py and tests/test_flops.py; here: what they select.)"""

import math

from types import SimpleNamespace

import pytest
import torch
import yaml

import models.calibration as cal
from models import MLLM
from models.blind_scores import image_keys, random_scores, uniform_lattice
from models.methods import resolve_arch
from models.plan import Plan
from models.vision import tower_features
from tests.helpers import image_batch, tiny_config
from tests.reference import reference_logits
from tests.test_plans import CONF, plan_model


def kept_patches(model, input_ids, mask, pixels, layer=0):
    """Per row, the sorted patch slots (position - image start) of the visual keys `layer` reads."""
    keys = model(input_ids, mask, pixels, logits="last", use_cache=True).cache.keys[layer]
    start = (input_ids == model.config.image_token_id).float().argmax(1)
    pos = (mask.cumsum(1) - 1).gather(1, start[:, None])
    return [sorted((keys.order[b][keys.is_visual[b] & keys.valid[b]] - pos[b]).tolist()) for b in range(len(input_ids))]


def batch_of(config, images, seed=0):
    ids, mask, _ = image_batch(config, batch=len(images), seed=seed)
    return ids, mask, torch.stack(images)


# --- random ------------------------------------------------------------------------------------


def test_random_selection_is_reproducible_per_seed_and_image_and_leaves_the_global_rng_alone():
    model = plan_model("random", {})  # K=0: before the first layer, keep 1/3 of 64 tokens
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(3, 32, 32, generator=g) for _ in range(3))
    ids, mask, pixels = batch_of(model.config, [a, b, c])
    rng = torch.get_rng_state()
    with torch.no_grad():
        first = kept_patches(model, ids, mask, pixels)
        again = kept_patches(model, ids, mask, pixels)
        alone = kept_patches(model, *batch_of(model.config, [c, a]))  # same images, other rows and batch
    assert torch.equal(rng, torch.get_rng_state())  # training's RNG streams are unchanged
    assert all(len(k) == math.ceil(64 / 3) for k in first)
    assert first == again
    assert alone == [first[2], first[0]]
    assert len({tuple(k) for k in first}) == 3  # rows (images) keep different tokens
    other_seed = plan_model("random", {"seed": 1})
    other_seed.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert all(x != y for x, y in zip(kept_patches(other_seed, ids, mask, pixels), first))


def test_random_selection_trains_without_touching_the_global_rng():
    model = plan_model("random", {"K": 16})
    model.train()
    ids, mask, pixels = image_batch(model.config, batch=2)
    labels = ids.clone()
    labels[:, : 3 + model.config.num_image_tokens + 1] = -100
    rng = torch.get_rng_state()
    model(ids, mask, pixels, labels=labels).loss.backward()
    assert torch.equal(rng, torch.get_rng_state())
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_image_keys_hash_the_exact_pixels():
    pixels = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels[2] = pixels[0]
    nudged = pixels.clone()
    nudged[0, 1, 4, 4] = torch.nextafter(nudged[0, 1, 4, 4], torch.tensor(1e9))  # one ulp
    keys = image_keys(pixels)
    assert keys.dtype == torch.int64 and bool(((keys >= 0) & (keys < 2**31 - 1)).all())
    assert keys[0] == keys[2] != keys[1]
    assert image_keys(nudged)[0] != keys[0]
    assert torch.equal(image_keys(pixels.to(torch.float64)), keys)  # the float32 value is what counts


def test_random_scores_keep_every_patch_equally_often():
    keys = torch.arange(600)[:, None] * 7919  # 600 images, one per row
    patch = torch.arange(64).expand(600, -1)
    scores = random_scores(keys, torch.zeros_like(patch), patch, seed=0, slots=65)
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(22, dim=1).indices, True)
    freq = kept.float().mean(0)  # each patch: 22/64 = 0.34 expected, binomial sd 0.02
    assert freq.min() > 0.26 and freq.max() < 0.43
    assert not torch.equal(scores, random_scores(keys, torch.zeros_like(patch), patch, seed=1, slots=65))


# --- uniform -----------------------------------------------------------------------------------


def covering_radius(grid, index):
    """Largest Chebyshev distance from a patch of the grid to its nearest kept patch."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    d = torch.maximum((rows.reshape(-1, 1) - index // grid).abs(), (cols.reshape(-1, 1) - index % grid).abs())
    return int(d.min(1).values.max())


@pytest.mark.parametrize("grid", [8, 24])
def test_uniform_lattice_keeps_exactly_k_distinct_patches(grid):
    for k in range(1, grid * grid + 1):
        index = uniform_lattice(grid, k)
        assert len(index) == k == len(set(index.tolist())) and int(index.max()) < grid * grid
    with pytest.raises(ValueError, match="does not fit"):
        uniform_lattice(grid, grid * grid + 1)


def test_uniform_lattice_spreads_the_fields_budgets_evenly():
    third = torch.tensor([1, 4, 7, 10, 13, 16, 19, 22])
    assert torch.equal(uniform_lattice(24, 64), (third[:, None] * 24 + third[None]).flatten())  # stride 3, centred
    half = torch.arange(12) * 2 + 1
    assert torch.equal(uniform_lattice(24, 144), (half[:, None] * 24 + half[None]).flatten())  # stride 2, centred
    for k in (64, 128, 144, 192):  # every patch has a kept neighbour; 64 random tokens leave gaps of 3+
        assert covering_radius(24, uniform_lattice(24, k)) == 1
    assert covering_radius(8, uniform_lattice(8, 22)) == 1


def test_uniform_selection_keeps_the_lattice():
    model = plan_model("uniform", {"keep": 0.25})
    ids, mask, pixels = image_batch(model.config, batch=2)
    with torch.no_grad():
        kept = kept_patches(model, ids, mask, pixels)
    assert kept == [sorted(uniform_lattice(8, 16).tolist())] * 2


# --- pooling -----------------------------------------------------------------------------------


def test_pool_averages_windows_and_fills_the_first_slots_of_the_image():
    model = plan_model("pool", {"kernel": 3})  # 8 x 8 grid -> 3 x 3, the last row/column of windows partial
    dense = MLLM(model.config).eval()
    dense.load_state_dict(model.state_dict())
    ids, mask, pixels = image_batch(model.config, batch=2, pad_left=[0, 2])
    with torch.no_grad():
        pooled = model.encode_images(pixels)
        tokens, keep = pooled.h.view(2, 64, -1), pooled.keep.view(2, 64)
        grid = dense.encode_images(pixels).h.view(2, 8, 8, -1)
        want = torch.stack([grid[:, r : r + 3, c : c + 3].mean((1, 2)) for r in (0, 3, 6) for c in (0, 3, 6)], 1)
        assert torch.allclose(tokens[:, :9], want, atol=1e-6) and torch.equal(keep, torch.arange(64).expand(2, -1) < 9)
        layout, text, vis = model.embed_inputs(ids, mask, pixels)
        _, dense_text, dense_vis = dense.embed_inputs(ids, mask, pixels)
    assert torch.equal(text.order, dense_text.order) and torch.equal(text.cos, dense_text.cos)  # text keeps the n_v-token prompt's positions
    assert torch.equal(vis.order, dense_vis.order[:, :9]) and torch.equal(vis.patch, torch.arange(9).expand(2, -1))
    assert torch.allclose(vis.h, want, atol=1e-6)


def test_grid_baselines_need_the_patch_grid_without_cls():
    config = tiny_config(text_layers=8, image_size=32, vision_feature_select_strategy="full")  # CLIP: CLS + 64 patches
    text = config.hf_text_config()
    for name in ("pool", "uniform"):
        plan = resolve_arch(yaml.safe_load((CONF / f"{name}.yaml").read_text()), 8, text.num_attention_heads)
        with pytest.raises(ValueError, match="include the CLS token"):
            MLLM(config, plan)
    random = resolve_arch(yaml.safe_load((CONF / "random.yaml").read_text()), 8, text.num_attention_heads)
    torch.manual_seed(0)
    model = MLLM(config, random).eval()
    ids, mask, pixels = image_batch(config, batch=2, pad_left=[0, 3])
    with torch.no_grad():
        got = model(ids, mask, pixels, logits="all").logits
    want = reference_logits(model, ids, mask, pixels)
    is_text = mask.bool() & (ids != config.image_token_id)
    assert (got - want)[is_text].abs().max().item() <= 1e-5


# --- dominant tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_dominance_is_the_feature_layers_attention_as_hf_computes_it(vision):
    torch.manual_seed(0)
    config = tiny_config(vision=vision, image_size=32)
    tower = MLLM(config).eval().vision_tower
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, dominance = tower_features(tower, pixels, config, "dominance")
        tower.set_attn_implementation("eager")
        attn = tower(pixel_values=pixels, output_attentions=True).attentions[config.vision_layers_used - 1].mean(1)
    want = attn[:, 0, 1:] if vision == "clip" else attn.mean(1)  # CLS row without CLS / mean over queries
    assert features.shape[1] == dominance.shape[1] == 64
    assert torch.allclose(dominance, want, atol=1e-6)


def test_dominant_plan_on_siglip_matches_the_masked_reference():
    config = tiny_config(vision="siglip", text_layers=8, image_size=32)
    text = config.hf_text_config()
    plan = resolve_arch({"methods": {"dominant": {"keep": 0.25}}}, 8, text.num_attention_heads)
    torch.manual_seed(0)
    model = MLLM(config, plan).eval()
    ids, mask, pixels = image_batch(config, batch=3, pad_left=[0, 2, 5], suffix=7)
    with torch.no_grad():
        got = model(ids, mask, pixels, logits="all").logits
        keep = model.encode_images(pixels).keep.view(3, -1)
    want = reference_logits(model, ids, mask, pixels)
    is_text = mask.bool() & (ids != config.image_token_id)
    assert (got - want)[is_text].abs().max().item() <= 1e-5
    assert keep.sum(1).tolist() == [16] * 3


# --- plumbing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, knobs", [("random", {"K": 16}), ("uniform", {}), ("pool", {}), ("dominant", {})])
def test_layer_hooks_see_the_baselines_selection(name, knobs):
    """The analysis tools' layer hook observes the same forward (random keys included): keeping each
    layer's output changes nothing, and the visual stream shrinks where the plan says."""
    model = plan_model(name, knobs)
    ids, mask, pixels = image_batch(model.config, batch=2, pad_left=[0, 2])
    batch = SimpleNamespace(prompt_ids=ids, prompt_mask=mask, pixel_values=pixels)
    sizes = []

    def keep(step):
        sizes.append(int(step.vis_in.valid.sum(1).max()) if step.vis_in.n else 0)
        return step.text_out, step.vis_out

    with torch.no_grad():
        assert torch.equal(cal.last_logits(model, batch, keep), model(ids, mask, pixels, logits="last").logits)
    assert max(sizes) < model.config.num_image_tokens or sizes[-1] < sizes[0]


def test_baseline_plans_round_trip_and_name_themselves():
    for name, knobs in [("random", {"seed": 3, "K": 8}), ("pool", {"kernel": 3}), ("dominant", {})]:
        plan = resolve_arch({"methods": {name: knobs}}, 8, 4)
        assert Plan.from_dict(plan.to_dict()) == plan and plan.name == name
    assert resolve_arch({"pre_llm": {"method": "pool", "kernel": 2}}, 8, 4).name == "pool"
    combo = resolve_arch({"methods": {"pool": {}, "random": {"K": 16}}}, 8, 4)
    assert combo.pre_llm.method == "pool" and combo.layers[4].select.scorer == "random"
