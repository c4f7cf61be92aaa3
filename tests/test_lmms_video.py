"""lmms-eval's `efficient_mllm` takes video documents: a local task built from the synthetic temporal task
written to real .mp4 files (train/lmms/tasks/synthetic_video.py), decoded by the bridge with PyAV, prompted
with `<|video_pad|>` placeholders between the vision start / end tokens; its batched answers equal each
document's own greedy answer, and the CLI scores the task offline with the same answers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("av", reason="the `video` extra (PyAV) is not installed")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (python3 train/bootstrap.py --eval)")

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 4


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny Qwen2-VL (random weights) exported with a tokenizer trained on the task's text, as the
    training job exports it."""
    from data.synthetic_video import all_texts
    from data.tokenizer import train_bpe
    from models import MLLM
    from tests.helpers import tiny_qwen_config
    from train.lmms.export import write_eval_files

    out = tmp_path_factory.mktemp("video_export") / "export"
    tokenizer = train_bpe(all_texts(), 300, ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"))
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>")] == [4, 5, 6]
    config = tiny_qwen_config(video_min_pixels=256, video_max_pixels=4096)
    config.text["vocab_size"] = 320  # the byte-level tokenizer's 256 bytes and more
    torch.manual_seed(0)
    model = MLLM.from_config(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_eval_files(out, "chatml", "", tokenizer)
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from train.lmms.tasks.synthetic_video import write_synthetic_video_tasks

    return write_synthetic_video_tasks(tmp_path_factory.mktemp("video_tasks"), N_DOCS)


def documents(tasks: Path) -> list[dict]:
    return [json.loads(line) for line in (tasks / "synthetic_video.jsonl").read_text().splitlines()]


def own_answers(export: Path, docs: list[dict]) -> list[str]:
    """Each document alone: its file's 16 frames through the family's video preprocessing, its prompt
    through the bridge's encoder with the video placeholders, models.generation's greedy decoding."""
    from data.video_files import read_video
    from models import MLLM
    from train.lmms.processor import EvalProcessor
    from train.lmms.scoring import generate

    model = MLLM.from_pretrained(export).eval()
    processor = EvalProcessor.from_pretrained(export, model.config)
    out = []
    for doc in docs:
        frames, timing = read_video(doc["video"], num_frames=16)
        video = model.family.video_processor(model.config)(frames, timing["sampled_fps"])
        assert video.size == (8, 8, 8) and timing["sampled_fps"] == 4.0  # 16 frames of 32 x 32 px (8 x 8 patches) at 4 fps
        ids = processor.prompts.encode(doc["question"], 1, processor.tokens([video]), [video.timestamps])
        n = model.config.tokens_per_image(video.size)
        start = ids.index(4)
        assert ids[start : start + n + 2] == [4, *[6] * n, 5]
        new = generate(model, [ids], video.pixels, 8, processor.stop_ids, processor.pad_id, torch.tensor([video.size]),
                       torch.tensor([video.step_seconds]))[0]
        out.append(processor.tokenizer.decode(new, skip_special_tokens=True))
    return out


def test_the_bridge_decodes_video_documents_and_batches_them(export, tasks):
    from models import MLLM
    from train.lmms.model import EfficientMLLM
    from train.lmms.processor import EvalProcessor
    from train.lmms.tasks.synthetic_video import doc_to_visual

    docs = documents(tasks)
    model = MLLM.from_pretrained(export).eval()
    processor = EvalProcessor.from_pretrained(export, model.config)
    processor.video_sampling = {"num_frames": 16}
    bridge = EfficientMLLM.from_model(model, processor, batch_size=3)
    bridge.task_dict = {"synthetic_video": {"test": docs}}
    settings = {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "num_beams": 1}
    requests = [SimpleNamespace(args=(d["question"], settings, doc_to_visual, i, "synthetic_video", "test")) for i, d in enumerate(docs)]
    assert bridge.generate_until(requests) == own_answers(export, docs)


@pytest.mark.slow
def test_the_cli_scores_the_local_video_task_offline(export, tasks, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "efficient_mllm",
           "--model_args", f"pretrained={export},dtype=float32,device=cpu,batch_size=2,video_frames=16",
           "--tasks", "synthetic_video", "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("*_results.json")
    assert "exact_match,none" in json.loads(results.read_text())["results"]["synthetic_video"]
    samples = sorted((json.loads(line) for f in (tmp_path / "out").rglob("*_samples_synthetic_video.jsonl")
                      for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    answers = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]
    assert [a.strip() for a in answers] == [a.strip() for a in own_answers(export, documents(tasks))]  # lmms-eval strips replies
