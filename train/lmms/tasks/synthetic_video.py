"""A local lmms-eval video task built from the synthetic temporal task (data/synthetic_video.py): its
validation videos written as real .mp4 files (H.264, PyAV: the `video` extra), one short-answer question
each, scored by exact match like GQA. The bridge decodes each file at evaluation (train/lmms/model.py).

`write_synthetic_video_tasks(out_dir, n)` writes `n` documents (the skills in turn), a JSON lines
file and the task YAML `synthetic_video` (including `_synthetic_video_yaml` from this directory). Then

    python -m lmms_eval --model efficient_mllm --model_args pretrained=<export>,video_frames=16 \\
        --tasks synthetic_video --include_path <out_dir>

(`video_frames=16`: every frame of the 16-frame videos, as the task trains on them; the default samples
2 frames per second.)
"""

from __future__ import annotations

import json
from pathlib import Path

from data.synthetic_video import VideoTaskConfig, make_sample
from data.validity import IMAGE, check_record
from data.video_files import write_video

TASKS_DIR = Path(__file__).resolve().parent
TASK = "synthetic_video"


def doc_to_visual(doc: dict) -> list[str]:
    return [doc["video"]]  # a path: lmms-eval's form for video documents


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def write_synthetic_video_tasks(out_dir: str | Path, n: int, seed: int = 0) -> Path:
    """Write the task (`n` documents) into `out_dir`; returns it (the include path)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir).resolve()
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    cfg = VideoTaskConfig(seed=seed)
    rows = []
    for index in range(n):
        frames, record = make_sample(cfg, "val", index)
        conversation = check_record(record, 1)  # the rule training and evaluation apply (data/validity.py)
        video = out_dir / "videos" / f"{record['id']}.mp4"
        write_video(video, frames, cfg.fps)
        rows.append({"question_id": record["id"], "question": conversation.question().removeprefix(f"{IMAGE}\n"),
                     "answer": conversation.answer, "category": record["skills"][0], "video": str(video)})
    data = out_dir / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out_dir / f"{TASK}.yaml").write_text(f"include: {TASKS_DIR / f'_{TASK}_yaml'}\ntask: {TASK}\ndataset_kwargs:\n  data_files:\n    test: {data}\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.lmms.tasks.synthetic_video", description=write_synthetic_video_tasks.__doc__)
    p.add_argument("out", type=Path, help="directory for the task (the --include_path / eval.lmms_include_path)")
    p.add_argument("--n", type=int, default=300, help="documents")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write_synthetic_video_tasks(args.out, args.n, args.seed))


if __name__ == "__main__":
    main()
