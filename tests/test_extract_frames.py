"""Video data, offline: Qwen's frame-sampling rule; real video files (written here with PyAV) become
shards of sampled frames with their timing (`python -m data.extract_frames`), LLaVA-Video records
convert through `python -m data.convert_llava`, and bad, truncated or too-short files are skipped and
counted; the data path reads the shards into Qwen video inputs without a video decoder."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from data.frames import FRAMES_MEMBER, frame_count, frame_indices

av = pytest.importorskip("av", reason="the `video` extra (PyAV) is not installed")

from data.video_files import read_video, write_video  # noqa: E402


def test_frame_sampling_is_qwens_rule():
    """qwen-vl-utils: fps * duration clamped to [4, min(768, total)], floored to even; a count rounded
    to even; indices linspace(0, total - 1, n) rounded half to even."""
    assert frame_count(100, 25.0, fps=2.0) == 8  # 4 s at 2 fps
    assert frame_count(30, 30.0, fps=2.0) == 4  # 1 s: 2 frames, raised to the minimum of 4
    assert frame_count(7, 30.0, fps=2.0) == 4
    assert frame_count(5000, 10.0, fps=2.0) == 768  # 500 s: capped
    assert frame_count(101, 25.0, fps=0.5) == 4
    assert [frame_count(100, 25.0, num_frames=n) for n in (9, 11, 3)] == [8, 12, 4]  # Python's round: half to even
    assert frame_indices(100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]
    assert frame_indices(9, 4) == [0, 3, 5, 8]  # 2.67 -> 3, 5.33 -> 5
    with pytest.raises(ValueError, match="cannot give"):
        frame_count(1, 30.0, fps=2.0)


def moving_square(n: int = 24, size: tuple[int, int] = (32, 48)) -> np.ndarray:
    """A bright square moving right over a dark background, one step per frame."""
    frames = np.full((n, *size, 3), 20, dtype=np.uint8)
    for k in range(n):
        frames[k, 8:16, k : k + 8] = (250, 200, 40)
    return frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder of real video files: lossless .mkv (ffv1, no frame count in its header) and .mp4 (H.264),
    a truncated .mp4, a text file named .mp4 and a one-frame video."""
    root = tmp_path_factory.mktemp("videos")
    frames = moving_square()
    (root / "clips").mkdir()
    write_video(root / "clips" / "square.mkv", frames, fps=8.0, codec="ffv1")
    write_video(root / "clips" / "square.mp4", frames, fps=8.0)
    data = (root / "clips" / "square.mp4").read_bytes()
    (root / "clips" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "clips" / "notes.mp4").write_text("not a video")
    write_video(root / "clips" / "one_frame.mp4", frames[:1], fps=8.0)
    return root, frames


def test_read_video_samples_frames_and_keeps_their_timing(videos):
    root, frames = videos
    got, timing = read_video(root / "clips" / "square.mkv", fps=2.0)
    assert timing["total_frames"] == 24 and timing["fps"] == 8.0
    assert timing["frame_indices"] == frame_indices(24, 6)  # 3 s at 2 fps
    assert timing["sampled_fps"] == 2.0
    assert np.array_equal(got, frames[timing["frame_indices"]])  # lossless: exactly the source frames
    got, timing = read_video(root / "clips" / "square.mp4", num_frames=4)
    assert timing["frame_indices"] == [0, 8, 15, 23] and timing["sampled_fps"] == 4 / 24 * 8
    assert np.abs(got.astype(int) - frames[[0, 8, 15, 23]]).mean() <= 4  # H.264's 4:2:0 chroma blurs the square's edges


def test_extract_frames_writes_shards_and_skips_bad_files(videos, tmp_path, monkeypatch, capsys):
    from data import extract_frames

    root, frames = videos
    monkeypatch.setattr(sys, "argv", ["extract_frames"])
    extract_frames.main(["--videos", str(root), "--out", str(tmp_path / "out"), "--fps", "2", "--samples-per-shard", "1"])
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["videos"] == 5 and manifest["written"] == 2 and manifest["shards"] == ["frames-000000.tar", "frames-000001.tar"]
    assert manifest["skipped"] == {"corrupt_video": 3}
    skipped = [json.loads(line) for line in (tmp_path / "out" / "frames-skipped.jsonl").read_text().splitlines()]
    assert {e["video"] for e in skipped} == {"clips/truncated.mp4", "clips/notes.mp4", "clips/one_frame.mp4"}
    assert any("cannot give" in e["detail"] for e in skipped)  # one frame: too short for 2-frame steps
    samples = list(wds.WebDataset(str(tmp_path / "out" / "frames-000000.tar"), shardshuffle=False))
    record = json.loads(samples[0]["json"])
    assert record["video"] == "clips/square.mkv" and record["frames"]["sampled_fps"] == 2.0
    stored = np.load(io.BytesIO(samples[0][FRAMES_MEMBER]))
    assert np.array_equal(stored, frames[record["frames"]["frame_indices"]])


