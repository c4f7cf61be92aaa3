"""The synthetic temporal task (data/synthetic_video.py): its frames answer its questions, the temporal ones
only in order (the frames without their order are the same for every answer, so shuffled and single-frame
controls can only guess) and the color one in any single frame (the controls must keep it); the evaluation's video controls shuffle or freeze exactly each video's frames;
`python -m train experiment=video` trains tiny Qwen2-VL on it and reports the controls beside the score."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data import synthetic_video as sv

ROOT = Path(__file__).resolve().parents[1]
CFG = sv.VideoTaskConfig(n_train=12, n_val=12, samples_per_shard=6)


def answer_from_frames(frames: np.ndarray, skill: str) -> str:
    """Read the answer off the frames in order, as a reference."""
    if skill == "direction":
        where = [np.argwhere((f == sv.COLORS["mover"]).all(-1)).mean(0) for f in frames]  # (row, column) per frame
        dy, dx = where[-1] - where[0]
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if skill == "color":
        return next(name for name, rgb in sv.STILL_COLORS.items() if (frames[0] == rgb).all(-1).sum() == sv.FLASH_SIDE**2)
    if skill == "order":
        first = {name: min(k for k, f in enumerate(frames) if (f == sv.COLORS[name]).all(-1).any()) for name in ("red", "blue")}
        return min(first, key=first.get)
    lit = [bool((f == sv.COLORS["dot"]).all(-1).any()) for f in frames]
    return sv.NUMBER_WORDS[sum(1 for k, on in enumerate(lit) if on and (k == 0 or not lit[k - 1])) - 1]


def test_samples_are_deterministic_balanced_and_answered_by_their_frames():
    seen = {}
    for index in range(100):
        frames, record = sv.make_sample(CFG, "val", index)
        again, same = sv.make_sample(CFG, "val", index)
        assert np.array_equal(frames, again) and record == same
        skill, answer = record["skills"][0], record["conversations"][1]["value"]
        assert skill == sv.SKILLS[index % len(sv.SKILLS)] and answer_from_frames(frames, skill) == answer
        assert frames.shape == (16, 32, 32, 3) and record["frames"]["sampled_fps"] == 4.0
        seen.setdefault(skill, set()).add(answer)
    assert seen == {s: set(v) for s, v in sv.ANSWER_VOCAB.items()}


def flipped(events: sv.Events, skill: str, rng: np.random.Generator) -> sv.Events:
    """The same event with another answer: the path run backwards, the other square first, or the dot's 4
    lit frames in another number of flashes."""
    if skill == "direction":
        other = {"left": "right", "right": "left", "up": "down", "down": "up"}[events.direction]
        return replace(events, path=events.path[::-1], direction=other)
    if skill == "order":
        return replace(events, first="blue" if events.first == "red" else "red")
    flashes = events.flashes % 4 + 1
    return replace(events, lit=sv.lit_frames(rng, CFG.n_frames, flashes), flashes=flashes)


@pytest.mark.parametrize("skill", sv.TEMPORAL)
def test_without_their_order_the_frames_are_the_same_for_every_answer(skill):
    """An event and its flipped twin show the same frames in another order, so a shuffled video (or one
    of its frames, drawn at random) carries nothing of the answer: the controls can only score chance."""
    for index in range(20):
        rng = sv.sample_rng(0, "test", index)
        events = sv.sample_events(rng, CFG.frame_size, CFG.n_frames)
        twin = flipped(events, skill, rng)
        assert sv.question(events, skill)[1] != sv.question(twin, skill)[1]
        a, b = (sv.render(e, skill, sv.sample_rng(1, "bg", index), CFG.frame_size, CFG.n_frames) for e in (events, twin))
        assert sorted(f.tobytes() for f in a) == sorted(f.tobytes() for f in b)


def test_any_single_frame_answers_the_color_question():
    """The positive control: every frame shows the still square, so shuffled and single-frame videos keep the score."""
    for index in range(3, 40, len(sv.SKILLS)):
        frames, record = sv.make_sample(CFG, "val", index)
        assert record["skills"] == ["color"]
        assert all(answer_from_frames(f[None], "color") == record["conversations"][1]["value"] for f in frames)


def test_video_controls_shuffle_or_freeze_each_videos_frames_only():
    from models import MLLM
    from tests.helpers import qwen_visual_batch, tiny_qwen_config
    from train.evaluation import video_controls

    torch.manual_seed(0)
    model = MLLM.from_config(tiny_qwen_config())
    _, _, _, items = qwen_visual_batch(model.config, [["image 0", "video 0"], ["video 1"]])
    sizes, seconds = items["image_sizes"], items["step_seconds"]
    family, config = model.family, model.config
    frames = family.frames_per_item(config, sizes)
    same = family.reorder_frames(config, items["pixel_values"], sizes, [torch.arange(n) for n in frames])
    assert torch.equal(same, items["pixel_values"])

    def frames_of(pixels, k):  # item k's frames, by reordering it into frame-major order through the family
        start = int(sizes[:k].prod(-1).sum())
        part = pixels[start : start + int(sizes[k].prod())]
        t, h, w = sizes[k].tolist()
        return part.view(t, h * w, 3, 2, -1).permute(0, 3, 1, 2, 4).reshape(t * 2, -1)

    shuffled = video_controls(model, items["pixel_values"], sizes, seconds, "shuffled")
    single = video_controls(model, items["pixel_values"], sizes, seconds, "single")
    assert torch.equal(frames_of(shuffled, 0), frames_of(items["pixel_values"], 0))  # the image is left alone
    for k in (1, 2):
        original, mixed, frozen = (frames_of(p, k) for p in (items["pixel_values"], shuffled, single))
        assert sorted(map(tuple, mixed.tolist())) == sorted(map(tuple, original.tolist())) and not torch.equal(mixed, original)
        assert all(torch.equal(f, frozen[0]) for f in frozen) and any(torch.equal(frozen[0], f) for f in original)


def test_the_video_job_trains_and_reports_the_controls(tmp_path):
    """Two steps of `python -m train experiment=video` (2-layer LLM): trains, evaluates with val/acc per
    skill beside the shuffled and single-frame controls, records the M-RoPE rule and exports a directory
    transformers' Qwen2-VL loads."""
    from transformers import Qwen2VLForConditionalGeneration

    cmd = [sys.executable, "-m", "train", "experiment=video", f"paths.root_dir={tmp_path}", "data.source.n_train=24",
           "data.source.n_val=6", "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=6", "trainer.max_steps=2",
           "trainer.val_check_interval=2", "model.config.text.num_hidden_layers=2", "model.config.vision.depth=2",
           "eval.max_new_tokens=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "outputs" / "video" / "tiny_qwen2vl-dense"
    summary = json.loads((run / "metrics.json").read_text())
    metrics = summary["metrics"]
    for skill in sv.SKILLS:
        assert {f"val/acc/{skill}", f"val/acc_shuffled/{skill}", f"val/acc_single/{skill}"} <= set(metrics)
    assert summary["mrope_rule"] == "qwen" and metrics["eff/tower_tflops"] > 0
    hf = Qwen2VLForConditionalGeneration.from_pretrained(run / "export")
    assert hf.config.video_token_id == 6
