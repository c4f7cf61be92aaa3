"""Chat templates per model family, tokenisation with `<image>` expansion, and label masking.

The full conversation is rendered to one string and tokenised once; labels are kept only for
tokens whose characters fall inside assistant replies (found through the tokenizer's offset
mapping). Tokenising the whole string at once avoids the boundary mismatches that per-turn
tokenisation produces with BPE tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .validity import ASSISTANT, IMAGE, ROLES, SYSTEM, USER, InvalidSample, check_conversation

IGNORE = -100
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_V1_SYSTEM = (  # haotian-liu/LLaVA's conv_vicuna_v1 (`--version v1`), which MobileVLM's `v1` repeats
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    """How turns are written. `{system}` may be empty; assistant replies end with `stop`."""

    name: str
    system_fmt: str  # how a non-empty system prompt is written
    user_fmt: str  # contains {text}
    assistant_prefix: str  # written before every reply (not supervised)
    stop: str  # appended to every reply (supervised: the model must learn to stop)
    default_system: str = ""
    reply_lead: str = ""  # written (supervised) between `assistant_prefix` and the reply


TEMPLATES = {
    # llava-hf's LLaVA-1.5 prompt (LLaVA's conv_llava_v1): "<sys> USER: ... ASSISTANT: reply</s>"
    "vicuna": Template("vicuna", "{system} ", "USER: {text} ", "ASSISTANT:", "</s>", VICUNA_SYSTEM, " "),
    # the same with the system prompt the original LLaVA-1.5 and MobileVLM V2 trained with (conv_vicuna_v1)
    "vicuna_v1": Template("vicuna_v1", "{system} ", "USER: {text} ", "ASSISTANT:", "</s>", VICUNA_V1_SYSTEM, " "),
    # Qwen2 / ChatML
    "chatml": Template(
        "chatml",
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{text}<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
        "You are a helpful assistant.",
    ),
    # LLaVA stage-1 (caption pretraining): the image, then the caption; the question text is dropped.
    # A newline follows the image(s), unsupervised: the model refuses a supervised token right after
    # an image token (models/mllm.py _loss), which LLaVA's own plain format (image + caption) has
    "plain": Template("plain", "", "{text}", "", "\n"),
}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens before the evaluated reply (the generation prompt for evaluation)
    answer: str  # the evaluated reply's text (data/validity.py: the first reply after the images)
    truncated: bool


def render(t: Template, system: str, conversations: list[dict]) -> tuple[str, list[tuple[int, int]], int]:
    """Text, character spans of supervised replies, and where the last reply starts.

    Roles are read through data.validity.ROLES (`human`/`user`, `gpt`/`assistant`); leading `system`
    turns replace `system`, as a leading system message does in HF chat templates."""
    turns = [(ROLES.get(turn["from"].strip().lower()), turn["value"]) for turn in conversations]  # checked: data/validity.py
    lead = next((i for i, (role, _) in enumerate(turns) if role != SYSTEM), len(turns))
    if lead:
        system = "\n".join(value for _, value in turns[:lead])
    parts = [t.system_fmt.format(system=system)] if system and t.system_fmt else []
    spans, last_start = [], 0
    for (role, value), turn in zip(turns[lead:], conversations[lead:]):
        if role == USER:
            if t.name == "plain":  # LLaVA stage 1 keeps only the image(s) of the human turn, then a newline
                value = IMAGE * value.count(IMAGE) + "\n" if IMAGE in value else ""
            parts.append(t.user_fmt.format(text=value))
        elif role == ASSISTANT:
            parts.append(t.assistant_prefix)
            start = sum(map(len, parts))
            reply = t.reply_lead + value + t.stop
            parts.append(reply)
            last_start = start
            spans.append((start, start + len(reply)))
        else:
            raise ValueError(f"conversation role {turn['from']!r} here is not one of human/user, gpt/assistant (system turns lead)")
    return "".join(parts), spans, last_start


def expand_images(ids: list[int], image_token_id: int, counts: list[int], wrap: tuple[int, int] | None = None,
                  item_ids: list[int] | None = None, step_prefixes: list[list[list[int]] | None] | None = None) -> tuple[list[int], list[int]]:
    """`ids` with the k-th `<image>` id repeated `counts[k]` times (the k-th image's visual tokens, the
    model's input layout), between `wrap`'s two text tokens when the family writes them (InternVL's
    `<img>` ... `</img>`), and for each position of `ids` (and one past its end) where it lands.
    `item_ids[k]`: the placeholder id the k-th item's tokens take (a video's: Qwen's `<|video_pad|>`;
    default: the image token); `step_prefixes[k]`: an item written step by step, each step's tokens after
    its prefix and between their own wrap (Qwen3-VL's video: a timestamp before each step).

    The one place placeholders become visual tokens, for training (ChatTokenizer) and evaluation
    prompts (train/lmms/prompts.py); `counts` may differ per image (a family whose token count
    depends on the image size passes its own)."""
    n = ids.count(image_token_id)
    if n != len(counts):
        raise ValueError(f"{n} {IMAGE} token(s) for {len(counts)} image token count(s)")
    out, where, k = [], [], 0
    for t in ids:
        where.append(len(out))
        if t == image_token_id:
            pad = t if item_ids is None else item_ids[k]
            steps = step_prefixes[k] if step_prefixes is not None and step_prefixes[k] is not None else [[]]
            per_step = counts[k] // len(steps)
            for prefix in steps:
                out.extend([*prefix, *([pad] * per_step if wrap is None else [wrap[0], *[pad] * per_step, wrap[1]])])
            k += 1
        else:
            out.append(t)
    where.append(len(out))
    return out, where


def wrap_ids(tokenizer, wrap: tuple[str, str] | None) -> tuple[int, int] | None:
    """The ids of a family's image-wrapping tokens (`Family.image_wrap`), which the tokenizer must have."""
    if wrap is None:
        return None
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in wrap)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"the tokenizer lacks {wrap[0]} / {wrap[1]}, the text tokens this model family writes around each "
                         "image; add them as special tokens (tokenizer.add_special_tokens)")
    return ids
