"""Video in Qwen2-VL and Qwen2.5-VL: our forward equals transformers' on rows with a video, an image
then a video, and a left-padded batch of two (fp32, <= 1e-5, under `mrope_rule=hf`); M-RoPE positions
and rope deltas equal `get_rope_index` in `hf` mode and Qwen's original rule (tests/qwen_original_rope.py)
in `qwen` mode for every case of docs/video.md's list; greedy generation equals `generate`; our
frame preprocessing has transformers' patch layout; every visual token knows its (video, time
step, row, column)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from models import MLLM
from models.mllm import next_positions
from models.streams import Place
from tests.helpers import assert_greedy_matches_hf, exported_pair, left_padded, qwen_frames, qwen_visual_batch, tiny_qwen_config
from tests.qwen_original_rope import original_rope_index

HF_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
ROWS = {
    "video": [["video 0"]],
    "image-then-video": [["image 0", "video 1"]],
    "batch-of-two": [["video 1", "image 2"], ["video 0"]],
}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request, tmp_path_factory):
    """Our model under transformers' rule and HF's, loaded from our export."""
    config = tiny_qwen_config(request.param, mrope_rule="hf")
    return exported_pair(config, HF_CLASSES[request.param], tmp_path_factory.mktemp(request.param) / "export")


def hf_inputs(model, hf: dict) -> dict:
    """transformers' inputs for the family (Qwen2-VL has no second_per_grid_ts)."""
    return {k: v for k, v in hf.items() if model.config.family == "qwen2_5_vl" or k != "second_per_grid_ts"}


@pytest.mark.parametrize("case", sorted(ROWS))
def test_logits_match_hf(pair, case):
    ours, hf = pair
    pad_left = [0, 3] if case == "batch-of-two" else None
    ids, mask, hf_in, ours_in = qwen_visual_batch(ours.config, ROWS[case], pad_left=pad_left)
    hf_in = hf_inputs(ours, hf_in)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **hf_in).logits
        got = ours(ids, mask, **hf_in).logits  # transformers' names
        merged = ours(ids, mask, **ours_in).logits  # the data path's items in prompt order
    valid = mask.bool()
    assert torch.isfinite(got[valid]).all()
    assert (got - want)[valid].abs().max().item() <= 1e-5
    assert torch.equal(merged[valid], got[valid])


def test_greedy_generation_matches_hf(pair):
    ours, hf = pair
    ids, mask, hf_in, ours_in = qwen_visual_batch(ours.config, ROWS["batch-of-two"], pad_left=[2, 0], seed=1)
    pixels = ours_in.pop("pixel_values")
    assert_greedy_matches_hf(ours, hf, ids, mask, pixels, hf_inputs(ours, hf_in), **ours_in)


