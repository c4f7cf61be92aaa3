"""Every plan preset: the physical forward equals the slow masked reference (fp32, <= 1e-5),
including batch > 1 with padding and greedy decoding with the plan-aware KV cache."""

from pathlib import Path

import pytest
import torch
import yaml

from models import MLLM
from models.config import ConfigError
from models.generation import greedy_generate
from models.methods import resolve_arch
from tests.helpers import image_batch, tiny_config
from tests.reference import reference_generate, reference_logits

CONF = Path(__file__).resolve().parents[1] / "conf" / "arch"
PRESETS = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "file")  # file: a pointer, tested separately
VARIANTS = [(name, {}) for name in PRESETS] + [
    ("yopo", {"semantics": "post_softmax_zero"}),
    ("visipruner", {"semantics": "post_softmax_zero"}),
    ("pdrop", {"ratio": 0.3}),
    ("pdrop", {"positions": "keep"}),  # survivors keep their positions (PDrop renumbers them, its released code)
    ("random", {"K": 16, "seed": 7}),  # selections that read no attention, in the middle of the LLM
    ("uniform", {"K": 8, "keep": 0.25}),
    ("pool", {"kernel": 3}),  # 8 x 8 grid: partial windows at the edges
]


def plan_model(name: str, knobs: dict, layers: int = 8, seed: int = 0, config=None) -> MLLM:
    """An 8-layer CLIP/Llama model (8x8 patch grid; or `config`'s model) with the preset's plan, xattn gates
    opened and routers drawn at random (zero-initialised ones would tie every score and gate at 1)."""
    config = config or tiny_config(text_layers=layers, image_size=32)
    arch = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    if knobs:
        (method,) = arch["methods"]
        arch["methods"][method].update(knobs)
    text = config.hf_text_config()
    plan = resolve_arch(arch, text.num_hidden_layers, text.num_attention_heads, config.family, getattr(text, "layer_types", None))
    torch.manual_seed(seed)
    model = MLLM.from_config(config, plan).eval()
    for block in model.xattn.values():  # zero gates would make the blocks trivially equal
        torch.nn.init.normal_(block.attn_gate, std=1.0)
        torch.nn.init.normal_(block.mlp_gate, std=1.0)
    for router in model.routers.values():
        torch.nn.init.normal_(router.weight, std=0.1)
        torch.nn.init.normal_(router.bias, std=0.1)
    return model


