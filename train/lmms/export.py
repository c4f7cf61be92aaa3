"""The files an export needs so that evaluation prompts and preprocesses it exactly as training did.

An export (config.json + safetensors + the tokenizer) alone does not say which chat template,
system prompt and image preprocessing the model was trained with. `write_eval_files` adds them in
the files transformers and llava-hf checkpoints use, so `EvalProcessor.from_pretrained`, lmms-eval's
`efficient_mllm` model and transformers' LlavaProcessor read them the same way:

* `preprocessor_config.json`: LlavaImageProcessor fields (pad to square with the mean colour, resize
  to the tower's image size, mean/std), i.e. the llava family's `PadToSquare` (models/families/llava.py);
  a tiling family's own transformers image processor (LlavaNextImageProcessor, GotOcr2ImageProcessor);
* `chat_template.jinja`: the data/chat.py template with the training system prompt baked in;
* `generation_config.json`: `eos_token_id` = EOS and the template's end-of-reply token.
"""

from __future__ import annotations

import json
from pathlib import Path

from models import MLLMConfig
from models.original_layout import read_config

from .preprocess import PREPROCESSOR_FILE, ImageProcessing
from .processor import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, EvalProcessor


def preprocessor_fields(config: MLLMConfig) -> dict:
    """What preprocessor_config.json holds: LlavaImageProcessor fields (pad to square) for LLaVA-1.5,
    the family's transformers image processor's own for the others (LLaVA-NeXT: LlavaNextImageProcessor,
    InternVL: GotOcr2ImageProcessor with crop_to_patches)."""
    family = config.model_family
    if not family.variable_tokens:
        return ImageProcessing.for_model(config).to_dict()
    processor = family.image_processor(config).processor
    fields = processor.to_dict()
    fields.pop("do_pad", None)  # transformers pads the tiles of a batch itself
    return {**fields, "image_processor_type": type(processor).__name__.removesuffix("Pil"), "processor_class": family.hf_processor_class}


def write_eval_files(export_dir: str | Path, chat_template: str, system_prompt: str | None = None, tokenizer=None) -> list[Path]:
    """Write the eval files into `export_dir` (a `save_pretrained` directory); returns their paths.

    `chat_template` / `system_prompt`: the training run's `model.chat_template` / `model.system_prompt`
    (None = the template's default system prompt). `tokenizer`: the run's tokenizer (default: the one
    saved in `export_dir`)."""
    export_dir = Path(export_dir)
    config_file = export_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{export_dir} has no config.json; call write_eval_files after save_pretrained")
    config = MLLMConfig.from_hf(read_config(export_dir))  # an original-layout export names its own tower
    if tokenizer is None:
        if not (export_dir / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"{export_dir} has no tokenizer; save it there first (tokenizer.save_pretrained) or pass tokenizer=")
        from data.tokenizer import load_pretrained_tokenizer

        tokenizer = load_pretrained_tokenizer(export_dir, config.model_family.image_wrap or (), config.image_token_id)
    processor = EvalProcessor.for_training(tokenizer, config, chat_template, system_prompt)
    files = {
        PREPROCESSOR_FILE: json.dumps(preprocessor_fields(config), indent=2) + "\n",
        CHAT_TEMPLATE_FILE: processor.prompts.chat_template,
        GENERATION_CONFIG_FILE: json.dumps(
            {"eos_token_id": processor.stop_ids, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}, indent=2
        ) + "\n",
    }
    written = []
    for name, text in files.items():
        (export_dir / name).write_text(text)
        written.append(export_dir / name)
    return written
