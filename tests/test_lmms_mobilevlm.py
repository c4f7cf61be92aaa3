"""lmms-eval's `efficient_mllm` on MobileVLM V2: the bridge loads an export in the original LLaVA layout
(its tower's CLIP directory inside), prompts with MobileVLM's `v1` conversation, preprocesses as
MobileVLM does (pad to a square with the mean colour, then the tower directory's CLIPImageProcessor) and
answers exactly what the independent reference (tests/mobilevlm_reference.py: transformers' CLIP and
Llama, a re-implemented LDPv2) generates greedily on the same prompt."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from models import MLLM
from models.families.llava import expand_to_square
from tests.helpers import tiny_mobilevlm_config
from tests.mobilevlm_reference import ReferenceMobileVLM
from tests.test_lmms_next import word_tokenizer
from train.lmms.export import write_eval_files
from train.lmms.model import EfficientMLLM
from train.lmms.scoring import generate


def test_bridge_answers_equal_the_reference_generate(tmp_path):
    torch.manual_seed(0)
    ours = MLLM.from_config(tiny_mobilevlm_config()).eval()
    torch.nn.init.normal_(ours.multi_modal_projector.peg.weight, std=0.5)
    export = ours.save_pretrained(tmp_path / "export")
    tokenizer = word_tokenizer(ours.config.image_token_id)  # the template's own words read as <unk> (100)
    tokenizer.save_pretrained(export)
    write_eval_files(export, "vicuna_v1", "", tokenizer)

    bridge = EfficientMLLM(pretrained=str(export), device="cpu", dtype="float32")
    processor = bridge.processor
    reference = ReferenceMobileVLM(export)
    clip = CLIPImageProcessorPil.from_pretrained(export / "vision_tower")  # the tower directory's own processor
    rng = np.random.default_rng(0)
    for (h, w), question in zip(((40, 70), (64, 64), (90, 50)), ["w5 w6", "w7", "w8 w9 w10"]):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        pixels = processor.image(image).pixels
        padded = expand_to_square(image, tuple(int(255 * m) for m in clip.image_mean))  # MobileVLM: image_aspect_ratio pad
        assert torch.allclose(pixels, torch.from_numpy(clip(padded, return_tensors="np")["pixel_values"][0]), atol=1e-6)
        ids = processor.prompts.encode(question, 1)
        assert processor.prompts.render(question, 1) == f"USER: <image>\n{question} ASSISTANT:"
        assert ids.count(3) == 144
        answer = generate(bridge.model, [ids], pixels[None], 6, processor.stop_ids, processor.pad_id)[0]
        prompt = torch.tensor([ids])
        want = reference.generate(prompt, torch.ones_like(prompt), pixels[None], 6, eos_token_id=processor.stop_ids)[0].tolist()
        stops = set(processor.stop_ids)
        assert answer == want[: next((i for i, t in enumerate(want) if t in stops), len(want))]