def ids(v):
    name, knobs = v
    return name + "".join(f"-{k}={x}" for k, x in knobs.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_prefill_matches_masked_reference(variant):
    model = plan_model(*variant)
    input_ids, mask, pixels = image_batch(model.config, batch=3, pad_left=[0, 2, 5], suffix=7)
    with torch.no_grad():
        got = model(input_ids, mask, pixels, logits="all").logits
    want = reference_logits(model, input_ids, mask, pixels)
    text = mask.bool() & (input_ids != model.config.image_token_id)
    assert torch.isfinite(got[text]).all()
    assert (got - want)[text].abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_decode_matches_masked_reference(variant):
    model = plan_model(*variant, seed=1)
    input_ids, mask, pixels = image_batch(model.config, batch=2, pad_left=[0, 3], suffix=5, seed=2)
    got = greedy_generate(model, input_ids, mask, pixels, max_new_tokens=4, eos_token_id=[-1])
    want = reference_generate(model, input_ids, mask, pixels, max_new_tokens=4)
    assert torch.equal(got, want)


RENUMBERED = {"methods": {"rules": [  # hand-written: renumbering after a previous-layer and a random selection
    {"layers": [3], "set": {"select": {"scorer": "attn_last", "source": "previous", "keep": 0.5, "positions": "renumber"}}},
    {"layers": [5], "set": {"select": {"scorer": "random", "keep": 0.5, "positions": "renumber"}}},
]}}


def test_renumbering_selections_match_the_masked_reference():
    config = tiny_config(text_layers=8, image_size=32)
    torch.manual_seed(0)
    model = MLLM.from_config(config, resolve_arch(RENUMBERED, 8, config.hf_text_config().num_attention_heads)).eval()
    input_ids, mask, pixels = image_batch(model.config, batch=3, pad_left=[0, 2, 5], suffix=7)
    with torch.no_grad():
        got = model(input_ids, mask, pixels, logits="all").logits
    text = mask.bool() & (input_ids != model.config.image_token_id)
    assert (got - reference_logits(model, input_ids, mask, pixels))[text].abs().max().item() <= 1e-5
    gen = greedy_generate(model, input_ids, mask, pixels, max_new_tokens=4, eos_token_id=[-1])
    assert torch.equal(gen, reference_generate(model, input_ids, mask, pixels, max_new_tokens=4))


def test_pdrop_renumbers_positions_and_decoding_continues_from_the_kept_length():
    """PyramidDrop's released code: after a stage, the survivors' positions are their ranks, and a
    generated token sits right after the kept prompt (the state counts per layer what was removed)."""
    model = plan_model("pdrop", {})
    input_ids, mask, pixels = image_batch(model.config, batch=2, pad_left=[0, 3])
    out = model(input_ids, mask, pixels, logits="last", use_cache=True)
    stages = [i for i, p in enumerate(model.plan.layers) if p.select is not None]
    shift = out.cache.rope_shift
    n_v = model.config.num_image_tokens
    removed = 0
    kept = n_v
    for i in range(len(model.plan.layers)):
        if i in stages:
            kept = model.plan.layers[i].select.budget(kept)
            removed = n_v - kept
        assert shift[i].tolist() == [removed, removed]
    assert plan_model("pdrop", {"positions": "keep"})(input_ids, mask, pixels, use_cache=True, logits="last").cache.rope_shift is None


def test_training_with_a_plan_gets_gradients_where_it_should():
    model = plan_model("vica", {})
    model.train()
    input_ids, mask, pixels = image_batch(model.config, batch=2)
    labels = input_ids.clone()
    labels[:, : 3 + model.config.num_image_tokens + 1] = -100
    model(input_ids, mask, pixels, labels=labels).loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0  # through the T2V layers' K/V
    assert model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_xattn_blocks_start_as_identity_and_learn():
    dense = plan_model("dense", {})
    x = MLLM.from_config(dense.config, plan_model("xattn", {}).plan).eval()
    x.load_state_dict(dense.state_dict(), strict=False)  # same LLM weights, fresh zero-gated blocks
    input_ids, mask, pixels = image_batch(x.config, batch=2)
    text_only = x.plan  # every self-attention layer is text-only: with closed gates the image is invisible
    with torch.no_grad():
        a = x(input_ids, mask, pixels, logits="last").logits
        b = x(input_ids, mask, torch.zeros_like(pixels), logits="last").logits
    assert torch.equal(a, b)
    labels = input_ids.clone()
    labels[:, : 3 + x.config.num_image_tokens + 1] = -100
    x.train()
    x(input_ids, mask, pixels, labels=labels).loss.backward()
    assert all(block.attn_gate.grad.abs().item() > 0 for block in x.xattn.values())
    assert text_only.name == "xattn"


def test_physical_savings_tokens_leave_the_streams():
    """Token-set changes shrink the visual stream itself (not a mask)."""
    model = plan_model("fastv", {"R": 0.75})
    input_ids, mask, pixels = image_batch(model.config, batch=2)
    out = model(input_ids, mask, pixels, logits="last", use_cache=True)
    n_v = model.config.num_image_tokens
    sizes = [int(k.is_visual[0].sum()) for k in out.cache.keys]
    k = model.plan.layers.index(next(p for p in model.plan.layers if p.select))
    assert sizes[:k] == [n_v] * k and all(s == n_v // 4 for s in sizes[k:])
    vica = plan_model("vica", {})
    out = vica(input_ids, mask, pixels, logits="last", use_cache=True)
    t2v = [i for i, p in enumerate(vica.plan.layers) if p.text_reads]
    assert [i for i, k in enumerate(out.cache.keys) if k.is_visual.any()] == t2v  # visual KV only where read


@pytest.mark.parametrize(
    "arch, message",
    [
        ({"methods": {"vtw": {"K": 40}}}, "out of range"),
        ({"methods": {"rules": [{"layers": [9], "set": {"visual_update": "frozen"}}]}}, "out of range"),
        ({"methods": {"rules": [{"layers": [2], "set": {"visual_update": "frozen", "visual_self_attn": "local", "window": 3}}]}}, "layer 2: visual_self_attn=local has no effect"),
        ({"methods": {"rules": [{"layers": [3], "set": {"visual_self_attn": "local", "window": 4}}]}}, "layer 3: visual_self_attn=local needs an odd window"),
        ({"methods": {"vtw": {"K": 12}, "fastv": {"K": 24}}}, "layer 6: select has no visual tokens left"),
        ({"methods": {"rules": [{"layers": [1], "set": {"visual_heads": [7]}}]}}, "layer 1: visual_heads"),
        ({"methods": {"rules": [{"layers": [1], "set": {"visual_updat": "frozen"}}]}}, "did you mean 'visual_update'"),
        ({"methods": {"fastv": {"R": 0.5, "KK": 2}}}, "did you mean 'K'"),
        ({"methods": {"fastvv": {}}}, "did you mean 'fastv'"),
        ({"methods": {"rules": [{"layers": [0], "set": {"select": {"keep": 0.5}}}]}}, "layer 0: select.source=previous"),
        ({"methods": {"fastv": {"K": 8}, "uniform": {"K": 16}}}, "layer 4: select.scorer=uniform spreads tokens over the full patch grid"),
        ({"methods": {"pool": {}, "uniform": {}}}, "layer 0: select.scorer=uniform spreads tokens over the full patch grid"),
        ({"methods": {"rules": [{"layers": [2], "set": {"select": {"scorer": "random", "source": "current", "keep": 0.5}}}]}},
         "select.scorer=random reads no attention"),
        ({"methods": {"rules": [{"layers": [2], "set": {"select": {"scorer": "uniform", "threshold": 0.1}}}]}}, "needs keep"),
        ({"methods": {"rules": [{"layers": [2], "set": {"select": {"keep": 0.5, "seed": 3}}}]}}, "select.seed=3 only seeds scorer=random"),
        ({"methods": {"random": {"seed": -1}}}, "select.seed must be an integer"),
        ({"methods": {"pool": {}}, "pre_llm": {"method": "cls_knee"}}, "arch.pre_llm and arch.methods.pool each set the step before the LLM"),
        ({"methods": {"pool": {"kernel": 0}}}, "arch.methods.pool: pre_llm.kernel must be an integer >= 1"),
        ({"methods": {"dominant": {"keep": 1.5}}}, "arch.methods.dominant: pre_llm.keep must be in"),
    ],
)
def test_invalid_plans_fail_at_config_time_naming_layer_and_field(arch, message):
    with pytest.raises(ConfigError, match=message):
        resolve_arch(arch, num_layers=8, num_heads=4)


def test_presets_scale_to_other_depths():
    vica = yaml.safe_load((CONF / "vica.yaml").read_text())
    assert [i for i, p in enumerate(resolve_arch(vica, 32, 32).layers) if p.text_reads] == [0, 1, 7, 8, 9, 10, 11, 14]
    assert [i for i, p in enumerate(resolve_arch(vica, 8, 4).layers) if p.text_reads] == [0, 1, 2, 3]
    shortv = yaml.safe_load((CONF / "shortv.yaml").read_text())
    assert sum(not p.updates_visual for p in resolve_arch(shortv, 32, 32).layers) == 19
    assert sum(not p.updates_visual for p in resolve_arch(shortv, 16, 4).layers) == 10  # same ~59% of layers
    combo = resolve_arch({"methods": {"vica": {}, "pdrop": {}}}, 32, 32)
    for depth in range(4, 13):  # stage boundaries that coincide after scaling are separated, never merged
        stages = resolve_arch({"methods": {"visipruner": {}}}, depth, 4).layers
        sink, select, drop = (next(i for i, p in enumerate(stages) if test(p)) for test in (
            lambda p: p.text_reads_visual == "sink", lambda p: p.select is not None, lambda p: p.drop_visual))
        assert sink == 0 < select < drop < depth
    with pytest.raises(ConfigError, match="visipruner needs at least 4 layers"):
        resolve_arch({"methods": {"visipruner": {}}}, 3, 4)
    assert combo.name == "vica+pdrop" and sum(p.select is not None for p in combo.layers) == 3


@pytest.mark.parametrize("name", ["vica", "xattn", "yopo", "pdrop", "shortv"])
def test_plans_train(name):
    """`python -m train arch=<name>` trains with the plan active: every trainable parameter the plan
    uses gets a gradient, and a few steps on a fixed batch reduce the loss."""
    model = plan_model(name, {})
    model.train()
    input_ids, mask, pixels = image_batch(model.config, batch=2)
    labels = input_ids.clone()
    labels[:, : 3 + model.config.num_image_tokens + 1] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids, mask, pixels, labels=labels).loss
        loss.backward()
        if not losses:
            assert model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0
            for block in model.xattn.values():
                assert block.attn_gate.grad is not None and block.q_proj.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
