"""The lmms-eval bridge's parts that need no lmms-eval: image preprocessing, prompts, eval files of an
export, plan resolution and continuation scoring (train/lmms/)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.chat import TEMPLATES, ChatTokenizer, render
from models.families.llava import PadToSquare
from models import MLLM
from models.config import CLIP_MEAN, CLIP_STD, ConfigError
from models.generation import greedy_generate
from models.methods import resolve_arch
from train.lmms.export import write_eval_files
from train.lmms.plans import load_arch_spec, plan_for_checkpoint
from train.lmms.preprocess import ImageProcessing
from train.lmms.processor import EvalProcessor
from train.lmms.prompts import PromptEncoder, jinja_template
from train.lmms.scoring import continuation_logprobs, generate

from tests.lmms_helpers import synthetic_questions, task_model_config

# llava-hf/llava-1.5-7b-hf's processor files (preprocessor_config.json and its chat template)
LLAVA_HF_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN), "image_processor_type": "CLIPImageProcessor",
    "image_std": list(CLIP_STD), "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336},
}
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# --- images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("size", [(50, 30), (30, 50), (97, 61), (40, 40)])
def test_image_processing_equals_transformers_llava_processor(size, pad):
    """Same pixels as transformers' PIL-backend LlavaImageProcessor (resize shortest edge, center crop,
    optional pad-to-square with the mean colour), without torchvision."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    img = random_image(*size)
    hf = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=pad,
                                image_mean=CLIP_MEAN, image_std=CLIP_STD)
    ref = hf(img, return_tensors="np")["pixel_values"][0]
    ours = ImageProcessing(32, 32, CLIP_MEAN, CLIP_STD, pad)(img).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_our_models_are_preprocessed_as_in_training():
    config = task_model_config()
    img = random_image(90, 50)
    assert torch.equal(ImageProcessing.for_model(config)(img), PadToSquare(64, config.image_mean, config.image_std)(img).pixels)


def test_llava_hf_preprocessor_config_pads_unless_told_otherwise():
    """llava-hf's file does not record LLaVA-1.5's pad-to-square; we pad unless do_pad or pad_to_square says no."""
    proc = ImageProcessing.from_dict(LLAVA_HF_PREPROCESSOR)
    assert (proc.shortest_edge, proc.crop, proc.pad_to_square, proc.resample) == (336, 336, True, 3)
    assert proc.mean == CLIP_MEAN and proc.std == CLIP_STD
    assert not ImageProcessing.from_dict({**LLAVA_HF_PREPROCESSOR, "do_pad": False}).pad_to_square
    assert not ImageProcessing.from_dict(LLAVA_HF_PREPROCESSOR, pad_to_square=False).pad_to_square
    assert ImageProcessing.from_dict(proc.to_dict()) == proc  # what write_eval_files writes reads back
    with pytest.raises(ValueError, match="not square"):
        ImageProcessing.from_dict({**LLAVA_HF_PREPROCESSOR, "crop_size": {"height": 336, "width": 224}})


def test_preprocessor_config_of_another_model_is_refused(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LLAVA_HF_PREPROCESSOR))
    with pytest.raises(ValueError, match="crops 336 px but the vision tower takes 64 px"):
        ImageProcessing.from_pretrained(tmp_path, task_model_config())


# --- prompts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vicuna", "chatml"])
@pytest.mark.parametrize("system", ["", None, 'Be "brief".\nReally.'])
def test_jinja_template_renders_like_training(task_tokenizer, name, system):
    template = TEMPLATES[name]
    system = template.default_system if system is None else system
    conversation = [{"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"},
                    {"from": "human", "value": "and the shape ?"}, {"from": "gpt", "value": "circle"}]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the shape ?"},
                {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]
    jinja = jinja_template(template, system)
    assert task_tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False) == render(template, system, conversation)[0]
    with pytest.raises(ValueError, match="plain"):
        jinja_template(TEMPLATES["plain"], "")


def test_prompt_ids_equal_the_training_generation_prompt(task_tokenizer):
    """What the model reads at evaluation is what training's evaluation fed it: the conversation's
    tokens up to the reply (data.chat.ChatTokenizer), with <image> expanded."""
    config = task_model_config()
    processor = EvalProcessor.for_training(task_tokenizer, config, "vicuna", system_prompt="")
    chat = ChatTokenizer(task_tokenizer, "vicuna", config.num_image_tokens, 512, system="")
    for question, answer, _ in synthetic_questions(12):
        enc = chat.encode([{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}])
        assert processor.prompts.encode(question, 1) == enc.input_ids[: enc.prompt_len]
        prompt = processor.prompts.render(question, 1)
        assert processor.prompts.continuation(prompt, f" {answer}") == enc.input_ids[enc.prompt_len : -1]  # reply without </s>
    assert processor.stop_ids == [task_tokenizer.eos_token_id]


