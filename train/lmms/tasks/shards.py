"""An lmms-eval task from LLaVA-format shards (e.g. the val shards of `python -m data.convert_llava`),
so a converted evaluation set is scored through lmms-eval the way training's evaluation scores it.

    python -m train.lmms.tasks.shards OUT --shards 'val-{000000..000003}.tar' [--name llava_val] \\
        [--max-images-per-sample N]
    python -m lmms_eval --model efficient_mllm --model_args pretrained=<export> --tasks llava_val --include_path OUT

The samples are read with the rule training and evaluation apply (data/validity.py): a sample it
rejects, one with more images than `--max-images-per-sample`, or one whose image does not decode is
skipped, counted by reason (printed, and listed in OUT/<name>-skipped.jsonl). Each document holds the
user text before the reply evaluation scores, with its `<image>` placeholders in place, the images in
placeholder order (written under OUT/images/) and that reply as the answer.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

from data.pipeline import expand_urls, parse_record, sample_name
from data.skips import SkipLog
from data.validity import InvalidSample, check_image_count

TASKS_DIR = Path(__file__).resolve().parent


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def write_shards_task(out_dir: str | Path, shards: str | list[str], name: str = "llava_val",
                      max_images_per_sample: int | None = None) -> dict:
    """Write task `name` (`<name>.jsonl`, `<name>.yaml`, images) into `out_dir`; returns
    {"include_path", "documents", "skipped": {reason: count}}."""
    out_dir = Path(out_dir).resolve()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    skips, docs, report = SkipLog(f"task {name}"), [], []

    def skip(where: str, err: Exception, reason: str | None = None) -> bool:
        reason = skips.skip(where, err, reason)
        report.append({"sample": where, "reason": reason, "detail": str(err)})
        return True  # webdataset handler protocol: continue

    urls = expand_urls(shards)
    for raw in wds.tarfile_samples(({"url": u} for u in urls), handler=lambda e: skip(f"(unreadable tar member: {e})", e, "unreadable_tar_member")):
        try:
            record, images, conversation, _ = parse_record(raw)
            check_image_count(len(images), max_images_per_sample)
            extensions = [_image_format(data) for data in images]
        except InvalidSample as e:
            skip(sample_name(raw), e)
            continue
        stem = f"{Path(raw['__url__']).stem}-{raw['__key__']}"
        paths = [out_dir / "images" / f"{stem}-{k}.{ext}" for k, ext in enumerate(extensions)]
        for path, data in zip(paths, images):
            path.write_bytes(data)  # as they are: lmms-eval's loader opens them like the shard reader
        docs.append({"question_id": f"{Path(raw['__url__']).stem}/{raw['__key__']}", "question": conversation.question(),
                     "answer": conversation.answer, "images": [str(p) for p in paths]})
    if not docs:
        raise ValueError(f"no usable samples in {len(urls)} shard(s) (e.g. {urls[0]}); skipped: {skips.summary() or 'none'}")
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (out_dir / f"{name}-skipped.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report), encoding="utf-8")
    (out_dir / f"{name}.yaml").write_text(
        f"include: {TASKS_DIR / '_shards_yaml'}\ntask: {name}\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
    )
    return {"include_path": str(out_dir), "documents": len(docs), "skipped": dict(skips.total.most_common())}


def _image_format(data: bytes) -> str:
    """The file extension of encoded image bytes; `corrupt_image` when they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return (img.format or "png").lower()
    except Exception as e:  # PIL raises many exception types for broken files
        raise InvalidSample("corrupt_image", f"an image does not decode ({type(e).__name__}: {e})") from None


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.lmms.tasks.shards", description=write_shards_task.__doc__)
    p.add_argument("out", type=Path, help="directory for the task (the --include_path / eval.lmms_include_path)")
    p.add_argument("--shards", required=True, nargs="+", help="shard paths or brace patterns (val-{000000..000003}.tar)")
    p.add_argument("--name", default="llava_val", help="the task name (--tasks <name>)")
    p.add_argument("--max-images-per-sample", type=int, default=None, help="skip samples with more images (a model that takes fewer)")
    args = p.parse_args(argv)
    print(json.dumps(write_shards_task(args.out, args.shards, args.name, args.max_images_per_sample), indent=2))


if __name__ == "__main__":
    main()
