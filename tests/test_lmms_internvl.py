"""lmms-eval's `efficient_mllm` on InternVL: an export carries GotOcr2ImageProcessor's
preprocessor_config.json (crop_to_patches), and the bridge's prompts, pixels and greedy answers equal
what transformers gives on the same prompts: the image processor read from our export, the placeholders
of `InternVLProcessor.replace_image_token` (`<img>` + 16 per tile + `</img>`: InternVLProcessor itself
needs torchvision) and `InternVLForConditionalGeneration.generate`."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.processing_internvl import InternVLProcessor

from models import MLLM
from tests.helpers import internvl_images, tiny_internvl_config
from train.lmms.export import write_eval_files
from train.lmms.processor import EvalProcessor
from train.lmms.scoring import generate


def word_tokenizer(image_token_id: int) -> PreTrainedTokenizerFast:
    """Words w6..w99, the specials and InternVL's <img> / </img>; the template's own words read as <unk>."""
    specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": image_token_id, "<img>": 4, "</img>": 5, "<unk>": 100}
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(6, 100)} | specials, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<image>", "<img>", "</img>"])


def test_bridge_answers_equal_transformers_internvl_preprocessing_and_generate(tmp_path):
    torch.manual_seed(0)
    ours = MLLM.from_config(tiny_internvl_config()).eval()
    export = ours.save_pretrained(tmp_path / "export")
    tokenizer = word_tokenizer(ours.config.image_token_id)
    tokenizer.save_pretrained(export)
    write_eval_files(export, "chatml", "", tokenizer)

    processor = EvalProcessor.from_pretrained(export, MLLM.from_pretrained(export).config)
    hf_images = GotOcr2ImageProcessorPil.from_pretrained(export)  # what transformers reads of our export
    hf = InternVLForConditionalGeneration.from_pretrained(export).eval()
    rule = SimpleNamespace(start_image_token=" <img> ", end_image_token=" </img> ", image_token="<image> ",
                           image_seq_length=hf.config.image_seq_length)
    for image, question in zip(internvl_images(), ["w6 w7", "w8", "w9 w10 w11"]):
        ours_image = processor.image(image)
        ids = processor.prompts.encode(question, 1, processor.tokens([ours_image]))
        theirs = hf_images(images=[image], return_tensors="pt")
        prompt = processor.prompts.render(question, 1)
        expanded = prompt.replace("<image>", InternVLProcessor.replace_image_token(rule, {"num_patches": theirs["num_patches"].tolist()}, 0))
        hf_ids = tokenizer(expanded, add_special_tokens=not prompt.startswith("<s>"), return_tensors="pt")["input_ids"]
        assert ids == hf_ids[0].tolist()  # <img>, the context tokens and </img>, in the same place
        assert torch.equal(ours_image.pixels, theirs["pixel_values"])
        answer = generate(ours, [ids], ours_image.pixels, 6, processor.stop_ids, processor.pad_id,
                          image_sizes=torch.tensor([ours_image.size]))[0]
        with torch.no_grad():
            want = hf.generate(input_ids=hf_ids, pixel_values=theirs["pixel_values"], max_new_tokens=6, do_sample=False,
                               eos_token_id=processor.stop_ids, pad_token_id=processor.pad_id)[0, hf_ids.shape[1]:].tolist()
        stops = set(processor.stop_ids)
        assert answer == want[: next((i for i, t in enumerate(want) if t in stops), len(want))]
