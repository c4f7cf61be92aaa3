"""Small LLaVA-format JSON files in the layouts people convert, with images, and what each record
should become: written (and how many images) or skipped (and why).

Layouts: LLaVA-1.5's 665k mix (`image` a string, `human`/`gpt`, multi-turn, text-only ShareGPT records
without `image`, VQA-style "Answer the question using a single word or phrase."), ShareGPT4V (the
placeholder after the question), LLaVA-OneVision-style multi-image records (`image` a list, placeholders
together or spread over the text), `system` turns, `user`/`assistant` role names, and a conversation
that opens with an assistant turn. Then every kind of record that cannot be a usable sample.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (250, 250, 250)}


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def make_images(root: Path) -> None:
    """One flat-coloured image per colour in each layout's folder (LLaVA's folder names)."""
    for folder, ext in (("coco/train2017", "jpg"), ("gqa/images", "jpg"), ("sam/images", "png"), ("onevision", "png")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, rgb in COLORS.items():
            Image.new("RGB", (40, 30), rgb).save(root / folder / f"{name}.{ext}")
    (root / "coco/train2017/broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


# (record, expected): expected is the number of images written, or the reason it is skipped
USABLE = [
    ({"id": "000000033471", "image": "coco/train2017/red.jpg", "conversations": [  # LLaVA-1.5 665k, multi-turn
        human("<image>\nWhat color is the picture?"), gpt("It is red."),
        human("Is it bright?"), gpt("Yes, it is a bright red.")]}, 1),
    ({"id": "2354786", "image": "gqa/images/green.jpg", "conversations": [  # 665k VQA part (GQA)
        human("<image>\nWhat color is it?\nAnswer the question using a single word or phrase."), gpt("green")]}, 1),
    ({"id": "i6IyJda_0", "model": "", "conversations": [  # 665k text-only ShareGPT record (no `image`)
        human("Say hello in French."), gpt("Bonjour.")]}, 0),
    ({"id": "sa_1", "image": "sam/images/blue.png", "conversations": [  # ShareGPT4V: placeholder after the question
        human("What do you see happening in this image?\n<image>"), gpt("A plain blue picture with nothing else in it.")]}, 1),
    ({"id": "ov_pair", "image": ["onevision/red.png", "onevision/blue.png"], "conversations": [  # OneVision multi-image
        human("<image>\n<image>\nWhich colors are these two pictures?"), gpt("red and blue")]}, 2),
    ({"id": "ov_spread", "image": ["onevision/green.png", "onevision/white.png", "onevision/red.png"], "conversations": [
        human("Picture 1: <image>\nPicture 2: <image>\nPicture 3: <image>\nName the colors in order."), gpt("green, white, red")]}, 3),
    ({"id": "sys", "image": "coco/train2017/blue.jpg", "conversations": [  # a system turn
        {"from": "system", "value": "You answer in one word."}, human("<image>\nColor?"), gpt("blue")]}, 1),
    ({"id": "roles", "image": "gqa/images/white.jpg", "conversations": [  # user/assistant role names
        {"from": "user", "value": "<image>\nWhat color is it?"}, {"from": "assistant", "value": "white"}]}, 1),
    ({"id": "assistant_first", "image": "coco/train2017/green.jpg", "conversations": [  # opens with the assistant
        gpt("Hello! Show me a picture."), human("<image>\nWhich color is this?"), gpt("green")]}, 1),
]
SKIPPED = [
    ({"id": "empty", "image": "coco/train2017/red.jpg", "conversations": []}, "no_conversations"),
    ({"id": "no_conv", "image": "coco/train2017/red.jpg"}, "no_conversations"),
    ({"id": "no_value", "conversations": [{"from": "human"}, gpt("x")]}, "bad_turn"),
    ({"id": "number_value", "conversations": [human("hi"), {"from": "gpt", "value": 3}]}, "bad_turn"),
    ({"id": "bot", "conversations": [human("hi"), {"from": "bot", "value": "hello"}]}, "unknown_role"),
    ({"id": "late_system", "conversations": [human("hi"), {"from": "system", "value": "be brief"}, gpt("hello")]}, "misplaced_system_turn"),
    ({"id": "question_only", "image": "coco/train2017/red.jpg", "conversations": [human("<image>\nColor?")]}, "no_assistant_reply"),
    ({"id": "reply_before_image", "image": "coco/train2017/red.jpg", "conversations": [  # the crash in evaluation
        gpt("Hello!"), human("<image>\nWhat color is it?")]}, "no_assistant_reply"),
    ({"id": "empty_reply", "conversations": [human("hi"), gpt("  ")]}, "no_assistant_reply"),
    ({"id": "no_placeholder", "image": "coco/train2017/red.jpg", "conversations": [human("Color?"), gpt("red")]},
     "image_placeholder_mismatch"),
    ({"id": "two_images_one_placeholder", "image": ["onevision/red.png", "onevision/blue.png"], "conversations": [
        human("<image>\nColors?"), gpt("red and blue")]}, "image_placeholder_mismatch"),
    ({"id": "placeholder_in_reply", "image": "coco/train2017/red.jpg", "conversations": [
        human("<image>\nColor?"), gpt("<image> red")]}, "image_placeholder_mismatch"),
    ({"id": "image_number", "image": 7, "conversations": [human("<image>\nColor?"), gpt("red")]}, "bad_image_field"),
    ({"id": "video_and_image", "video": "clips/a.mp4", "image": "coco/train2017/red.jpg", "conversations": [
        human("<image>\nWhat happens?"), gpt("nothing")]}, "bad_video_field"),  # one or the other
    ({"id": "lost", "image": "coco/train2017/lost.jpg", "conversations": [human("<image>\nColor?"), gpt("red")]}, "missing_image"),
    ({"id": "one_of_two_lost", "image": ["onevision/red.png", "onevision/lost.png"], "conversations": [
        human("<image><image>\nColors?"), gpt("red and ?")]}, "missing_image"),
    ({"id": "broken", "image": "coco/train2017/broken.jpg", "conversations": [human("<image>\nColor?"), gpt("red")]}, "corrupt_image"),
    ({"id": "escape", "image": "../secret.png", "conversations": [human("<image>\nColor?"), gpt("red")]}, "outside_image"),
    ("not a record", "not_an_object"),
]


def mixed_records() -> list[tuple[object, int | str]]:
    """USABLE and SKIPPED interleaved (so every shard holds both kinds)."""
    out = []
    for k in range(max(len(USABLE), len(SKIPPED))):
        out += USABLE[k : k + 1] + SKIPPED[k : k + 1]
    return out


def write_mixed(tmp_path: Path, name: str = "mix.json", repeat: int = 1) -> tuple[Path, Path, list[tuple[object, int | str]]]:
    """The JSON file (`repeat` copies of the mix), its image folder, and each record's expectation."""
    root = tmp_path / "images"
    make_images(root)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "secret.png")  # beside the image folder, not in it
    expected = mixed_records() * repeat
    path = tmp_path / name
    path.write_text(json.dumps([record for record, _ in expected]))
    return path, root, expected
