"""Qwen3.5 / Qwen3.6 (families `qwen3_5`, `qwen3_5_moe`): our forward equals transformers'
`Qwen3_5ForConditionalGeneration` / `Qwen3_5MoeForConditionalGeneration` on the same weights (fp32) on a
left-padded batch of a row with one image, a text-only row and a row with two images (three grids of
different sizes): logits, loss and the MoE load-balancing loss (the shared expert included); greedy
generation with our cache (conv and recurrent states for the linear-attention layers, K/V for the
full-attention ones) equals `generate`; padding at either end of a row never reaches the recurrence;
directories transformers writes load (the releases' `mtp.*` head dropped), ours load into transformers;
a hybrid LLM refuses what its linear layers cannot do when the plan is set; video (Qwen3-VL's layout) equals
transformers' too. (Preprocessing is Qwen3-VL's unchanged: tests/test_lmms_qwen.py checks our export's pixels
against transformers' image processor.)"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

from models import MLLM
from models.generation import greedy_generate
from models.layer_kinds import FULL, LINEAR
from tests.helpers import (MIXED_ROWS as MIXED, assert_forward_matches_hf, assert_greedy_matches_hf, assert_hf_directories_round_trip,
                           assert_positions_match_get_rope_index, exported_pair, left_padded, qwen_batch, tiny_qwen3_5_config)

HF_CLASSES = {"qwen3_5": Qwen3_5ForConditionalGeneration, "qwen3_5_moe": Qwen3_5MoeForConditionalGeneration}


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def pair(request, tmp_path_factory):
    """Our model and HF's (8 layers: linear, linear, linear, full, twice), loaded from our export."""
    config = tiny_qwen3_5_config(moe=request.param == "qwen3_5_moe", text_layers=8)
    return exported_pair(config, HF_CLASSES[request.param], tmp_path_factory.mktemp(request.param) / "export")


def test_layer_kinds_are_transformers_layer_types(pair):
    ours, hf = pair
    assert ours.layer_kinds == tuple(hf.config.text_config.layer_types) == (LINEAR, LINEAR, LINEAR, FULL) * 2


def test_positions_equal_get_rope_index(pair):
    assert_positions_match_get_rope_index(*pair)


def test_logits_loss_and_aux_loss_match_hf(pair):
    """The MoE variant's loss includes the shared expert and its gate in every layer."""
    ours, hf = pair
    assert_forward_matches_hf(ours, hf, load_balancing_loss_func if ours.family.name == "qwen3_5_moe" else None)


def test_greedy_generation_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels, grids, types = qwen_batch(ours.config, seed=1, **MIXED)
    assert_greedy_matches_hf(ours, hf, ids, mask, pixels, {"pixel_values": pixels, "image_grid_thw": grids, "mm_token_type_ids": types},
                             image_sizes=grids)


def test_padding_never_reaches_the_recurrence(pair):
    """Each row generates the same tokens alone, left padded and right padded: padding before a row enters
    no conv window and no state, padding after it never decays the state the decode cache keeps."""
    ours, _ = pair
    ids, mask, pixels, grids, _ = qwen_batch(ours.config, images_per_row=[1, 0, 1], seed=2)
    rows = [ids[i][mask[i].bool()] for i in range(3)]
    counts = grids.prod(-1) // 4
    alone = []
    for i, row in enumerate(rows):
        own = {0: 0, 2: 1}.get(i)
        pix = None if own is None else pixels[int(grids[:own].prod(-1).sum()) : int(grids[: own + 1].prod(-1).sum())]
        alone.append(greedy_generate(ours, row[None], torch.ones_like(row)[None], pix, 5, [-1],
                                     image_sizes=None if own is None else grids[own : own + 1])[0])
    left_ids, left_mask = left_padded(rows, [4, 0, 2])
    right_ids = torch.zeros_like(left_ids)
    right_mask = torch.zeros_like(left_mask)
    for i, row in enumerate(rows):
        right_ids[i, : len(row)], right_mask[i, : len(row)] = row, 1
    for batch_ids, batch_mask in ((left_ids, left_mask), (right_ids, right_mask)):
        got = greedy_generate(ours, batch_ids, batch_mask, pixels, 5, [-1], image_sizes=grids)
        assert all(torch.equal(got[i], alone[i]) for i in range(3)), (got, alone)
    assert int(counts.sum()) == int((ids == ours.config.image_token_id).sum())


