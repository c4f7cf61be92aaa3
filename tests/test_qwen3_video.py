"""Video in Qwen3-VL: a video's temporal steps written apart, each after its timestamp text and between
its own vision start / end (Qwen3VLProcessor's layout), each step placed like an image; our forward equals
transformers' (fp32, <= 1e-5; DeepStack features of the video tokens included) on a video row, an image then
a video, and a left-padded batch of two; positions equal `get_rope_index`; greedy generation equals
`generate`. The data path writes a video sample as transformers' Qwen3VLProcessor writes its placeholder
(timestamps from the stored frame indices and source fps)."""

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


def test_the_data_path_writes_transformers_qwen3_video_placeholder():
    """A video sample from a shard (frames 3, 6, ..., 15 of a 30 fps source) expands to exactly the ids of
    transformers' `Qwen3VLProcessor.replace_video_token` string for it (each step's mean frame time)."""
    import json
    from types import SimpleNamespace

    import numpy as np
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    from data.chat import ChatTokenizer
    from data.datamodule import SampleEncoder
    from data.frames import FRAMES_MEMBER, encode_frames, timing
    from data.synthetic_video import all_texts
    from data.tokenizer import train_bpe
    from train.builders import image_spec, video_token_id

    config = tiny_qwen3_vl_config()
    tok = train_bpe(all_texts() + ["<0.1 seconds>"], 300, ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"))
    chat = ChatTokenizer(tok, "chatml", None, 512, "", ("<|vision_start|>", "<|vision_end|>"), config.image_token_id,
                         video_token_id(config), config.model_family.frame_timestamps)
    frames = qwen_frames()[1]  # 5 frames of 24 x 40: 3 steps
    indices = [3, 6, 9, 12, 15]
    record = {"video": "clip.mp4", "frames": timing(60, 30.0, indices),
              "conversations": [{"from": "human", "value": "<image>\nhow many times does the light flash ?"},
                                {"from": "gpt", "value": "two"}]}
    sample = SampleEncoder(chat, image_spec(config))({"json": json.dumps(record).encode(), FRAMES_MEMBER: encode_frames(frames)})
    (size,) = sample["image_sizes"]
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2), video_token="<|video_pad|>",
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                           _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a))
    text = Qwen3VLProcessor.replace_video_token(fake, {"video_grid_thw": [torch.tensor(size)],
                                                        "video_metadata": [VideoMetadata(total_num_frames=60, fps=30.0,
                                                                                         frames_indices=np.array(indices))]}, 0)
    want = tok(text, add_special_tokens=False)["input_ids"]
    ids = sample["input_ids"]
    first = ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))
    lead = len(tok(text[: text.index("<|vision_start|>")], add_special_tokens=False)["input_ids"])  # the first timestamp
    assert text.startswith("<0.2 seconds>") and "<0.3 seconds>" in text  # steps of frames (3, 6), (9, 12), (15, 15)
    assert ids[first - lead : first - lead + len(want)] == want
