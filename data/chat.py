"""Chat templates per model family, tokenisation with `<image>` expansion, and label masking.

The full conversation is rendered to one string and tokenised once; labels are kept only for
tokens whose characters fall inside assistant replies (found through the tokenizer's offset
mapping). Tokenising the whole string at once avoids the boundary mismatches that per-turn
tokenisation produces with BPE tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE = "<image>"
IGNORE = -100
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
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


TEMPLATES = {
    # LLaVA-1.5 conv_vicuna_v1: "<sys> USER: ... ASSISTANT: reply</s>"
    "vicuna": Template("vicuna", "{system} ", "USER: {text} ", "ASSISTANT:", "</s>", VICUNA_SYSTEM),
    # Qwen2 / ChatML
    "chatml": Template(
        "chatml",
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{text}<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
        "You are a helpful assistant.",
    ),
    # LLaVA stage-1 (caption pretraining): the image, then the caption; the question text is dropped
    "plain": Template("plain", "", "{text}", "", "\n"),
}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens before the last reply (the generation prompt for evaluation)
    answer: str  # the last reply's text
    truncated: bool


def render(t: Template, system: str, conversations: list[dict]) -> tuple[str, list[tuple[int, int]], int]:
    """Text, character spans of supervised replies, and where the last reply starts."""
    parts = [t.system_fmt.format(system=system)] if system and t.system_fmt else []
    spans, last_start = [], 0
    for turn in conversations:
        role, value = turn["from"], turn["value"]
        if role in ("human", "user"):
            if t.name == "plain":  # LLaVA stage 1 keeps only the image of the human turn
                value = IMAGE if IMAGE in value else ""
            parts.append(t.user_fmt.format(text=value))
        elif role in ("gpt", "assistant"):
            parts.append(t.assistant_prefix)
            start = sum(map(len, parts))
            reply = (" " if t.name == "vicuna" else "") + value + t.stop
            parts.append(reply)
            last_start = start
            spans.append((start, start + len(reply)))
        elif role != "system":
            raise ValueError(f"unknown conversation role {role!r} (expected human/gpt)")
    return "".join(parts), spans, last_start


class ChatTokenizer:
    """Turns LLaVA `conversations` into model inputs for one template and tokenizer."""

    def __init__(self, tokenizer, template: str, num_image_tokens: int, max_length: int, system: str | None = None):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; choose one of {sorted(TEMPLATES)}")
        self.tok = tokenizer
        self.template = TEMPLATES[template]
        self.system = self.template.default_system if system is None else system
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE} token; add it as a special token (tokenizer.add_special_tokens)")

    def render(self, conversations: list[dict]) -> tuple[str, list[tuple[int, int]], int]:
        return render(self.template, self.system, conversations)

    def encode(self, conversations: list[dict], has_image: bool = True) -> Encoded:
        text, spans, last_start = self.render(conversations)
        n_placeholders = text.count(IMAGE)
        if n_placeholders != int(has_image):
            raise ValueError(f"conversation has {n_placeholders} {IMAGE} placeholders but {int(has_image)} image(s)")
        enc = self.tok(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, labels, prompt_len = [], [], None
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if prompt_len is None and a >= last_start and b > a and spans:
                prompt_len = len(ids)
            supervised = b > a and any(s <= a and b <= e for s, e in spans)
            if tid == self.image_token_id:
                ids.extend([tid] * self.num_image_tokens)
                labels.extend([IGNORE] * self.num_image_tokens)
            else:
                ids.append(tid)
                labels.append(tid if supervised else IGNORE)
        truncated = len(ids) > self.max_length
        if truncated:
            if self.image_token_id in ids[self.max_length :]:
                raise ValueError(f"sample of {len(ids)} tokens would lose image tokens at max_length={self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        answer = conversations[-1]["value"] if conversations and conversations[-1]["from"] in ("gpt", "assistant") else ""
        return Encoded(ids, labels, prompt_len if prompt_len is not None else len(ids), answer, truncated)


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