@pytest.fixture(scope="module")
def video_shards(videos, tmp_path_factory):
    """LLaVA-Video records (usable, missing, corrupt) converted with the rest of the converter's rules."""
    from data import convert_llava

    root, _ = videos
    out = tmp_path_factory.mktemp("video_shards")
    records = [
        {"id": "v", "video": "clips/square.mkv", "conversations": [{"from": "human", "value": "<image>\nWhere does it go?"},
                                                                    {"from": "gpt", "value": "right"}]},
        {"id": "lost", "video": "clips/lost.mp4", "conversations": [{"from": "human", "value": "<image>\n?"}, {"from": "gpt", "value": "x"}]},
        {"id": "cut", "video": "clips/truncated.mp4", "conversations": [{"from": "human", "value": "<image>\n?"}, {"from": "gpt", "value": "x"}]},
        {"id": "both", "video": "clips/square.mp4", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\n?"},
                                                                                          {"from": "gpt", "value": "x"}]},
    ]
    (out / "video.json").write_text(json.dumps(records))
    summary = convert_llava.convert(out / "video.json", root, out, samples_per_shard=10, progress=False,
                                    video=convert_llava.VideoSampling(num_frames=4))
    return out, summary


def test_llava_video_records_convert_with_skip_and_report(video_shards):
    out, summary = video_shards
    assert summary["written"] == 1 and summary["videos"] == 1
    assert summary["skipped"] == {"missing_video": 1, "corrupt_video": 1, "bad_video_field": 1}
    sample = next(iter(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)))
    record = json.loads(sample["json"])
    assert record["frames"]["frame_indices"] == [0, 8, 15, 23] and record["frames"]["sampled_fps"] == 4 / 24 * 8
    assert np.load(io.BytesIO(sample[FRAMES_MEMBER])).shape == (4, 32, 48, 3)


def test_the_data_path_reads_video_shards_without_a_decoder(video_shards, monkeypatch):
    """A Qwen sample from a video shard: <|video_pad|> placeholders for its t * h * w / 4 tokens, the
    frames preprocessed by the family, its seconds per step = 2 / the stored sampled fps; PyAV is never
    imported (it is made unimportable here)."""
    from data.batch import Collator
    from data.chat import ChatTokenizer
    from data.datamodule import SampleEncoder
    from train.builders import image_spec, video_token_id
    from tests.helpers import qwen_word_tokenizer, tiny_qwen_config

    out, _ = video_shards
    monkeypatch.setitem(sys.modules, "av", None)
    config = tiny_qwen_config()
    tok = qwen_word_tokenizer()
    chat = ChatTokenizer(tok, "chatml", None, 512, "", ("<|vision_start|>", "<|vision_end|>"), config.image_token_id,
                         video_token_id(config))
    raw = next(iter(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)))
    sample = SampleEncoder(chat, image_spec(config))(raw)
    (size,) = sample["image_sizes"]
    assert size[0] == 2  # 4 frames: 2 temporal steps
    assert sample["input_ids"].count(6) == config.tokens_per_image(size) and sample["input_ids"].count(3) == 0
    assert sample["step_seconds"] == [pytest.approx(2 / (4 / 24 * 8))]
    batch = Collator(0)([sample, sample])
    assert batch.step_seconds.tolist() == [pytest.approx(1.5)] * 2 and batch.image_sizes.shape == (2, 3)
    from models import MLLM

    torch.manual_seed(0)
    model = MLLM.from_config(config).eval()
    with torch.no_grad():
        loss = model(batch.input_ids, batch.attention_mask, labels=batch.labels, **batch.images).loss
    assert torch.isfinite(loss)
