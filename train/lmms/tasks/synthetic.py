"""Local lmms-eval tasks built from the synthetic shapes task (data/synthetic.py), in the formats of
POPE (yes/no), GQA (short answer, exact match) and SEED-Bench's multiple choice by log-likelihood.

`write_synthetic_tasks(out_dir, n)` renders `n` validation samples per task as PNGs, writes one JSON
lines file per task (`dataset_path: json`, images by local path) and a task YAML that includes the
task's format from this directory (`_synthetic_*_yaml`). Then

    python -m lmms_eval --model efficient_mllm --model_args pretrained=<export> \\
        --tasks synthetic_pope,synthetic_gqa,synthetic_mc --include_path <out_dir>

The doc_* functions below are what those YAMLs call.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from data.synthetic import ANSWER_VOCAB, SyntheticConfig, make_sample, render
from data.validity import IMAGE, check_record

TASKS_DIR = Path(__file__).resolve().parent
TASKS = ("synthetic_pope", "synthetic_gqa", "synthetic_mc")


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc: dict) -> list[str]:
    return doc["choices"]


def write_synthetic_tasks(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64) -> Path:
    """Write the three tasks (`n` documents each) into `out_dir`; returns it (the include path)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir).resolve()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    cfg = SyntheticConfig(seed=seed, image_size=image_size)
    docs: dict[str, list[dict]] = {t: [] for t in TASKS}
    index = 0
    while any(len(d) < n for d in docs.values()):
        scene, record = make_sample(cfg, "val", index)
        conversation = check_record(record, 1)  # the rule training and evaluation apply (data/validity.py)
        question, answer, skill = conversation.question().removeprefix(f"{IMAGE}\n"), conversation.answer, record["skills"][0]
        image = out_dir / "images" / f"{record['id']}.png"
        doc = {"question_id": record["id"], "question": question, "answer": answer, "category": skill, "image": str(image)}
        wanted = [("synthetic_gqa", doc), ("synthetic_mc", {**doc, "choices": list(ANSWER_VOCAB[skill])})]
        if answer in ("yes", "no"):
            wanted.append(("synthetic_pope", doc))
        wanted = [(t, d) for t, d in wanted if len(docs[t]) < n]
        if wanted:
            render(scene).save(image)
        for task, d in wanted:
            docs[task].append(d)
        index += 1
    for task, rows in docs.items():
        data = out_dir / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        base = TASKS_DIR / f"_{task}_yaml"
        (out_dir / f"{task}.yaml").write_text(
            f"include: {base}\ntask: {task}\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.lmms.tasks.synthetic", description=write_synthetic_tasks.__doc__)
    p.add_argument("out", type=Path, help="directory for the tasks (the --include_path / eval.lmms_include_path)")
    p.add_argument("--n", type=int, default=200, help="documents per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args(argv)
    print(write_synthetic_tasks(args.out, args.n, args.seed, args.image_size))


if __name__ == "__main__":
    main()
