"""The fixed-shape decode step (models/decoding.py): no host sync, no more aten ops than transformers'
for dense, `torch.compile(fullgraph=True)` without a graph break, and greedy generation under it equal
to the eager one on every family; the KV cache's room grows when a caller decodes past it.
(Every plan's eager decoding equals the masked reference: tests/test_plans*.py.)"""

import copy

import pytest
import torch

from models import MLLM
from models.decoding import decode_step, renumbered_layers, reserve
from models.dispatch_count import count_dispatch
from models.generation import greedy_generate
from tests.helpers import (image_batch, internvl_images, next_batch, qwen_batch, tiny_config, tiny_internvl_config,
                           tiny_mobilevlm_config, tiny_next_config, tiny_qwen3_5_config, tiny_qwen3_vl_config, tiny_qwen_config)
from tests.test_plans import PRESETS, plan_model


def llava_inputs(config):
    ids, mask, pixels = image_batch(config, batch=2, pad_left=[0, 3], suffix=5, seed=2)
    return ids, mask, pixels, {}


def tiled_inputs(images=None):
    def make(config):
        ids, mask, pixels, sizes = next_batch(config, pad_left=[0, 2, 1], images=images)
        return ids, mask, pixels, {"image_sizes": sizes}
    return make


def qwen_inputs(config):
    ids, mask, pixels, grids, _ = qwen_batch(config, pad_left=[0, 2, 1])
    return ids, mask, pixels, {"image_sizes": grids}


FAMILIES = {
    "llava": (tiny_config, llava_inputs),
    "llava_next": (tiny_next_config, tiled_inputs()),
    "internvl": (tiny_internvl_config, tiled_inputs(internvl_images)),
    "mobilevlm": (tiny_mobilevlm_config, llava_inputs),
    "qwen2_vl": (lambda: tiny_qwen_config("qwen2_vl"), qwen_inputs),
    "qwen2_5_vl": (lambda: tiny_qwen_config("qwen2_5_vl"), qwen_inputs),
    "qwen3_vl": (tiny_qwen3_vl_config, qwen_inputs),
    "qwen3_vl_moe": (lambda: tiny_qwen3_vl_config(moe=True), qwen_inputs),
    "qwen3_5": (tiny_qwen3_5_config, qwen_inputs),
    "qwen3_5_moe": (lambda: tiny_qwen3_5_config(moe=True), qwen_inputs),
}


def family_model(name):
    make_config, make_inputs = FAMILIES[name]
    config = make_config()
    torch.manual_seed(0)
    return MLLM.from_config(config).eval(), make_inputs(config)


def prefilled(model, ids, mask, pixels, kw, room=4):
    with torch.no_grad():
        out = model(ids, mask, pixels, logits="last", use_cache=True, **kw)
    reserve(model, out.cache, room)
    return out.logits.argmax(-1), out.cache


@pytest.mark.parametrize("name", PRESETS)
def test_a_decode_step_makes_no_host_sync_and_launches_no_more_kernels_than_dense(name):
    dense, model = plan_model("dense", {}), plan_model(name, {})
    ids, mask, pixels, kw = llava_inputs(model.config)
    ops = []
    for m in (dense, model):
        token, state = prefilled(m, ids, mask, pixels, kw)
        with torch.no_grad(), count_dispatch() as census:
            m.decode_step(token, state)
        assert census.n_syncs == 0, census.describe()
        ops.append(census.kernels)
    if name == "xattn":  # its gated blocks are new work in every step, by design
        return
    extra = 2 * len(renumbered_layers(model.plan))  # PDrop's renumbered positions: one more cos / sin pair per stage
    assert ops[1] <= ops[0] + extra, ops


def test_dense_decode_step_launches_no_more_ops_than_transformers():
    from transformers import LlavaForConditionalGeneration

    from train.tools.bench import HFRunner

    model = MLLM.from_config(tiny_config(text_layers=4)).eval()
    ids, mask, pixels, _ = llava_inputs(model.config)
    hf = LlavaForConditionalGeneration._from_config(model.config.hf_config(), attn_implementation="sdpa").eval()
    hf.load_state_dict({k: model.state_dict()[model.family.to_internal_name(k)] for k in hf.state_dict()})
    token, state = prefilled(model, ids, mask, pixels, {})
    runner = HFRunner(hf)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        cache = getattr(out, runner.cache_arg)
        longer = torch.cat([mask, mask.new_ones(2, 1)], 1)
        with count_dispatch() as theirs:
            want = runner.step(token, cache, longer)[0]
        with count_dispatch() as ours:
            got = model.decode_step(token, state)
    assert (got - want).abs().max() < 1e-4
    assert ours.n_ops <= theirs.n_ops and ours.kernels <= theirs.kernels, (ours, theirs)


def test_room_grows_past_the_reserved_tokens():
    """A caller that never reserves (or decodes past the room) still gets the same tokens."""
    model = plan_model("fastv", {}, seed=1)
    ids, mask, pixels, _ = llava_inputs(model.config)
    want = greedy_generate(model, ids, mask, pixels, max_new_tokens=40, eos_token_id=[-1])
    with torch.no_grad():
        out = model(ids, mask, pixels, logits="last", use_cache=True)
        token, state, got = out.logits.argmax(-1), out.cache, []
        for _ in range(39):
            got.append(token)
            token = decode_step(model, token, state).argmax(-1)
    assert state.room.size == 64 and torch.equal(torch.stack(got + [token], 1), want)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_greedy_generation_equals_eager(name):
    """fullgraph=True: a graph break would raise. The aot_eager backend traces what inductor would
    compile without its C++ build (minutes on two cores); tests/test_decoding.py::test_inductor_* runs it."""
    torch._dynamo.reset()  # a fresh compilation (past the recompile limit torch would quietly run eager)
    model, (ids, mask, pixels, kw) = family_model(name)
    want = greedy_generate(model, ids, mask, pixels, max_new_tokens=5, eos_token_id=[-1], **kw)
    got = greedy_generate(model, ids, mask, pixels, max_new_tokens=5, eos_token_id=[-1], compile={"backend": "aot_eager"}, **kw)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_inductor_compiled_generation_equals_eager_under_plans():
    model = plan_model("vica", {})
    ids, mask, pixels, _ = llava_inputs(model.config)
    for plan in ("vica", "fastv"):
        model = plan_model(plan, {})
        want = greedy_generate(model, ids, mask, pixels, max_new_tokens=5, eos_token_id=[-1])
        assert torch.equal(greedy_generate(model, ids, mask, pixels, max_new_tokens=5, eos_token_id=[-1], compile=True), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine has none")
def test_cuda_graph_generation_equals_eager():
    model = plan_model("fastv", {}).cuda()
    ids, mask, pixels, _ = (t.cuda() if torch.is_tensor(t) else t for t in llava_inputs(model.config))
    want = greedy_generate(model, ids, mask, pixels, max_new_tokens=6, eos_token_id=[-1])
    for _ in range(2):  # the second generation replays the captured graph
        assert torch.equal(greedy_generate(model, ids, mask, pixels, max_new_tokens=6, eos_token_id=[-1], compile=True), want)