def test_directories_transformers_writes_load_and_ours_round_trip(pair, tmp_path):
    """transformers' own directory loads and equals our model, our re-export loads again; a multi-token-prediction
    tensor as the releases carry (`mtp.*`) is left out on load, by transformers and by us."""
    from safetensors.torch import load_file, save_file

    ours, hf = pair
    ids, mask, pixels, grids, _ = qwen_batch(ours.config, pad_left=[0, 2, 1])
    assert_hf_directories_round_trip(ours, hf, tmp_path, (ids, mask, pixels, grids))
    (weights,) = (tmp_path / "hf").glob("*.safetensors")
    save_file({**load_file(weights), "mtp.fc.weight": torch.zeros(2, 2)}, weights, metadata={"format": "pt"})
    with torch.no_grad():
        want = ours(ids, mask, pixels, logits="last", image_sizes=grids).logits
        assert torch.equal(MLLM.from_pretrained(tmp_path / "hf").eval()(ids, mask, pixels, logits="last", image_sizes=grids).logits, want)
    HF_CLASSES[ours.family.name].from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("rule, message", [
    ({"layers": [1], "set": {"visual_self_attn": "local", "window": 3}}, "layer 1 is a linear-attention .* no window"),
    ({"layers": [0], "set": {"text_reads_visual": "sink"}}, "layer 0 is a linear-attention .* no attention distribution"),
    ({"layers": [1], "set": {"visual_heads": [0]}}, "layer 1 is a linear-attention .* one conv"),
    ({"layers": [2], "set": {"text_reads_visual": "none"}}, "layer 2 is a linear-attention .* second recurrence"),
    ({"layers": [2], "set": {"visual_kv_source": "embed"}}, "layer 2 is a linear-attention .* visual_update=frozen"),
    ({"layers": [3], "set": {"select": {"scorer": "attn_last", "keep": 0.5}}}, "layer 2's attention, but layer 2 is a linear"),
    ({"layers": [2], "set": {"select": {"scorer": "attn_last", "source": "current", "keep": 0.5, "positions": "keep"}}},
     "layer 2's attention, but layer 2 is a linear"),
])
def test_plans_a_linear_layer_cannot_run_are_refused_when_set(rule, message):
    """What each kind cannot do fails in `set_plan`, naming the layer and its kind (hand-written plans are
    not moved: `resolve_arch` moves only the presets' attention-scored selections)."""
    from models.plan import plan_from_rules

    model = MLLM.from_config(tiny_qwen3_5_config())
    with pytest.raises(ValueError, match=message):
        model.set_plan(plan_from_rules({"name": "hand", "rules": {"r": rule}}, 4, 4))


def test_a_decode_step_makes_no_host_sync_and_continues_the_recurrent_state_in_place(pair):
    """The fixed-shape step (models/decoding.py) through linear layers too: what a compiled step or a CUDA
    graph needs (tests/test_decoding.py compiles it on both families)."""
    from models.decoding import reserve
    from models.dispatch_count import count_dispatch
    from models.linear_attention import RecurrentState

    ours, _ = pair
    ids, mask, pixels, grids, _ = qwen_batch(ours.config, seed=1, **MIXED)
    with torch.no_grad():
        out = ours(ids, mask, pixels, logits="last", use_cache=True, image_sizes=grids)
        reserve(ours, out.cache, 2)
        states = [c for c in out.cache.keys if isinstance(c, RecurrentState)]
        before = [(c.conv.data_ptr(), c.state.clone()) for c in states]
        with count_dispatch() as census:
            ours.decode_step(out.logits.argmax(-1), out.cache)
    assert census.n_syncs == 0, census.describe()
    assert len(states) == 6 and all(c.conv.data_ptr() == ptr and not torch.equal(c.state, old) for c, (ptr, old) in zip(states, before))


def test_video_logits_and_generation_match_hf(tmp_path):
    """Qwen3-VL's video layout (each temporal step after its timestamp, between its own vision start / end),
    which Qwen3.5 inherits: logits and greedy generation equal transformers' on a left-padded batch of a video
    with an image and a video alone (tests/test_qwen3_video.py's rows)."""
    from tests.test_qwen3_video import CASES, rows_and_inputs

    ours, hf = exported_pair(tiny_qwen3_5_config(text_layers=8), Qwen3_5ForConditionalGeneration, tmp_path / "export")
    ids, mask, hf_in = rows_and_inputs(ours.config, *CASES["batch-of-two"])
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **hf_in).logits
        got = ours(ids, mask, **hf_in).logits
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5
    items = ours.family.visual_items(ours.config, ids, mask, hf_in["pixel_values"], hf_in["image_grid_thw"],
                                     (hf_in["pixel_values_videos"], hf_in["video_grid_thw"], None))
    assert_greedy_matches_hf(ours, hf, ids, mask, items.pixel_values, hf_in, image_sizes=items.sizes, step_seconds=items.step_seconds)


def test_attention_statistics_are_refused_on_a_hybrid_llm():
    """`python -m train analyze yopo|visipruner` reads every layer's attention: a linear layer has none."""
    from models.calibration import calibrate

    with pytest.raises(ValueError, match=r"layers \[0, 1, 2\] of this model are linear-attention layers"):
        calibrate(MLLM.from_config(tiny_qwen3_5_config()), [], {}, attention=True, progress=False)