def test_checkpoint_chat_templates_of_either_content_form(task_tokenizer):
    """llava-hf's template reads structured content only; a string-only template gets <image>\\n text."""
    llava = PromptEncoder(task_tokenizer, LLAVA_HF_CHAT_TEMPLATE, 3, 4)
    assert llava.render("what color ?", 1) == "USER: <image>\nwhat color ? ASSISTANT:"
    assert llava.render("<image>\nwhat color ?", 1) == "USER: <image>\nwhat color ? ASSISTANT:"  # the task's own placeholder
    assert llava.encode("what color ?", 2).count(3) == 8
    plain = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    assert PromptEncoder(task_tokenizer, plain, 3, 4).render("what ?", 1) == "<|user|><image>\nwhat ?<|assistant|>"
    with pytest.raises(ValueError, match="2 <image> placeholders but the document has 1"):
        llava.render("<image> <image> what ?", 1)


# --- exports --------------------------------------------------------------------------------------
def test_export_with_eval_files_is_evaluated_as_trained(tmp_path, task_tokenizer):
    """write_eval_files makes from_pretrained(export) prompt, preprocess and stop like training did."""
    config = task_model_config()
    torch.manual_seed(0)
    MLLM.from_config(config).save_pretrained(tmp_path)
    task_tokenizer.save_pretrained(tmp_path)
    bare = EvalProcessor.from_pretrained(tmp_path, config)  # no eval files: vicuna with its default system prompt
    written = write_eval_files(tmp_path, "vicuna", system_prompt="")
    assert sorted(p.name for p in written) == ["chat_template.jinja", "generation_config.json", "preprocessor_config.json"]
    loaded = EvalProcessor.from_pretrained(tmp_path, config)
    trained = EvalProcessor.for_training(task_tokenizer, config, "vicuna", system_prompt="")
    question = "what color is the small dot ?"
    assert loaded.prompts.encode(question, 1) == trained.prompts.encode(question, 1)
    assert bare.prompts.encode(question, 1) != trained.prompts.encode(question, 1)  # the default system prompt
    assert loaded.images == trained.images and loaded.stop_ids == trained.stop_ids
    with pytest.raises(ValueError, match="has its own chat template"):
        EvalProcessor.from_pretrained(tmp_path, config, system_prompt="other")


# --- plans ----------------------------------------------------------------------------------------
def test_arch_names_files_and_combinations_resolve_like_training(tmp_path):
    config = task_model_config(layers=8)
    text = config.hf_text_config()
    dims = (text.num_hidden_layers, text.num_attention_heads)
    fastv = plan_for_checkpoint("fastv", config)
    assert fastv == resolve_arch({"methods": {"fastv": {"K": 2, "R": 0.5, "reference_depth": 32}}}, *dims)
    combined = load_arch_spec("vica+pdrop")
    assert set(combined["methods"]) == {"vica", "pdrop"}
    assert plan_for_checkpoint("vica+pdrop", config) == resolve_arch(combined, *dims)
    assert plan_for_checkpoint("[vica,pdrop]", config) == plan_for_checkpoint("vica+pdrop", config)  # Hydra's list form
    plan_file = tmp_path / "my_plan.yaml"
    plan_file.write_text("methods:\n  fastv: {K: 3, R: 0.75}\n")
    assert plan_for_checkpoint(str(plan_file), config) == resolve_arch({"methods": {"fastv": {"K": 3, "R": 0.75}}, "name": "my_plan"}, *dims)
    assert plan_for_checkpoint("dense", config).name == "dense"
    with pytest.raises(ConfigError, match="neither a preset"):
        plan_for_checkpoint("fastvv", config)


def test_a_plan_with_new_parameters_needs_a_checkpoint_that_has_them(tmp_path, task_tokenizer):
    """arch=pmod on a dense checkpoint would run untrained routers: refused, as `python -m train evaluate` does;
    a checkpoint trained under it (its routers saved) evaluates under it."""
    from train.lmms.model import EfficientMLLM

    config = task_model_config()
    torch.manual_seed(0)
    MLLM.from_config(config).save_pretrained(tmp_path / "dense")
    MLLM.from_config(config, plan_for_checkpoint("pmod", config)).save_pretrained(tmp_path / "routed")
    for directory in ("dense", "routed"):
        task_tokenizer.save_pretrained(tmp_path / directory)
        write_eval_files(tmp_path / directory, "vicuna", system_prompt="")
    with pytest.raises(ValueError, match=r"arch=pmod adds parameters .* \(routers\.1"):
        EfficientMLLM(pretrained=str(tmp_path / "dense"), arch="pmod", device="cpu")
    assert EfficientMLLM(pretrained=str(tmp_path / "routed"), arch="pmod", device="cpu").model.plan.name == "pmod"


