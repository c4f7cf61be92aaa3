"""lmms-eval's `efficient_mllm` on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE: an export carries Qwen2VLImageProcessor's
preprocessor_config.json (the pixel bounds), the bridge writes `<|vision_start|>` + one placeholder
per token + `<|vision_end|>` into the prompt, and its greedy answers equal transformers'
`generate` on the same prompts with the pixels transformers' own image processor reads from the
export (PIL only: `Qwen2VLProcessor` needs torchvision)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from models import MLLM
from tests.helpers import QWEN_TOKENS, qwen_images, qwen_word_tokenizer, tiny_qwen3_5_config, tiny_qwen3_vl_config, tiny_qwen_config
from tests.test_qwen2_vl import HF_CLASSES
from tests.test_qwen3_5 import HF_CLASSES as QWEN3_5_CLASSES
from tests.test_qwen3_vl import HF_CLASSES as QWEN3_CLASSES

CONFIGS = {"qwen2_vl": lambda: tiny_qwen_config("qwen2_vl"), "qwen2_5_vl": lambda: tiny_qwen_config("qwen2_5_vl"),
           "qwen3_vl": lambda: tiny_qwen3_vl_config(), "qwen3_vl_moe": lambda: tiny_qwen3_vl_config(moe=True),
           "qwen3_5": lambda: tiny_qwen3_5_config(), "qwen3_5_moe": lambda: tiny_qwen3_5_config(moe=True)}
from train.lmms.export import write_eval_files
from train.lmms.processor import EvalProcessor
from train.lmms.scoring import generate


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_bridge_answers_equal_transformers_generate(tmp_path, family):
    torch.manual_seed(0)
    ours = MLLM.from_config(CONFIGS[family]()).eval()
    export = ours.save_pretrained(tmp_path / "export")
    tokenizer = qwen_word_tokenizer()
    tokenizer.save_pretrained(export)
    write_eval_files(export, "chatml", "", tokenizer)

    processor = EvalProcessor.from_pretrained(export, MLLM.from_pretrained(export).config)
    hf_images = Qwen2VLImageProcessorPil.from_pretrained(export)  # what transformers reads of our export
    hf = (HF_CLASSES | QWEN3_CLASSES | QWEN3_5_CLASSES)[family].from_pretrained(export).eval()
    start, end = QWEN_TOKENS["vision_start_token_id"], QWEN_TOKENS["vision_end_token_id"]
    for image, question in zip(qwen_images(), ["w15 w16", "w17", "w8 w9 w10"]):
        ours_image = processor.image(image)
        theirs = hf_images(images=[image], return_tensors="pt")
        assert torch.equal(ours_image.pixels, theirs["pixel_values"]) and list(ours_image.size) == theirs["image_grid_thw"][0].tolist()
        ids = processor.prompts.encode(question, 1, processor.tokens([ours_image]))
        n = int(theirs["image_grid_thw"].prod()) // 4
        first = ids.index(start)
        assert ids[first : first + n + 2] == [start, *[ours.config.image_token_id] * n, end]
        answer = generate(ours, [ids], ours_image.pixels, 6, processor.stop_ids, processor.pad_id, image_sizes=theirs["image_grid_thw"])[0]
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            want = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **theirs,
                               mm_token_type_ids=(input_ids == ours.config.image_token_id).long(), max_new_tokens=6,
                               do_sample=False, eos_token_id=processor.stop_ids, pad_token_id=processor.pad_id)[0, len(ids):].tolist()
        stops = set(processor.stop_ids)
        want = want[: next((i for i, t in enumerate(want) if t in stops), len(want))]
        assert answer == want and len(answer) > 0


def test_a_checkpoint_tokenizer_without_image_prompts_with_its_image_pad(tmp_path):
    """Qwen checkpoints' tokenizers have `<|image_pad|>` (the model's image token) and no `<image>`: the
    bridge writes each image of a prompt as vision start, that token per visual token, vision end."""
    ours = MLLM.from_config(tiny_qwen_config()).eval()
    export = ours.save_pretrained(tmp_path / "export")
    tokenizer = qwen_word_tokenizer("<|image_pad|>")
    tokenizer.save_pretrained(export)
    write_eval_files(export, "chatml", "", tokenizer)
    processor = EvalProcessor.from_pretrained(export, ours.config)
    image = processor.image(qwen_images()[0])
    ids = processor.prompts.encode("w10 w11", 1, processor.tokens([image]))
    n = processor.tokens([image])[0]
    first = ids.index(QWEN_TOKENS["vision_start_token_id"])
    assert ids[first : first + n + 2] == [4, *[3] * n, 5] and ids.count(3) == n
