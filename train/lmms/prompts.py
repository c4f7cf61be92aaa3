"""Evaluation prompts: a question and its images -> the token ids the model was trained to answer.

Prompts go through a Jinja chat template in the Hugging Face message format (a user message whose
content is image parts then a text part): the checkpoint's own template when it has one (llava-hf
ships one), else one generated from our data/chat.py template, which renders exactly what training
rendered (`jinja_template`). `<image>` placeholders are expanded to the model's visual-token count,
as data.chat.ChatTokenizer does for training.
"""

from __future__ import annotations

from data.chat import IMAGE, Template, expand_images, image_placeholder, video_layout

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"


def _literal(text: str) -> str:
    """A Jinja string literal for `text`."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def jinja_template(template: Template, system: str) -> str:
    """An HF chat template that renders messages like data.chat.render(template, system, ...).

    `system` is the default system prompt (the one used in training); a leading system message
    replaces it. Image parts become `<image>\\n`, as in LLaVA's training data."""
    if template.name == "plain":
        raise ValueError("the 'plain' template (LLaVA stage-1 captioning) drops the question text; such a model cannot be evaluated on VQA tasks")
    sys_pre, sys_post = template.system_fmt.split("{system}")
    user_pre, user_post = template.user_fmt.split("{text}")
    return "".join([
        "{%- set ns = namespace(text='') -%}",
        "{%- if not messages or messages[0]['role'] != 'system' -%}",
        f"{{%- set default = {_literal(system)} -%}}",
        f"{{%- if default -%}}{{{{ {_literal(sys_pre)} ~ default ~ {_literal(sys_post)} }}}}{{%- endif -%}}",
        "{%- endif -%}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}",
        "{%- else -%}{%- set ns.text = '' -%}{%- for part in message['content'] -%}",
        f"{{%- if part['type'] == 'image' -%}}{{%- set ns.text = ns.text ~ {_literal(IMAGE + chr(10))} -%}}",
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text ~ part['text'] -%}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        f"{{%- if message['role'] == 'system' -%}}{{%- if ns.text -%}}{{{{ {_literal(sys_pre)} ~ ns.text ~ {_literal(sys_post)} }}}}{{%- endif -%}}",
        f"{{%- elif message['role'] == 'user' -%}}{{{{ {_literal(user_pre)} ~ ns.text ~ {_literal(user_post)} }}}}",
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{ {_literal(template.assistant_prefix + template.reply_lead)} ~ ns.text ~ {_literal(template.stop)} }}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{ {_literal(template.assistant_prefix)} }}}}{{%- endif -%}}",
    ])


class PromptEncoder:
    """Renders a question with `n_images` images through `chat_template` and tokenises it."""

    def __init__(self, tokenizer, chat_template: str, image_token_id: int, num_image_tokens: int | None,
                 image_wrap: tuple[int, int] | None = None, video_token_id: int | None = None, frame_timestamps: bool = False):
        self.tok = tokenizer
        self.chat_template = chat_template
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.image_wrap = image_wrap  # ids written around each image's tokens (InternVL's <img>, </img>, Qwen's vision start / end)
        self.placeholder = image_placeholder(tokenizer, image_token_id)  # what <image> is tokenised as
        self.video_token_id = video_token_id  # what a video's tokens are written as (Qwen's <|video_pad|>)
        self.frame_timestamps = frame_timestamps  # a video's steps written apart after their timestamps (Qwen3-VL)

    def render(self, text: str, n_images: int) -> str:
        """The prompt string, ending where the assistant's reply begins.

        `<image>` placeholders already in `text` (some tasks write them) are kept; otherwise one image
        part per image precedes the text. Templates that only read string content (they would print
        the parts list) get `<image>\\n` per image before the text instead."""
        inline = text.count(IMAGE)
        if inline not in (0, n_images):
            raise ValueError(f"the prompt has {inline} {IMAGE} placeholders but the document has {n_images} image(s)")
        parts = [] if inline else [{"type": "image"}] * n_images
        prompt = self._apply([{"role": USER, "content": [*parts, {"type": "text", "text": text}]}])
        if prompt.count(IMAGE) != n_images or "'type':" in prompt:
            prompt = self._apply([{"role": USER, "content": (IMAGE + "\n") * (n_images - inline) + text}])
        if prompt.count(IMAGE) != n_images:
            raise ValueError(f"the chat template rendered {prompt.count(IMAGE)} {IMAGE} placeholders for {n_images} image(s): {prompt!r}")
        return prompt

    def _apply(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered string; BOS is added unless the template already wrote it."""
        bos = self.tok.bos_token
        add_special = not (bos and text.startswith(bos))
        text = text.replace(IMAGE, self.placeholder)
        return list(self.tok(text, add_special_tokens=add_special)["input_ids"])

    def encode(self, text: str, n_images: int, image_tokens: list[int] | None = None, videos: list | None = None) -> list[int]:
        """Prompt ids of a question with `n_images` images or videos (each `<image>` expanded to its count;
        `videos[k]`: None for an image, a video's step timestamps)."""
        return self.expand(self.tokenize(self.render(text, n_images)), image_tokens, videos)

    def expand(self, ids: list[int], image_tokens: list[int] | None = None, videos: list | None = None) -> list[int]:
        """The k-th `<image>` id repeated `image_tokens[k]` times (default: `num_image_tokens` each; a video's
        as the video token), between the family's wrapping tokens if it has them: the model's input layout,
        through the same function as training (data.chat.expand_images)."""
        if image_tokens is None and self.num_image_tokens is None and self.image_token_id in ids:
            raise ValueError("this model's images have as many tokens as their size needs: pass image_tokens")
        counts = [self.num_image_tokens] * ids.count(self.image_token_id) if image_tokens is None else image_tokens
        item_ids, prefixes = video_layout(self.tok, self.image_token_id, self.video_token_id, videos, self.frame_timestamps)
        return expand_images(ids, self.image_token_id, counts, self.image_wrap, item_ids, prefixes)[0]

    def continuation(self, prompt: str, continuation: str) -> list[int]:
        """Ids of `continuation` right after `prompt`: tokenise both together and cut at the prompt's
        length (how lm-eval splits them, so BPE merges across the boundary are scored as the model reads them)."""
        whole, head = self.tokenize(prompt + continuation), self.tokenize(prompt)
        ids = whole[len(head) :]
        if not ids:
            raise ValueError(f"continuation {continuation!r} has no tokens after the prompt")
        return ids
