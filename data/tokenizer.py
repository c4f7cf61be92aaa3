"""Tokenizers: a checkpoint's own, or a small byte-level BPE trained locally on the task's text.

The trained tokenizer fixes the special-token ids the `tiny` presets rely on:
`<pad>`=0, `<s>`=1, `</s>`=2, `<image>`=3, then a family's image-wrapping tokens (InternVL's
`<img>`=4, `</img>`=5) when it has them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .locking import locked

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]


def task_special_ids(extra_special: tuple[str, ...] = ()) -> dict[str, int]:
    """The ids a task tokenizer (`train_bpe`) gives its special tokens: the fixed ones, then `extra_special`."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + list(extra_special))}


def train_bpe(texts: list[str], vocab_size: int, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: any text encodes, decoding is exact) that prepends `<s>`;
    `extra_special` tokens follow the fixed ones."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", additional_special_tokens=["<image>", *extra_special]
    )


def template_corpus(template, system: str, texts: list[str]) -> list[str]:
    """Task text rendered the way the model will see it (as a first turn after `<image>`, and as a
    later turn), so the BPE merges whole words in both contexts."""
    from .chat import IMAGE, render

    out = []
    for t in texts:
        for question in (f"{IMAGE}\n{t}", t):
            out.append(render(template, system, [{"from": "human", "value": question}, {"from": "gpt", "value": t}])[0])
    return out


def load_or_train(directory: str | Path, texts_fn, vocab_size: int, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Reuse the tokenizer saved in `directory`, or train one on `texts_fn()` and save it there."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        with locked(directory):  # every rank of a job starts here: one trains, the others wait
            if not (directory / "tokenizer.json").exists():
                tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
                try:
                    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
                    train_bpe(texts_fn(), vocab_size, extra_special).save_pretrained(tmp)
                    tmp.replace(directory)  # atomic: a half-written tokenizer is never picked up
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return AutoTokenizer.from_pretrained(directory)


def load_pretrained_tokenizer(path: str | Path, extra_special: tuple[str, ...] = (), image_token_id: int | None = None):
    """A checkpoint's tokenizer; `<image>` (and a family's `extra_special` tokens) are added when
    missing (llava-hf tokenizers already have `<image>`, InternVL's `<img>` and `</img>`), except when
    the model's `image_token_id` is the tokenizer's unknown token: the original LLaVA layout's placeholder
    (models/original_layout.py), whose vocabulary has no room for another token."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path)
    placeholder_is_unk = image_token_id is not None and image_token_id == tok.unk_token_id
    missing = [t for t in ("<image>", *extra_special) if t not in tok.get_vocab() and not (t == "<image>" and placeholder_is_unk)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def task_tokenizer(texts_fn, template, system: str, vocab_size: int, cache_root: str | Path,
                   extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A BPE for a model without a tokenizer, trained on the task's text as the chat `template` renders
    it and cached under `cache_root` by the content it was trained on (so a changed task or vocabulary
    gets its own tokenizer)."""

    def corpus() -> list[str]:
        return template_corpus(template, system, texts_fn())

    key = [corpus(), vocab_size] + ([list(extra_special)] if extra_special else [])  # unchanged digests without extras
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return load_or_train(Path(cache_root) / f"tokenizer-{digest}", corpus, vocab_size, extra_special)
