"""Qwen3 and Qwen3-MoE LLMs (InternVL3.5's, and any LLaVA-style model's): our forward equals
transformers' on the same weights (fp32) with `LlavaForConditionalGeneration` and
`InternVLForConditionalGeneration` over `qwen3` / `qwen3_moe` text configs: logits, loss, greedy
generation, and the MoE load-balancing loss, which under a plan counts only the tokens each layer's
FFN processed (equal to the masked reference's). Per-head q/k norms act in every projection the
plans compute by hand (tests/test_plans_qwen3_text.py runs every preset against the masked reference)."""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from models import MLLMConfig
from models.plan import Plan
from tests.helpers import (assert_greedy_matches_hf, exported_pair, image_batch, internvl_images, next_batch, qwen3_text,
                           tiny_config, tiny_internvl_config)
from tests.reference import reference_logits

TEXTS = {"qwen3": False, "qwen3_moe": True}


def llava_qwen3_config(moe: bool, text_layers: int = 3) -> MLLMConfig:
    base = tiny_config()
    return MLLMConfig(vision=base.vision, text=qwen3_text(moe, text_layers), image_token_id=3)


def internvl_qwen3_config(moe: bool) -> MLLMConfig:
    base = tiny_internvl_config()
    return MLLMConfig.from_dict({**vars(base), "text": qwen3_text(moe)})


@pytest.fixture(scope="module", params=sorted(TEXTS))
def llava_pair(request, tmp_path_factory):
    return exported_pair(llava_qwen3_config(TEXTS[request.param]), LlavaForConditionalGeneration,
                         tmp_path_factory.mktemp(request.param) / "export")


@pytest.fixture(scope="module", params=sorted(TEXTS))
def internvl_pair(request, tmp_path_factory):
    return exported_pair(internvl_qwen3_config(TEXTS[request.param]), InternVLForConditionalGeneration,
                         tmp_path_factory.mktemp(request.param) / "export")


def test_llava_logits_loss_and_aux_loss_match_hf(llava_pair):
    ours, hf = llava_pair
    ids, mask, pixels = image_batch(ours.config, batch=3, pad_left=[0, 2, 4])
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    moe = ours.text_config.model_type == "qwen3_moe"
    routers = [layer.mlp.gate for layer in hf.model.language_model.layers] if moe else []
    seen = []
    hooks = [r.register_forward_hook(lambda m, args, out: seen.append(out[0])) for r in routers]
    with torch.no_grad():
        got = ours(ids, mask, pixels, logits="all")
        loss = ours(ids, mask, pixels, labels=labels).loss
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        for hook in hooks:
            hook.remove()
        want_loss = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    valid = mask.bool()
    assert (got.logits - want.logits)[valid].abs().max().item() <= 1e-5
    assert abs(loss.item() - want_loss.item()) <= 1e-5
    if moe:  # the load-balancing loss over every valid token of every layer, as transformers computes it
        t = ours.text_config
        want_aux = load_balancing_loss_func(tuple(seen), t.num_experts, t.num_experts_per_tok, mask)
        assert abs(got.moe_aux_loss.item() - want_aux.item()) <= 1e-6
    else:
        assert got.moe_aux_loss is None


def test_llava_greedy_generation_matches_hf(llava_pair):
    ours, hf = llava_pair
    ids, mask, pixels = image_batch(ours.config, batch=2, pad_left=[0, 3], seed=1)
    assert_greedy_matches_hf(ours, hf, ids, mask, pixels, {"pixel_values": pixels})


