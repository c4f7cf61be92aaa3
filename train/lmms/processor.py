"""Everything besides the weights that evaluation needs: tokenizer, prompt format, image
preprocessing and the ids that end a reply, read from a checkpoint directory the way it was trained."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data.chat import IMAGE, TEMPLATES, image_placeholder, wrap_ids
from data.tokenizer import load_pretrained_tokenizer
from models import MLLMConfig
from models.family import ProcessedImage, ProcessedVideo
from models.original_layout import is_original

from .preprocess import ImageProcessing
from .prompts import PromptEncoder, jinja_template

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")  # a document's visual given as a file path
FAMILY_TEMPLATES = {"llama": "vicuna", "qwen2": "chatml", "qwen2_vl": "chatml", "qwen2_5_vl": "chatml", "qwen3": "chatml",
                    "qwen3_moe": "chatml"}  # data/chat.py template when a checkpoint has none
ORIGINAL_LAYOUT_TEMPLATE = "vicuna_v1"  # the original LLaVA-1.5's and MobileVLM V2's (models/original_layout.py)
CHAT_TEMPLATE_FILE, LEGACY_CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE = "chat_template.jinja", "chat_template.json", "generation_config.json"


@dataclass
class EvalProcessor:
    tokenizer: object
    prompts: PromptEncoder
    images: object  # PIL image -> pixels: ImageProcessing (LLaVA-1.5), or the family's own (LLaVA-NeXT's tiles)
    stop_ids: list[int]  # generation ends at any of these (EOS and the template's end-of-reply token)
    config: MLLMConfig | None = None
    video_sampling: dict | None = None  # how a video file's frames are sampled: {"fps": 2.0} or {"num_frames": n}

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def image(self, image) -> ProcessedImage:
        """One image as the model takes it (pixels and original size) and its visual-token count."""
        out = self.images(image)
        return out if isinstance(out, ProcessedImage) else ProcessedImage(out, (image.height, image.width))

    def video(self, path: str) -> ProcessedVideo:
        """A video file as the model takes it: frames sampled by Qwen's rule (`video_sampling`, 2 per second
        by default) and decoded with PyAV (data/video_files.py), then the family's video preprocessing."""
        from data.video_files import read_video

        from data.frames import frame_times

        if self.config is None or self.config.model_family.video_token is None:
            raise ValueError(f"{path}: a video, but this model's family takes none (the Qwen families do)")
        sampling = self.video_sampling or {"fps": 2.0}
        frames, timing = read_video(path, num_frames=sampling.get("num_frames"), fps=sampling.get("fps"))
        return self.config.model_family.video_processor(self.config)(frames, timing["sampled_fps"], frame_times(timing, len(frames)))

    def visual(self, visual) -> ProcessedImage | ProcessedVideo:
        """A document's visual as the model takes it: a PIL image, or a video file's path (lmms-eval's form)."""
        if isinstance(visual, str) and visual.lower().endswith(VIDEO_EXTENSIONS):
            return self.video(visual)
        if not hasattr(visual, "convert"):
            raise ValueError(f"efficient_mllm takes images and video files, not a {type(visual).__name__} ({str(visual)[:80]})")
        return self.image(visual)

    def tokens(self, images: list[ProcessedImage]) -> list[int]:
        """Each image's (or video's) visual tokens (its size's, for a tiling family; its grid's, for Qwen)."""
        return [self.config.tokens_per_image(im.size) for im in images]

    @classmethod
    def for_training(cls, tokenizer, config: MLLMConfig, chat_template: str, system_prompt: str | None = None) -> "EvalProcessor":
        """What a training run used: its tokenizer, data/chat.py template and image preprocessing."""
        template = _template(chat_template)
        system = template.default_system if system_prompt is None else system_prompt
        stops = [tokenizer.eos_token_id, *_single_token_ids(tokenizer, [template.stop.strip()])]
        return cls._build(tokenizer, config, jinja_template(template, system), images_for(config), stops)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: MLLMConfig,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        pad_to_square: bool | None = None,
    ) -> "EvalProcessor":
        """From a checkpoint directory (llava-hf or our export with its eval files, see export.py).

        Prompt format: `chat_template` (a data/chat.py name) when given, else the directory's chat
        template, else the data/chat.py template of the LLM family. `system_prompt` applies to
        data/chat.py templates (default: the template's own)."""
        path = Path(path)
        tokenizer = load_pretrained_tokenizer(path, config.model_family.image_wrap or (), config.image_token_id)
        try:
            image_placeholder(tokenizer, config.image_token_id)
        except ValueError:
            raise ValueError(f"{path}: the tokenizer maps {IMAGE} to {tokenizer.convert_tokens_to_ids(IMAGE)} but config.json says "
                             f"the image token is {config.image_token_id}, which is no special token of the tokenizer") from None
        stops = [tokenizer.eos_token_id, *_generation_eos(path)]
        jinja = None if chat_template else (tokenizer.chat_template or _legacy_chat_template(path))
        if jinja is None:
            template = _template(chat_template or _default_template(path, config))
            system = template.default_system if system_prompt is None else system_prompt
            jinja = jinja_template(template, system)
            stops += _single_token_ids(tokenizer, [template.stop.strip()])
        elif system_prompt is not None:
            raise ValueError(f"system_prompt applies to data/chat.py templates; {path} has its own chat template (pass chat_template=<name> to replace it)")
        images = images_for(config) if config.model_family.variable_tokens else ImageProcessing.from_pretrained(path, config, pad_to_square)
        return cls._build(tokenizer, config, jinja, images, stops)

    @classmethod
    def _build(cls, tokenizer, config: MLLMConfig, jinja: str, images, stops: list[int]) -> "EvalProcessor":
        fixed = None if config.model_family.variable_tokens else config.num_image_tokens
        video = config.token_ids.get("video_token_id") if config.model_family.video_token is not None else None
        prompts = PromptEncoder(tokenizer, jinja, config.image_token_id, fixed, wrap_ids(tokenizer, config.model_family.image_wrap), video,
                                config.model_family.frame_timestamps)
        return cls(tokenizer, prompts, images, sorted({s for s in stops if s is not None}), config)


def images_for(config: MLLMConfig):
    """Training's preprocessing for `config`: LLaVA-1.5's pad-to-square as `ImageProcessing` (it
    round-trips through preprocessor_config.json), or the family's own processor (LLaVA-NeXT:
    transformers' LlavaNextImageProcessorPil with the checkpoint's pinpoints)."""
    if config.model_family.variable_tokens:
        return config.model_family.image_processor(config)
    return ImageProcessing.for_model(config)


def _default_template(path: Path, config: MLLMConfig) -> str:
    """The data/chat.py template of a checkpoint that has no chat template of its own: LLaVA's
    `vicuna_v1` for the original layout, else the LLM family's."""
    if is_original(json.loads((path / "config.json").read_text())):
        return ORIGINAL_LAYOUT_TEMPLATE
    return FAMILY_TEMPLATES[config.text_family]


def _template(name: str):
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)} (data/chat.py)")
    return TEMPLATES[name]


def _single_token_ids(tokenizer, texts: list[str]) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in texts if t and t in vocab]


def _legacy_chat_template(path: Path) -> str | None:
    """Processor chat templates of older llava-hf revisions (`chat_template.json`)."""
    file = path / LEGACY_CHAT_TEMPLATE_FILE
    return json.loads(file.read_text()).get("chat_template") if file.is_file() else None


def _generation_eos(path: Path) -> list[int]:
    file = path / GENERATION_CONFIG_FILE
    if not file.is_file():
        return []
    eos = json.loads(file.read_text()).get("eos_token_id")
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
