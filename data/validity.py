"""The one rule that decides whether a LLaVA record is a usable sample, and why not.

Every reader applies it the same way: the converter (data/convert_llava.py) before writing a record,
the shard reader (data/pipeline.py) for training, evaluation and the tokenizer corpus, and the
lmms-eval task writers (train/lmms/tasks/). So a sample that training accepts is also one that
evaluation can prompt: every rejected record raises `InvalidSample` with one of `REASONS`, which the
readers count (`data/skipped_samples/<reason>`, the converter's report) instead of failing.

A usable record is an object with a non-empty `conversations` list of `{"from", "value"}` turns
(`human`/`user`, `gpt`/`assistant`, and `system` turns before the first of those), whose `<image>`
placeholders sit in user turns and are exactly as many as its images (a `video` record: one, standing
for the video, as in LLaVA-Video's data), and where a non-empty assistant
reply follows the user turn that completes the images (for text-only records: the first user turn).
That reply is what evaluation scores; its prompt is everything before it (`Conversation.eval_reply`).
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = "<image>"
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}

# reason -> what it means (docs/data-conversion.md lists the same); the order is fixed: the training
# process sums the counts of all ranks as one vector in this order (train/module.py)
REASONS = {
    "not_an_object": "the record (JSON) is not an object",
    "malformed_json": "a shard sample whose .json member is missing, not UTF-8 or not valid JSON",
    "no_conversations": "no 'conversations' list, or an empty one",
    "bad_turn": "a conversation turn that is not an object with string 'from' and 'value'",
    "unknown_role": "a turn whose 'from' is none of human/user, gpt/assistant, system",
    "misplaced_system_turn": "a system turn after the first user or assistant turn",
    "bad_image_field": "'image' is neither a path string nor a list of path strings",
    "bad_video_field": "'video' is not a path string, or the record holds images and a video (one or the other)",
    "image_placeholder_mismatch": "<image> placeholders (in user turns) and images differ in number",
    "bad_image_members": "a shard sample's image members are neither one `<ext>` nor `0.<ext>`, `1.<ext>`, ...",
    "no_assistant_reply": "no non-empty assistant reply after the user turn that carries the image(s)",
    "too_many_images": "more images than the model takes per sample (max_images_per_sample)",
    "too_long": "image tokens would be cut at max_length, or no supervised token is left within it",
    "missing_image": "an image file that does not exist (converter)",
    "missing_video": "a video file that does not exist (converter)",
    "corrupt_video": "a video that does not decode, is truncated or has too few frames (converter, data/extract_frames.py)",
    "bad_video_frames": "a shard sample whose frames.npy or its timing (frames.sampled_fps) is missing or unreadable",
    "video_not_supported": "a video sample for a model family that takes no video (the Qwen families do)",
    "outside_image": "an image path that could leave the image folder (converter, without --allow-outside-images)",
    "corrupt_image": "an image that does not decode",
    "unreadable_tar_member": "a tar member that cannot be read (truncated or damaged shard)",
    "other": "any other error while reading the sample (the log names it)",
}


class InvalidSample(ValueError):
    """A record that cannot be used as a sample: `reason` is one of REASONS, the message says where."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to data.validity.REASONS")
        super().__init__(detail)
        self.reason = reason


def reason_of(error: BaseException) -> str:
    """The REASONS key an error counts under (`other` for errors that are not InvalidSample)."""
    return error.reason if isinstance(error, InvalidSample) else "other"


@dataclass(frozen=True)
class Conversation:
    """A usable conversation: its turns with normalised roles (system turns apart) and which reply
    evaluation scores."""

    system: str | None  # the leading system turn(s), joined; None: the chat template's own system prompt
    turns: tuple[tuple[str, str], ...]  # (USER | ASSISTANT, text) in order
    n_images: int
    eval_reply: int  # index in `turns` of the first non-empty reply after the user turn completing the images

    @property
    def answer(self) -> str:
        return self.turns[self.eval_reply][1]

    @property
    def reply_number(self) -> int:
        """How many assistant turns come before the evaluated reply (its index among the replies)."""
        return sum(role == ASSISTANT for role, _ in self.turns[: self.eval_reply])

    def question(self) -> str:
        """The user text before the evaluated reply, turns joined by a newline: a one-message prompt
        that holds every `<image>` placeholder in its place (lmms-eval documents are single-round)."""
        return "\n".join(text for role, text in self.turns[: self.eval_reply] if role == USER)