def test_internvl_logits_and_generation_match_hf(internvl_pair):
    """InternVL3.5's layout: InternViT tiles, pixel shuffle, a Qwen3 (or Qwen3-MoE) LLM."""
    ours, hf = internvl_pair
    config = ours.config
    ids, mask, pixels, sizes = next_batch(config, images=internvl_images, pad_left=[0, 2, 3])
    n_tiles = [config.model_family.tiles_per_image(config, s) for s in sizes.tolist()]
    flat = torch.cat([p[:n] for p, n in zip(pixels, n_tiles)])
    with torch.no_grad():
        got = ours(ids, mask, pixels, image_sizes=sizes).logits
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=flat, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    valid = mask.bool()
    assert (got - want)[valid].abs().max().item() <= 1e-5
    assert_greedy_matches_hf(ours, hf, ids, mask, pixels, {"pixel_values": flat}, image_sizes=sizes)


@pytest.mark.parametrize("arch", ["vtw", "shortv", "fastv"])
def test_aux_loss_counts_only_the_tokens_each_layer_processed(arch):
    """Withdrawn, frozen and pruned visual tokens never reach a layer's experts, so they are not in
    that layer's load-balancing statistics: our physical forward's loss equals the masked reference's
    over exactly the valid, present, updated tokens, and differs from the dense one."""
    from models.moe import load_balancing_loss
    from tests.test_plans import plan_model

    config = llava_qwen3_config(moe=True, text_layers=8)
    model = plan_model(arch, {}, config=config)
    ids, mask, pixels = image_batch(config, batch=3, pad_left=[0, 2, 5], suffix=7)
    routed = []
    with torch.no_grad():
        got = model(ids, mask, pixels, logits="none").moe_aux_loss
        reference_logits(model, ids, mask, pixels, router=routed)
        model.set_plan(Plan.dense(8))
        dense = model(ids, mask, pixels, logits="none").moe_aux_loss
    want = load_balancing_loss(routed, config.hf_text_config().num_experts, config.hf_text_config().num_experts_per_tok)
    assert abs(got.item() - want.item()) <= 1e-6
    assert abs(got.item() - dense.item()) > 1e-6
    with torch.no_grad():  # each expert's share of the assignments (the eff/expert_load_max metric)
        load = model(ids, mask, pixels, logits="none").expert_load
    assert load.shape == (4,) and abs(load.sum().item() - 1) < 1e-6


def test_yopo_ffn_fraction_is_refused_on_moe_layers():
    from tests.test_plans import plan_model

    with pytest.raises(ValueError, match="mixture-of-experts FFN"):
        plan_model("yopo", {}, config=llava_qwen3_config(moe=True, text_layers=8))


def test_moe_training_step_adds_the_weighted_aux_loss():
    """The objective training backpropagates is the token cross-entropy plus router_aux_loss_coef times
    the load-balancing loss, so the router weights get a gradient from the balancing term too."""
    config = llava_qwen3_config(moe=True)
    torch.manual_seed(0)
    from models import MLLM

    model = MLLM.from_config(config).train()
    ids, mask, pixels = image_batch(config, batch=2)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    out = model(ids, mask, pixels, labels=labels)
    assert out.moe_aux_loss is not None and out.moe_aux_loss.requires_grad
    gate = model.language_model.layers[0].mlp.gate.weight
    (grad,) = torch.autograd.grad(out.moe_aux_loss, gate)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["dense", "fastv", "vica", "shortv"])
def test_moe_flops_count_active_parameters_equal_flop_counter(arch):
    """FLOPs of an MoE layer are its active parameters' (the router over every expert, then the
    top-k experts), equal to FlopCounterMode on the physical forward under each plan."""
    from models.flops import Shape, plan_terms
    from tests.test_flops import measured_decoder_flops
    from tests.test_plans import plan_model

    model = plan_model(arch, {}, config=llava_qwen3_config(moe=True, text_layers=8))
    measured, n_t, _, counts = measured_decoder_flops(model)
    shape = Shape.from_hf(model.text_config)
    assert shape.moe is not None and all(shape.moe.layers)
    terms, _ = plan_terms(shape, model.plan, model.config.num_image_tokens, n_t, counts=counts)
    assert abs(sum(terms.values()) - measured) / measured < 0.02, (sum(terms.values()), measured)
