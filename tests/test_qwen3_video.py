"""Video in Qwen3-VL: a video's temporal steps written apart, each after its timestamp text and between
its own vision start / end (Qwen3VLProcessor's layout), each step placed like an image; our forward equals
transformers' (fp32, <= 1e-5; DeepStack features of the video tokens included) on a video row, an image then
a video, and a left-padded batch of two; positions equal `get_rope_index`; greedy generation equals
`generate`. The data path refuses Qwen3-VL video samples (it does not write the timestamps yet)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from models.families.qwen2_vl import FrameResize
from tests.helpers import QWEN_TOKENS, assert_greedy_matches_hf, exported_pair, left_padded, qwen_frames, qwen_images, tiny_qwen3_vl_config


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return exported_pair(tiny_qwen3_vl_config(), Qwen3VLForConditionalGeneration, tmp_path_factory.mktemp("qwen3_vl") / "export")


def rows_and_inputs(config, rows, pad_left=None):
    """Rows of "image k" / "video k" items; a video written step by step, each step after two timestamp
    tokens (any text: here ids 20, 21 + step) as Qwen3VLProcessor writes "<1.0 seconds>"."""
    images = [config.model_family.image_processor(config)(im) for im in qwen_images()]
    videos = [FrameResize(config)(frames, fps) for frames, fps in zip(qwen_frames(), (2.0, 1.0, 4.0))]
    start, end, video_pad = QWEN_TOKENS["vision_start_token_id"], QWEN_TOKENS["vision_end_token_id"], QWEN_TOKENS["video_token_id"]
    ids, used = [], {"image": [], "video": []}
    for row in rows:
        out = [11, 12]
        for name in row:
            kind, k = name.split()
            item = (images if kind == "image" else videos)[int(k)]
            used[kind].append(item)
            if kind == "image":
                out += [start, *[config.image_token_id] * config.tokens_per_image(item.size), end, 13]
            else:
                t, h, w = item.size
                for step in range(t):
                    out += [20, 21 + step, start, *[video_pad] * (h * w // 4), end]
                out.append(13)
        ids.append(torch.tensor(out))
    ids, mask = left_padded(ids, pad_left)
    hf = {"mm_token_type_ids": ((ids == config.image_token_id).long() + 2 * (ids == video_pad).long()) * mask}
    if used["image"]:
        hf |= {"pixel_values": torch.cat([i.pixels for i in used["image"]]), "image_grid_thw": torch.tensor([i.size for i in used["image"]])}
    if used["video"]:
        hf |= {"pixel_values_videos": torch.cat([v.pixels for v in used["video"]]),
               "video_grid_thw": torch.tensor([v.size for v in used["video"]])}
    return ids, mask, hf


CASES = {"video": ([["video 0"]], None), "image-then-video": ([["image 0", "video 1"]], None),
         "batch-of-two": ([["video 1", "image 2"], ["video 0"]], [0, 3])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_positions_match_hf(pair, case):
    ours, hf = pair
    rows, pad_left = CASES[case]
    ids, mask, hf_in = rows_and_inputs(ours.config, rows, pad_left)
    want_pos, deltas = hf.model.get_rope_index(ids, hf_in["mm_token_type_ids"], hf_in.get("image_grid_thw"), hf_in["video_grid_thw"],
                                               attention_mask=mask)
    items = ours.family.visual_items(ours.config, ids, mask, hf_in.get("pixel_values"), hf_in.get("image_grid_thw"),
                                     (hf_in["pixel_values_videos"], hf_in["video_grid_thw"], None))
    got_pos = ours.prompt_positions(ids, mask, items.sizes, step_seconds=items.step_seconds)
    assert torch.equal(got_pos * mask, want_pos * mask)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **hf_in).logits
        got = ours(ids, mask, **hf_in).logits
    valid = mask.bool()
    assert (got - want)[valid].abs().max().item() <= 1e-5


def test_greedy_generation_matches_hf(pair):
    ours, hf = pair
    ids, mask, hf_in = rows_and_inputs(ours.config, *CASES["batch-of-two"])
    items = ours.family.visual_items(ours.config, ids, mask, hf_in["pixel_values"], hf_in["image_grid_thw"],
                                     (hf_in["pixel_values_videos"], hf_in["video_grid_thw"], None))
    assert_greedy_matches_hf(ours, hf, ids, mask, items.pixel_values, hf_in, image_sizes=items.sizes, step_seconds=items.step_seconds)


def test_the_data_path_refuses_qwen3_video_samples():
    from train.builders import image_spec

    assert image_spec(tiny_qwen3_vl_config()).video is None  # SampleEncoder then skips them: video_not_supported
