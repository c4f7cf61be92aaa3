"""lmms-eval's `efficient_mllm` on LLaVA-NeXT: an export carries LlavaNextImageProcessor's
preprocessor_config.json, and the bridge's prompts, pixels and greedy answers equal transformers'
`LlavaNextProcessor` + `LlavaNextForConditionalGeneration.generate` on the same prompts (PIL only)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor, PreTrainedTokenizerFast
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from models import MLLM
from tests.helpers import next_images, tiny_next_config
from train.lmms.export import write_eval_files
from train.lmms.processor import EvalProcessor
from train.lmms.scoring import generate


def word_tokenizer(image_token_id: int) -> PreTrainedTokenizerFast:
    """Words w4..w99 and the specials; the template's own words read as <unk> on both sides."""
    vocab = {f"w{i}": i for i in range(4, 100)} | {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 100, "<image>": image_token_id}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])


def test_bridge_answers_equal_transformers_llava_next_processor_and_generate(tmp_path):
    torch.manual_seed(0)
    ours = MLLM.from_config(tiny_next_config()).eval()
    export = ours.save_pretrained(tmp_path / "export")
    tokenizer = word_tokenizer(ours.config.image_token_id)
    tokenizer.save_pretrained(export)
    write_eval_files(export, "vicuna", "", tokenizer)

    processor = EvalProcessor.from_pretrained(export, MLLM.from_pretrained(export).config)
    hf_images = LlavaNextImageProcessorPil.from_pretrained(export)  # what transformers reads of our export
    hf_processor = LlavaNextProcessor(hf_images, tokenizer, patch_size=ours.config.hf_vision_config().patch_size,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>")
    hf = LlavaNextForConditionalGeneration.from_pretrained(export).eval()
    images = next_images()
    for image, question in zip(images, ["w5 w6", "w7", "w8 w9 w10"]):
        ours_image = processor.image(image)
        ids = processor.prompts.encode(question, 1, processor.tokens([ours_image]))
        prompt = processor.prompts.render(question, 1)
        theirs = hf_processor(images=[image], text=[prompt], return_tensors="pt", add_special_tokens=not prompt.startswith("<s>"))
        assert ids == theirs["input_ids"][0].tolist()  # the same placeholders, in the same place
        assert torch.equal(ours_image.pixels, theirs["pixel_values"][0])
        answer = generate(ours, [ids], ours_image.pixels[None], 6, processor.stop_ids, processor.pad_id,
                          image_sizes=torch.tensor([ours_image.size]))[0]
        with torch.no_grad():
            want = hf.generate(**theirs, max_new_tokens=6, do_sample=False, eos_token_id=processor.stop_ids,
                               pad_token_id=processor.pad_id)[0, theirs["input_ids"].shape[1]:].tolist()
        stops = set(processor.stop_ids)
        want = want[: next((i for i, t in enumerate(want) if t in stops), len(want))]
        assert answer == want
