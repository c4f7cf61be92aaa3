"""lmms-eval model `efficient_mllm`: a llava-format checkpoint evaluated under any visual-compute plan.

    python -m lmms_eval --model efficient_mllm \\
        --model_args pretrained=<dir>,arch=fastv,dtype=bfloat16,device=cuda,batch_size=8 \\
        --tasks pope,gqa,mme

model_args: `pretrained` (a llava-hf download or one of our exports, loaded with MLLM.from_pretrained),
`vision_tower` (the CLIP directory of a checkpoint in the original LLaVA layout, e.g. LLaVA-1.5's or
MobileVLM V2's release; see models/original_layout.py),
`arch` (preset name in conf/arch/, a plan .yaml file, or `a+b`; default: the plan saved in the
checkpoint, dense for llava-hf), `dtype` (auto|float32|bfloat16|float16), `device`, `batch_size`
(model_args win over the CLI's --batch_size), `chat_template` (a data/chat.py template name instead
of the checkpoint's own), `system_prompt` (with a data/chat.py template), `pad_to_square`
(true|false; default from preprocessor_config.json, see preprocess.py), `video_fps` (frames sampled per
second of a video document, 2 by default) or `video_frames` (frames per video): a document's visual may be
a video file's path (lmms-eval's video tasks), decoded here with PyAV (the `video` extra) for a family that
takes video (docs/video.md).

Generation is greedy with the plan's KV cache; `loglikelihood` scores continuations through the same
prefill + decode path (scoring.py). Registered via the `lmms_eval.models` entry point in pyproject.toml.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

import torch

from data.batch import collate_images, collate_step_seconds
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from tqdm import tqdm

from models import MLLM
from models.family import ProcessedVideo

from .compat import alias_filelock_api
from .plans import plan_for_checkpoint
from .processor import EvalProcessor
from .scoring import continuation_logprobs, generate

alias_filelock_api()  # before simple_evaluate reaches lmms-eval's filelock patch (compat.py)
log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava_hf default when a task gives none


class EfficientMLLM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        vision_tower: str | None = None,
        arch: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        pad_to_square: bool | str | None = None,
        video_fps: float | str | None = None,
        video_frames: int | str | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"efficient_mllm: unknown model_args {sorted(unknown)}; valid: pretrained, vision_tower, arch, dtype, device, "
                "batch_size, chat_template, system_prompt, pad_to_square, video_fps, video_frames"
            )
        if video_fps is not None and video_frames is not None:
            raise ValueError("efficient_mllm: give video_fps or video_frames, not both")
        if not pretrained:
            raise ValueError("efficient_mllm needs --model_args pretrained=<checkpoint directory> (llava-hf or our export)")
        batch_size, device, pad_to_square = _batch_size(batch_size), _device(device), _bool(pad_to_square)  # fail before loading
        model = MLLM.from_pretrained(pretrained, dtype=_dtype(dtype, device), vision_tower=vision_tower)
        if arch:
            loaded = set(model.state_dict())
            model.set_plan(plan_for_checkpoint(str(arch), model.config))
            new = sorted({k.rsplit(".", 1)[0] for k in model.state_dict() if k not in loaded})  # gated blocks, routers
            if new:
                raise ValueError(f"efficient_mllm: arch={arch} adds parameters that {pretrained} does not have ({', '.join(new[:4])}): "
                                 "they need training first (python -m train stage=finetune model.pretrained=... arch=...)")
        processor = EvalProcessor.from_pretrained(pretrained, model.config, chat_template, system_prompt, pad_to_square)
        processor.video_sampling = {"num_frames": int(video_frames)} if video_frames is not None else {"fps": float(video_fps or 2.0)}
        log.info("efficient_mllm: %s, plan %s, %s, images %s", pretrained, model.plan.name, model.dtype, processor.images)
        self._bind(model.to(device).eval(), processor, batch_size)

    @classmethod
    def from_model(cls, model: MLLM, processor: EvalProcessor, batch_size: int = 1) -> "EfficientMLLM":
        """Wrap a model that is already loaded (e.g. at the end of training) with its processor."""
        self = cls.__new__(cls)
        lmms.__init__(self)
        self._bind(model.eval(), processor, batch_size)
        return self

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "EfficientMLLM":
        """As lmms.create_from_arg_string, but `--model_args batch_size=...` overrides the CLI's
        --batch_size (the base class passes both and fails on the duplicate)."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**extra, **args)

    def _bind(self, model: MLLM, processor: EvalProcessor, batch_size: int | str) -> None:
        self._model = model
        self.processor = processor
        self.batch_size_per_gpu = _batch_size(batch_size)

    @property
    def model(self) -> MLLM:
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._model.lm_head.weight.device

    # --- requests ----------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        """Greedy answers, batched per task generation settings, cut at the task's `until` strings."""
        answers: list[str | None] = [None] * len(requests)
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="efficient_mllm generate")
        for indices in groups.values():
            _, gen_kwargs, _, _, task, _ = requests[indices[0]].args
            max_new_tokens, until = _greedy_settings(gen_kwargs, task)
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for batch in _chunks(indices, self.batch_size):
                prompts, pixels = [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    images = self._visuals(doc_to_visual, task, split, doc_id)
                    prompts.append(self.processor.prompts.encode(context, len(images), self.processor.tokens(images), _videos(images)))
                    pixels += images
                pixel_values, sizes, seconds = self._pixel_values(pixels)
                new = generate(self.model, prompts, pixel_values, max_new_tokens, self.processor.stop_ids, self.processor.pad_id, sizes,
                               seconds)
                for i, ids in zip(batch, new):
                    answers[i] = _cut(self.tokenizer.decode(ids, skip_special_tokens=True), until)
                bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """Per request `(negative log-likelihood of the continuation, is it the greedy continuation)`.

        The first value is the summed NLL, not the log-probability the base class docstring names:
        lmms-eval 0.7 picks a multiple-choice answer with argmin over it (lmms_eval/api/task.py,
        `multiple_choice`; EvolvingLMMs-Lab/lmms-eval#370), because its adapters return losses.
        Summed (not averaged) so that `acc_norm` (divided by the choice's length in characters) is
        lm-eval's definition. Each pair travels as `GenerationResult.text`: lmms-eval 0.7.3's
        evaluator turns any other non-string response into its str() (api/instance.py,
        `unwrap_generation_output`), which breaks multiple-choice scoring."""
        results: list[GenerationResult | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="efficient_mllm loglikelihood")
        for batch in _chunks(order, self.batch_size):
            prompts, continuations, pixels = [], [], []
            for i in batch:
                if len(requests[i].args) != 6:
                    raise NotImplementedError("efficient_mllm scores continuations of a document's prompt; unconditional requests (acc_mutual_info) are not supported")
                context, target, doc_to_visual, doc_id, task, split = requests[i].args
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                if not isinstance(continuation, str):
                    raise ValueError(f"task {task}: the loglikelihood target must be a string, got {continuation!r}")
                images = self._visuals(doc_to_visual, task, split, doc_id)
                prompt = self.processor.prompts.render(context, len(images))
                prompts.append(self.processor.prompts.expand(self.processor.prompts.tokenize(prompt), self.processor.tokens(images),
                                                             _videos(images)))
                continuations.append(self.processor.prompts.continuation(prompt, continuation))
                pixels += images
            pixel_values, sizes, seconds = self._pixel_values(pixels)
            scores = continuation_logprobs(self.model, prompts, continuations, pixel_values, self.processor.pad_id, sizes, seconds)
            for i, (logprob, greedy) in zip(batch, scores):
                results[i] = GenerationResult(text=(-logprob, greedy))
            bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "efficient_mllm does not implement generate_until_multi_round (multi-round tasks); evaluate single-round tasks"
        )

    # --- helpers -----------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        """A document's images and videos (PIL images, video file paths) as the model takes them."""
        if doc_to_visual is None:
            return []
        visuals = list(_flatten(doc_to_visual(self.task_dict[task][split][doc_id])))
        try:
            return [self.processor.visual(v) for v in visuals]
        except ValueError as e:
            raise ValueError(f"task {task}: {e}") from None

    def _pixel_values(self, images: list) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The batch's pixel values, image sizes and (with videos) seconds per step, laid out as training
        batches them (data.batch)."""
        sample = {"pixel_values": [im.pixels for im in images], "image_sizes": [im.size for im in images],
                  "step_seconds": [getattr(im, "step_seconds", 0.0) for im in images]}
        pixels, sizes = collate_images([sample])
        if pixels is None:
            return None, None, None
        seconds = collate_step_seconds([sample])
        return pixels.to(self.device, self.model.dtype), sizes.to(self.device), None if seconds is None else seconds.to(self.device)


def _videos(items: list) -> list[tuple[float, ...] | None]:
    """For each of a document's processed visuals: None for an image, a video's step timestamps."""
    return [item.timestamps if isinstance(item, ProcessedVideo) else None for item in items]


def _greedy_settings(gen_kwargs: dict, task: str) -> tuple[int, list[str]]:
    """`(max_new_tokens, until)`; fails on sampling or beam search, which this model does not do."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature") or 0)
    do_sample = gen_kwargs.get("do_sample")
    sampling = bool(do_sample) if do_sample is not None else temperature > 0
    beams = int(gen_kwargs.get("num_beams") or 1)
    if sampling or beams != 1:
        raise ValueError(
            f"task {task}: efficient_mllm decodes greedily, but the task asks for temperature={temperature}, "
            f"do_sample={do_sample}, num_beams={beams}; run with --gen_kwargs temperature=0,do_sample=False,num_beams=1"
        )
    return int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), [u for u in until if u]


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


def _chunks(items: list, n: int):
    for start in range(0, len(items), n):
        yield items[start : start + n]


def _flatten(visuals):
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        elif v is not None:
            yield v


def _batch_size(value: int | str) -> int:
    if not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"efficient_mllm: batch_size must be a positive integer, got {value!r} ('auto' is not supported)")
    return int(value)


def _device(device: str | None) -> str:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # one process per GPU (accelerate launch)
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"efficient_mllm: dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _bool(value: bool | str | None) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"efficient_mllm: pad_to_square must be true or false, got {value!r}")