def image_placeholder(tokenizer, image_token_id: int | None) -> str:
    """The text that stands for one image in the prompts a tokenizer reads: `<image>` (LLaVA's data),
    or, when the model's image token is another special token of the tokenizer (Qwen checkpoints'
    `<|image_pad|>`), that token, which `<image>` in the data is written as."""
    if image_token_id is None or (IMAGE in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(IMAGE) == image_token_id):
        return IMAGE
    token = tokenizer.convert_ids_to_tokens(image_token_id)
    if token not in tokenizer.all_special_tokens and token not in tokenizer.get_added_vocab():
        raise ValueError(f"the model's image token id {image_token_id} is the tokenizer's {token!r}, not a special token, and "
                         f"the tokenizer maps {IMAGE} to {tokenizer.convert_tokens_to_ids(IMAGE)}: set model.config.image_token_id "
                         "to the tokenizer's image token (or use the checkpoint's tokenizer)")
    return token


class ChatTokenizer:
    """Turns LLaVA `conversations` into model inputs for one template and tokenizer."""

    def __init__(self, tokenizer, template: str, num_image_tokens: int | None, max_length: int, system: str | None = None,
                 image_wrap: tuple[str, str] | None = None, image_token_id: int | None = None, video_token_id: int | None = None,
                 frame_timestamps: bool = False):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; choose one of {sorted(TEMPLATES)}")
        self.tok = tokenizer
        self.template = TEMPLATES[template]
        self.system = self.template.default_system if system is None else system
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.placeholder = image_placeholder(tokenizer, image_token_id)  # the model's image token (default: <image>)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.placeholder)
        if self.image_token_id is None or (self.placeholder == IMAGE and self.image_token_id == tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {IMAGE} token; add it as a special token (tokenizer.add_special_tokens)")
        self.image_wrap = wrap_ids(tokenizer, image_wrap)  # e.g. InternVL's <img> ... </img> (`Family.image_wrap`)
        self.video_token_id = video_token_id  # what a video's tokens are written as (Qwen's <|video_pad|>); None: no video
        self.frame_timestamps = frame_timestamps  # a video's steps are written apart after their timestamps (Qwen3-VL)

    def render(self, conversations: list[dict]) -> tuple[str, list[tuple[int, int]], int]:
        return render(self.template, self.system, conversations)

    def encode(self, conversations: list[dict], n_images: int = 1, image_tokens: list[int] | None = None,
               videos: list[tuple[float, ...] | None] | None = None) -> Encoded:
        """Token ids and labels of a conversation with `n_images` images, each `<image>` expanded to
        `image_tokens[k]` visual tokens (default: `num_image_tokens` each; None for a family whose
        count depends on the image size, whose callers always pass the counts); `videos[k]`: the k-th
        item is a video (its steps' timestamps; None: an image), whose tokens are the video token.

        Raises InvalidSample (data/validity.py) for a conversation that is not a usable sample, or
        one whose image tokens would be cut at `max_length` (`too_long`)."""
        conv = check_conversation(conversations, n_images)
        if image_tokens is None and self.num_image_tokens is None and n_images:
            raise ValueError("this ChatTokenizer has no fixed count of visual tokens per image: pass image_tokens (one count per image)")
        counts = [self.num_image_tokens] * n_images if image_tokens is None else list(image_tokens)
        if len(counts) != n_images:
            raise ValueError(f"{len(counts)} image token count(s) for {n_images} image(s)")
        text, spans, _ = self.render(conversations)
        if self.placeholder != IMAGE:  # the model's own image token stands for each <image>; replies move with it
            grow = len(self.placeholder) - len(IMAGE)
            spans = [tuple(i + grow * text[:i].count(IMAGE) for i in span) for span in spans]
            text = text.replace(IMAGE, self.placeholder)
        reply_start = spans[conv.reply_number][0]
        enc = self.tok(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, labels, prompt_len = list(enc["input_ids"]), [], None
        for i, (tid, (a, b)) in enumerate(zip(ids, enc["offset_mapping"])):
            if prompt_len is None and a >= reply_start and b > a:
                prompt_len = i
            supervised = b > a and tid != self.image_token_id and any(s <= a and b <= e for s, e in spans)
            labels.append(tid if supervised else IGNORE)
        item_ids, prefixes = video_layout(self.tok, self.image_token_id, self.video_token_id, videos, self.frame_timestamps)
        expanded, where = expand_images(ids, self.image_token_id, counts, self.image_wrap, item_ids, prefixes)
        expanded_labels = [IGNORE] * len(expanded)  # visual tokens are never supervised
        for i, lab in enumerate(labels):
            expanded_labels[where[i]] = lab if ids[i] != self.image_token_id else IGNORE
        ids, labels = expanded, expanded_labels
        prompt_len = where[len(where) - 1 if prompt_len is None else prompt_len]
        n, truncated = len(ids), len(ids) > self.max_length
        if truncated:
            cut = ids[self.max_length :]
            if self.image_token_id in cut or (self.video_token_id is not None and self.video_token_id in cut) or (
                    self.image_wrap is not None and self.image_wrap[1] in cut):
                raise InvalidSample("too_long", f"sample of {n} tokens would lose image tokens at max_length={self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(lab == IGNORE for lab in labels):
                raise InvalidSample("too_long", f"sample of {n} tokens keeps no supervised token within max_length={self.max_length}")
        return Encoded(ids, labels, min(prompt_len, len(ids)), conv.answer, truncated)


def video_layout(tokenizer, image_token_id: int, video_token_id: int | None, videos: list | None,
                 frame_timestamps: bool) -> tuple[list[int] | None, list | None]:
    """How each item's tokens are written (`expand_images`' item_ids and step_prefixes): `videos[k]` None
    for an image, a video's step timestamps otherwise; a family with `frame_timestamps` (Qwen3-VL) writes
    "<1.5 seconds>" before each step, as transformers' Qwen3VLProcessor does."""
    if not videos:
        return None, None
    if any(v is not None for v in videos) and video_token_id is None:
        raise ValueError("a video, but the model's family takes no video (no video token)")
    item_ids = [image_token_id if v is None else video_token_id for v in videos]
    if not frame_timestamps:
        return item_ids, None
    if any(v is not None and not v for v in videos):
        raise ValueError("this model writes each video step after its timestamp, but a video came without them")
    return item_ids, [None if v is None else [tokenizer(f"<{t:.1f} seconds>", add_special_tokens=False)["input_ids"] for t in v]
                      for v in videos]


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad to the longest sequence, on the right (training) or left (generation)."""
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if left:
                out[i, n - len(s) :] = torch.tensor(s)
            else:
                out[i, : len(s)] = torch.tensor(s)
    return out