# --- scoring --------------------------------------------------------------------------------------
@torch.no_grad()
def full_forward_logprob(model, prompt: list[int], continuation: list[int], pixel_values) -> tuple[float, bool]:
    """Reference: one forward over prompt + continuation, visual tokens scored at the prompt's end."""
    ids = torch.tensor([prompt + continuation])
    out = model(ids, torch.ones_like(ids), pixel_values, logits="all", query_pos=torch.tensor([len(prompt) - 1]))
    logits = out.logits[0, len(prompt) - 1 : -1].float()
    target = torch.tensor(continuation)
    logp = torch.log_softmax(logits, -1).gather(1, target[:, None]).sum()
    return float(logp), bool((logits.argmax(-1) == target).all())


@pytest.mark.parametrize("arch", ["dense", "fastv", "vtw"])
def test_continuation_scores_equal_a_full_forward_and_do_not_depend_on_the_batch(task_tokenizer, arch):
    config = task_model_config()
    torch.manual_seed(0)
    model = MLLM.from_config(config).eval()
    model.set_plan(plan_for_checkpoint(arch, config))
    processor = EvalProcessor.for_training(task_tokenizer, config, "vicuna", system_prompt="")
    samples = synthetic_questions(5)
    prompts = [processor.prompts.encode(q, 1) for q, _, _ in samples]
    pixels = torch.stack([processor.images(img) for _, _, img in samples])
    continuations = [processor.prompts.continuation(processor.prompts.render(q, 1), f" {a} dot .") for q, a, _ in samples]
    batched = continuation_logprobs(model, prompts, continuations, pixels, processor.pad_id)
    for i in range(len(samples)):
        single = continuation_logprobs(model, prompts[i : i + 1], continuations[i : i + 1], pixels[i : i + 1], processor.pad_id)[0]
        reference = full_forward_logprob(model, prompts[i], continuations[i], pixels[i : i + 1])
        assert single[0] == pytest.approx(reference[0], abs=1e-4) and single[1] == reference[1]
        assert batched[i][0] == pytest.approx(single[0], abs=1e-4) and batched[i][1] == single[1]
    # generate() is greedy_generate cut at the stop id, and what it produces scores as the greedy continuation
    eos = task_tokenizer.eos_token_id
    answers = generate(model, prompts, pixels, 4, [eos], processor.pad_id)
    ids, mask = torch.tensor([prompts[0]]), torch.ones(1, len(prompts[0]), dtype=torch.long)
    reference = greedy_generate(model, ids, mask, pixels[:1], 4, [eos], processor.pad_id)[0].tolist()
    assert answers[0] == reference[: reference.index(eos) if eos in reference else len(reference)]
    with_stop = [a + [eos] if len(a) < 4 else a for a in answers]
    assert all(greedy for _, greedy in continuation_logprobs(model, prompts, with_stop, pixels, processor.pad_id))


def test_llava_hf_layout_directory(tmp_path, task_tokenizer):
    """A directory laid out like llava-hf/llava-1.5-7b-hf: CLIPImageProcessor config without do_pad, the
    chat template in the processor's chat_template.json, EOS in generation_config.json."""
    config = task_model_config()
    MLLM.from_config(config).save_pretrained(tmp_path)
    task_tokenizer.save_pretrained(tmp_path)
    size = {"shortest_edge": 64}, {"height": 64, "width": 64}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**LLAVA_HF_PREPROCESSOR, "size": size[0], "crop_size": size[1]}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_CHAT_TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    processor = EvalProcessor.from_pretrained(tmp_path, config)
    assert processor.prompts.render("what shape ?", 1) == "USER: <image>\nwhat shape ? ASSISTANT:"
    assert processor.images == ImageProcessing(64, 64, CLIP_MEAN, CLIP_STD, pad_to_square=True)
    assert processor.stop_ids == [2]
    assert not EvalProcessor.from_pretrained(tmp_path, config, pad_to_square=False).images.pad_to_square
    vicuna = EvalProcessor.from_pretrained(tmp_path, config, chat_template="vicuna", system_prompt="")
    assert vicuna.prompts.render("what shape ?", 1) == "USER: <image>\nwhat shape ? ASSISTANT:"