def image_paths(record: dict) -> list[str]:
    """The record's image paths in order: `image` absent or null (text-only), a string, or a list of
    strings (LLaVA-OneVision-style multi-image records)."""
    image = record.get("image")
    if image is None:
        return []
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise InvalidSample("bad_image_field", f"'image' must be a path or a list of paths, got {image!r:.80}")
    return list(paths)


def video_path(record: dict) -> str | None:
    """The record's video path (LLaVA-Video style: `"video": "clips/a.mp4"`, its one `<image>`
    placeholder standing for the video), or None."""
    video = record.get("video")
    if video is None:
        return None
    if not isinstance(video, str) or not video:
        raise InvalidSample("bad_video_field", f"'video' must be a path, got {video!r:.80}")
    if record.get("image") is not None:
        raise InvalidSample("bad_video_field", "the record holds images and a video; a record holds one or the other")
    return video


def visual_count(record: dict) -> int:
    """How many visual items a record names: its images, or 1 for its video."""
    return 1 if video_path(record) is not None else len(image_paths(record))


def check_record(record: object, n_images: int) -> Conversation:
    """The conversation of a record that has `n_images` visual items (its images, or its video), or
    InvalidSample naming why it is not a usable sample."""
    if not isinstance(record, dict):
        raise InvalidSample("not_an_object", f"the record is a {type(record).__name__}, not an object")
    if video_path(record) is not None and n_images != 1:
        raise InvalidSample("bad_video_frames", f"the record has a video but the sample holds {n_images} visual items, not its frames")
    return check_conversation(record.get("conversations"), n_images)


def check_conversation(turns: object, n_images: int) -> Conversation:
    """`turns` (a record's `conversations`) checked against the rule in this module's docstring."""
    if not isinstance(turns, list) or not turns:
        raise InvalidSample("no_conversations", "the record has no non-empty 'conversations' list")
    system, out = [], []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise InvalidSample("bad_turn", f"conversation turn {i} is not an object with string 'from' and 'value': {turn!r:.80}")
        role = ROLES.get(turn["from"].strip().lower())
        if role is None:
            raise InvalidSample("unknown_role", f"conversation turn {i} has role {turn['from']!r:.40} (expected human/user, gpt/assistant or system)")
        if role == SYSTEM:
            if out:
                raise InvalidSample("misplaced_system_turn", f"conversation turn {i} is a system turn after the conversation started")
            system.append(turn["value"])
            continue
        if role != USER and IMAGE in turn["value"]:
            raise InvalidSample("image_placeholder_mismatch", f"conversation turn {i} ({turn['from']}) has an {IMAGE} placeholder; only user turns may")
        out.append((role, turn["value"]))
    if any(IMAGE in s for s in system):
        raise InvalidSample("image_placeholder_mismatch", f"a system turn has an {IMAGE} placeholder; only user turns may")
    placeholders = sum(text.count(IMAGE) for role, text in out if role == USER)
    if placeholders != n_images:
        raise InvalidSample("image_placeholder_mismatch", f"{placeholders} {IMAGE} placeholder(s) for {n_images} image(s) "
                            f"(a video is one, written {IMAGE} as in LLaVA-Video's data)")
    return Conversation("\n".join(system) if system else None, tuple(out), n_images, _eval_reply(out, n_images))


def _eval_reply(turns: list[tuple[str, str]], n_images: int) -> int:
    seen, asked = 0, False
    for i, (role, text) in enumerate(turns):
        if role == USER:
            seen, asked = seen + text.count(IMAGE), True
        elif asked and seen == n_images and text.strip():
            return i
    if not any(role == ASSISTANT and text.strip() for role, text in turns):
        raise InvalidSample("no_assistant_reply", "the conversation has no non-empty assistant reply to learn from")
    where = "the user turn that carries the image(s)" if n_images else "the first user turn"
    raise InvalidSample("no_assistant_reply", f"no non-empty assistant reply follows {where}")


def check_image_count(n_images: int, max_images: int | None) -> None:
    """`too_many_images` when a model that takes at most `max_images` per sample (None: any number)
    would get more."""
    if max_images is not None and n_images > max_images:
        raise InvalidSample("too_many_images", f"{n_images} images, but the model takes at most {max_images} per sample")