def rope_case(config, items: list[tuple[str, tuple[int, int, int], float]], pad_left: int = 0):
    """Ids and transformers' inputs for rows of items (kind, grid, seconds per step) between text,
    without pixels: a batch of the row alone and, left padded by `pad_left`, the row beside a shorter one."""
    start, end = config.token_ids["vision_start_token_id"], config.token_ids["vision_end_token_id"]
    pad = {"image": config.image_token_id, "video": config.token_ids["video_token_id"]}
    row = [11, 12]
    for kind, grid, _ in items:
        row += [start, *[pad[kind]] * (grid[0] * grid[1] * grid[2] // 4), end, 13, 14]
    rows = [torch.tensor(row)] + ([torch.tensor([15, 16, 17])] if pad_left else [])
    ids, mask = left_padded(rows, [pad_left, 0] if pad_left else None)
    types = ((ids == pad["image"]).long() + 2 * (ids == pad["video"]).long()) * mask
    grids = {kind: torch.tensor([g for k, g, _ in items if k == kind]) if any(k == kind for k, _, _ in items) else None for kind in pad}
    seconds = torch.tensor([s for k, _, s in items if k == "video"]) if grids["video"] is not None else None
    return ids, mask, types, grids, seconds


POSITION_CASES = {  # docs/video.md's list: order of images and videos, padding, seconds per step, a long video
    "video": [("video", (2, 8, 8), 1.0)],
    "image-then-video": [("image", (1, 6, 10), 0.0), ("video", (3, 4, 6), 1.0)],
    "video-then-image": [("video", (3, 4, 6), 1.0), ("image", (1, 6, 10), 0.0)],
    "two-videos": [("video", (2, 4, 4), 0.5), ("video", (4, 6, 4), 2.0)],
    "half-second-steps": [("video", (6, 4, 4), 0.5)],
    "24-fps-fallback": [("video", (12, 4, 4), 1 / 12)],
    "two-second-steps": [("video", (3, 6, 6), 2.0)],
    "long-video": [("video", (16, 4, 4), 1.0), ("image", (1, 4, 4), 0.0)],
}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def hf_rope(request):
    """transformers' model of each family (for `get_rope_index`) and our config under each rule."""
    torch.manual_seed(0)
    config = tiny_qwen_config(request.param, mrope_rule="hf")
    hf = HF_CLASSES[request.param](config.hf_config()).eval()
    return config, hf


def ours_positions(config, rule, ids, mask, grids, seconds):
    from dataclasses import replace

    config = replace(config, mrope_rule=rule)
    pixels = {k: torch.zeros(int(g.prod(-1).sum()), 96) if g is not None else None for k, g in grids.items()}
    items = config.model_family.visual_items(config, ids, mask, pixels["image"], grids["image"],
                                             None if grids["video"] is None else (pixels["video"], grids["video"], seconds))
    from models.streams import visual_mask

    return config.model_family.rope_positions(config, mask, visual_mask(ids, mask, config.visual_token_ids), items.sizes,
                                              items.step_seconds)


@pytest.mark.parametrize("pad_left", [0, 4], ids=["alone", "left-padded"])
@pytest.mark.parametrize("case", sorted(POSITION_CASES))
def test_positions_equal_each_rules_oracle(hf_rope, case, pad_left):
    """`hf`: transformers' get_rope_index (ids and deltas); `qwen`: the original rule's loop."""
    config, hf = hf_rope
    ids, mask, types, grids, seconds = rope_case(config, POSITION_CASES[case], pad_left)
    extra = {"second_per_grid_ts": seconds} if config.family == "qwen2_5_vl" else {}
    want, deltas = hf.model.get_rope_index(ids, types, grids["image"], grids["video"], attention_mask=mask, **extra)
    got = ours_positions(config, "hf", ids, mask, grids, seconds)
    assert torch.equal(got * mask, want * mask)
    assert torch.equal(next_positions(got, mask), mask.sum(1) + deltas.flatten())  # decoding starts at length + delta
    tps = config.hf_vision_config().tokens_per_second if config.family == "qwen2_5_vl" else None
    want, deltas = original_rope_index(ids, mask, grids["image"], grids["video"], seconds, merge=2, image_id=config.image_token_id,
                                       video_id=config.token_ids["video_token_id"], tokens_per_second=tps)
    got = ours_positions(config, "qwen", ids, mask, grids, seconds)
    assert torch.equal(got * mask, want * mask)
    assert torch.equal(next_positions(got, mask), ids.shape[1] + deltas.flatten())  # the old deltas count padding


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_the_rules_differ_exactly_when_a_videos_time_outruns_its_grid(family):
    """Text after a video gets other positions under the two rules iff the video's last time offset
    floor((T - 1) * interval) reaches max(rows, cols): the overlap of transformers' rule."""
    config = tiny_qwen_config(family)
    tps = config.hf_vision_config().tokens_per_second if family == "qwen2_5_vl" else 1
    seen = set()
    for steps in (1, 2, 3, 5, 9):
        for h, w in ((4, 4), (4, 10), (8, 6)):
            for seconds in (0.5, 1.0, 2.0):
                ids, mask, _, grids, secs = rope_case(config, [("video", (steps, h, w), seconds)])
                hf, qwen = (ours_positions(config, rule, ids, mask, grids, secs) for rule in ("hf", "qwen"))
                last = int((steps - 1) * seconds * tps) if family == "qwen2_5_vl" else steps - 1
                differ = not torch.equal(hf, qwen)
                assert differ == (last >= max(h, w) // 2), (steps, h, w, seconds)
                seen.add(differ)
    assert seen == {True, False}


def test_every_visual_token_knows_its_video_step_row_and_column(pair):
    """The visual stream's places: IMAGE numbers the row's items (images and videos together), TIME
    the step, ROW / COL the token's place on its step's grid, and these agree with the M-RoPE ids:
    (t - start, h - start, w - start) = (time offset of the step, row, column)."""
    ours, _ = pair
    ids, mask, _, items = qwen_visual_batch(ours.config, ROWS["batch-of-two"], pad_left=[0, 3])
    seen = []
    with torch.no_grad():
        ours(ids, mask, logits="last", layer_hook=lambda step: seen.append(step.vis_in) and None, **items)
    vis = seen[0]
    positions = ours.prompt_positions(ids, mask, items["image_sizes"], step_seconds=items["step_seconds"])
    from models.mllm import take_positions
    from models.streams import Layout

    layout = Layout.from_inputs(ids, mask, ours.config.visual_token_ids)
    pos = take_positions(positions, torch.gather(layout.vis_index, 1, vis.at(Place.SLOT)))
    grids = items["image_sizes"].tolist()
    k = 0
    for b in range(ids.shape[0]):
        for item in vis.image[b][vis.valid[b]].unique().tolist():
            own = vis.valid[b] & (vis.image[b] == item)
            steps, h, w = grids[k]
            place = vis.place[b][own]
            assert place[:, Place.TIME].tolist() == [s for s in range(steps) for _ in range(h * w // 4)]
            assert place[:, Place.ROW].tolist() == [i // (w // 2) for _ in range(steps) for i in range(h * w // 4)]
            assert place[:, Place.COL].tolist() == [i % (w // 2) for _ in range(steps) for i in range(h * w // 4)]
            start = pos[1, b][own][0]
            times = ours.family.step_times(ours.config, steps, items["step_seconds"][k])
            assert torch.equal(pos[0, b][own] - start, times[place[:, Place.TIME]])
            assert torch.equal(pos[1, b][own] - start, place[:, Place.ROW]) and torch.equal(pos[2, b][own] - start, place[:, Place.COL])
            k += 1
    assert k == len(grids)


def transformers_video_patchify():
    """transformers' own `Qwen2VLVideoProcessor.patchify`, read from its source file: the module needs
    torchvision to import, the method itself only torch."""
    import transformers.models.qwen2_vl as package

    path = Path(inspect.getfile(package)).parent / "video_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    namespace = {"torch": torch}
    exec(compile(ast.Module([method], []), str(path), "exec"), namespace)
    return namespace["patchify"]


def test_frame_preprocessing_has_transformers_video_patch_layout(pair):
    """On the same normalised frames (transformers' PIL pipeline for each frame, read back from its
    image rows), our video pixels are transformers' video `patchify` (an odd frame count repeats the
    last frame); a still video's steps are transformers' image rows; token counts equal the tower's."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ours, hf = pair
    config = ours.config
    processor = config.model_family.video_processor(config)
    patchify = transformers_video_patchify()
    for frames in qwen_frames():
        video = processor(frames, fps=2.0)
        image_processor = Qwen2VLImageProcessorPil(min_pixels=config.min_pixels, max_pixels=processor.max_pixels(len(frames)),
                                                   patch_size=4, image_mean=list(config.image_mean), image_std=list(config.image_std))
        rows = image_processor(images=[Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
        _, gh, gw = video.size
        # an image row is (gh/2, gw/2, 2, 2, C, T, p, p) with the frame in both T slots: back to [F, C, H, W]
        frame_pixels = rows.view(len(frames), gh // 2, gw // 2, 2, 2, 3, 2, 4, 4)[..., 0, :, :]
        frame_pixels = frame_pixels.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(len(frames), 3, gh * 4, gw * 4)
        want, t, h, w = patchify(None, frame_pixels[None], patch_size=4, merge_size=2, temporal_patch_size=2)
        assert (t, h, w) == video.size and video.step_seconds == 1.0
        assert torch.equal(video.pixels, want[0])
        still = processor(frames[:1].repeat(3, 0), fps=2.0)  # 3 equal frames: 2 steps, each the image's rows
        assert torch.equal(still.pixels.view(2, gh * gw, -1), rows[: gh * gw].expand(2, -1, -1))
        with torch.no_grad():
            features = hf.model.get_video_features(video.pixels, torch.tensor([video.size])).pooler_output[0]
        assert config.tokens_per_image(video.size) == features.shape[0]


def test_bad_video_inputs_fail_clearly(pair):
    ours, _ = pair
    ids, mask, hf_in, ours_in = qwen_visual_batch(ours.config, ROWS["image-then-video"])
    with pytest.raises(ValueError, match="mm_token_type_ids marks other tokens as image"):
        ours(ids, mask, **{**hf_inputs(ours, hf_in), "mm_token_type_ids": (hf_in["mm_token_type_ids"] > 0).long()})
    with pytest.raises(ValueError, match="placeholder tokens .* but the prompts hold another number"):
        ours(ids[:, :-20], mask[:, :-20], **{k: v for k, v in hf_inputs(ours, hf_in).items() if k != "mm_token_type_ids"})
    if ours.config.family == "qwen2_5_vl":
        with pytest.raises(ValueError, match="second_per_grid_ts"):
            ours(ids, mask, **{**hf_in, "second_per_grid_ts": None})
        with pytest.raises(ValueError, match="second_per_grid_ts"):
            ours(ids, mask, **{**ours_in, "step_seconds": None})


def test_the_rule_travels_with_the_checkpoint(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path / "x")
    assert MLLM.from_pretrained(tmp_path / "x").config.mrope_rule == "hf"
    from models.config import ConfigError

    with pytest.raises(ConfigError, match="mrope_rule"):
        tiny_qwen_config(mrope_rule="vllm")
