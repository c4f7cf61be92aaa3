"""The original LLaVA layout (haotian-liu/LLaVA's files; models/original_layout.py): a directory our
converter builds from a llava-hf one that transformers wrote gives identical logits and greedy
generation to that llava-hf directory loaded by transformers' `LlavaForConditionalGeneration`; it is a
flat Llama checkpoint with `model.mm_projector.*` and a CLIP tower directory; converting back gives the
same tensors; the tower comes from the CLIP directory `mm_vision_tower` names or `vision_tower=`, and
a missing or mismatched one is one error naming both."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

from models import MLLM
from models.config import ConfigError
from tests.helpers import assert_greedy_matches_hf, image_batch, tiny_config
from train.tools.convert_checkpoint import convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def keys(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A llava-hf directory written by transformers (CLIP + MLP projector + Llama, a tokenizer file
    beside it) and the original-layout directory our converter builds from it."""
    tmp = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    MLLM.from_config(tiny_config()).save_pretrained(tmp / "ours")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp / "ours").eval()
    hf.save_pretrained(tmp / "llava-hf")
    (tmp / "llava-hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    report = convert_checkpoint(tmp / "llava-hf", tmp / "original")
    assert report["layout"] == "original" and "generation_config.json" in report["copied"]
    return {"tmp": tmp, "hf": hf, "llava-hf": tmp / "llava-hf", "original": tmp / "original"}


def test_the_original_layout_is_a_flat_llama_checkpoint_with_a_clip_directory(dirs):
    original = dirs["original"]
    config = json.loads((original / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert (config["mm_projector_type"], config["mm_vision_select_layer"], config["mm_vision_select_feature"]) == ("mlp2x_gelu", -2, "patch")
    assert config["mm_hidden_size"] == 32 and config["image_aspect_ratio"] == "pad"
    assert Path(config["mm_vision_tower"]) == (original / "vision_tower").resolve()
    names = keys(original)
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight",
            "model.mm_projector.0.weight", "model.mm_projector.2.bias"} <= names
    assert not any("vision" in k for k in names)  # the tower lives in its CLIP directory
    # the LLM part is a plain Llama checkpoint: transformers' Llama reads it under these names
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("mm_")}))
    missing, unexpected = llama.load_state_dict({k: v for k, v in load_file(original / "model.safetensors").items()
                                                 if not k.startswith("model.mm_projector.")}, strict=False)
    assert not missing and not unexpected
    tower = CLIPVisionModel.from_pretrained(original / "vision_tower")
    want = dirs["hf"].model.vision_tower.state_dict()
    assert set(tower.state_dict()) == set(want)
    assert all(torch.equal(value, want[name]) for name, value in tower.state_dict().items())


@pytest.mark.parametrize("pad_left", [None, [0, 3, 5]], ids=["no-padding", "left-padding"])
def test_logits_equal_the_llava_hf_directory_in_transformers(dirs, pad_left):
    ours = MLLM.from_pretrained(dirs["original"]).eval()
    ids, mask, pixels = image_batch(ours.config, batch=3, pad_left=pad_left)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, mask, pixels).logits
        want = dirs["hf"](input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
    valid = mask.bool()
    assert (got - want)[valid].abs().max().item() <= 1e-5
    loaded = MLLM.from_pretrained(dirs["llava-hf"]).eval()  # and exactly what the llava-hf directory gives us
    with torch.no_grad():
        assert torch.equal(got[valid], loaded(ids, mask, pixels).logits[valid])


def test_greedy_generation_equals_transformers(dirs):
    ours = MLLM.from_pretrained(dirs["original"]).eval()
    ids, mask, pixels = image_batch(ours.config, batch=3, pad_left=[0, 2, 4], seed=1)
    assert_greedy_matches_hf(ours, dirs["hf"], ids, mask, pixels, {"pixel_values": pixels})


def test_converting_back_gives_the_same_tensors_and_config(dirs):
    """The CLI, original -> llava-hf: transformers loads it with every tensor of the source."""
    back = dirs["tmp"] / "back"
    out = subprocess.run([sys.executable, "-m", "train", "convert_checkpoint", f"convert.src={dirs['original']}",
                          f"convert.out={back}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["layout"] == "llava-hf"
    again = LlavaForConditionalGeneration.from_pretrained(back).eval()
    want = dirs["hf"].state_dict()
    assert set(again.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in again.state_dict().items())
    assert again.config.to_diff_dict()["text_config"] == dirs["hf"].config.to_diff_dict()["text_config"]
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == 2


def test_the_tower_directory_is_given_when_the_checkpoint_names_none_here(dirs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(dirs["original"], moved)
    clip = tmp_path / "clip-vit"
    (moved / "vision_tower").rename(clip)
    config = json.loads((moved / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # what LLaVA-1.5's release names
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"(?s)moved.*openai/clip-vit-large-patch14-336.*vision_tower=<dir>"):
        MLLM.from_pretrained(moved)
    with pytest.raises(ConfigError, match=r"(?s)nowhere.*openai/clip-vit-large-patch14-336"):
        MLLM.from_pretrained(moved, vision_tower=tmp_path / "nowhere")
    ours = MLLM.from_pretrained(moved, vision_tower=clip).eval()
    ids, mask, pixels = image_batch(ours.config, batch=2)
    with torch.no_grad():
        assert torch.equal(ours(ids, mask, pixels).logits, MLLM.from_pretrained(dirs["original"]).eval()(ids, mask, pixels).logits)


def test_a_tower_of_another_width_is_refused_naming_both(dirs, tmp_path):
    wide = tmp_path / "wide-clip"
    clip = CLIPVisionModel.from_pretrained(dirs["original"] / "vision_tower")
    clip.config.hidden_size, clip.config.intermediate_size = 48, 96
    CLIPVisionModel(clip.config).save_pretrained(wide)
    with pytest.raises(ConfigError, match=r"(?s)original.*mm_hidden_size=32.*wide-clip.*48"):
        MLLM.from_pretrained(dirs["original"], vision_tower=wide)


def test_tower_weights_in_the_checkpoint_win_and_must_fit_the_tower_directory(dirs, tmp_path):
    """LLaVA-1.5's releases hold the (frozen) tower as model.vision_tower.vision_tower.vision_model.*: those
    weights are the model's; the CLIP directory gives the config (and any weight the checkpoint lacks)."""
    both = tmp_path / "with-tower"
    shutil.copytree(dirs["original"], both)
    state = load_file(both / "model.safetensors")
    tower = dirs["hf"].model.vision_tower.state_dict()
    state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.clone() for k, v in tower.items()})
    save_file(state, both / "model.safetensors")
    other = tmp_path / "other-clip"
    clip = CLIPVisionModel.from_pretrained(dirs["original"] / "vision_tower")
    torch.manual_seed(3)
    CLIPVisionModel(clip.config).save_pretrained(other)  # same shapes, other weights
    ours = MLLM.from_pretrained(both, vision_tower=other).eval()
    assert torch.equal(ours.vision_tower.embeddings.patch_embedding.weight, tower["embeddings.patch_embedding.weight"])
    state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(7)
    save_file(state, both / "model.safetensors")
    with pytest.raises(ConfigError, match=r"(?s)with-tower.*other-clip.*post_layernorm"):
        MLLM.from_pretrained(both, vision_tower=other)


def test_the_linear_projector_round_trips(tmp_path):
    """LLaVA-1.0's `linear` projector (model.mm_projector.weight): ours -> original -> ours, same logits."""
    torch.manual_seed(0)
    ours = MLLM.from_config(tiny_config(projector="linear")).eval()
    ours.save_pretrained(tmp_path / "ours")
    convert_checkpoint(tmp_path / "ours", tmp_path / "original")
    assert {"model.mm_projector.weight", "model.mm_projector.bias"} <= keys(tmp_path / "original")
    loaded = MLLM.from_pretrained(tmp_path / "original").eval()
    ids, mask, pixels = image_batch(ours.config, batch=2)
    with torch.no_grad():
        assert torch.equal(ours(ids, mask, pixels).logits, loaded(ids, mask, pixels).logits)


def test_old_flat_configs_read_as_llama_reads_them(dirs, tmp_path):
    """Releases written by transformers 4 keep `rope_theta` at the top level and no image token."""
    old = tmp_path / "old"
    shutil.copytree(dirs["original"], old)
    config = json.loads((old / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.pop("image_token_index")
    config["rope_theta"] = 500.0
    (old / "config.json").write_text(json.dumps(config))
    loaded = MLLM.from_pretrained(old)
    assert loaded.text_config.rope_parameters["rope_theta"] == 500.0
    assert loaded.config.image_token_id == 0  # models/original_layout.py: PLACEHOLDER_ID


def test_the_job_and_the_bridge_read_it_with_its_tower_and_llavas_prompt(dirs, tmp_path):
    """`model.pretrained=... model.vision_tower=...` (ModelSource) and lmms-eval's processor: LLaVA's
    `vicuna_v1` prompt, `<image>` expanded to the image's tokens."""
    from tests.helpers import qwen_word_tokenizer
    from train.lmms.processor import EvalProcessor
    from train.model_source import ModelSource

    moved = tmp_path / "ckpt"
    shutil.copytree(dirs["original"], moved)
    clip = tmp_path / "clip"
    (moved / "vision_tower").rename(clip)
    qwen_word_tokenizer().save_pretrained(moved)
    source = ModelSource(name="original", pretrained=str(moved), vision_tower=str(clip))
    source.check_weights()
    model = source.build(source.plan(None))
    assert model.family.name == "llava" and model.plan.name == "dense"
    with pytest.raises(ConfigError, match="model.vision_tower"):
        ModelSource(name="x", vision_tower=str(clip))
    processor = EvalProcessor.from_pretrained(moved, model.config)
    prompt = processor.prompts.render("w7 w8", 1)
    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    assert prompt == f"{system} USER: <image>\nw7 w8 ASSISTANT:"  # LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO)
    ids = processor.prompts.encode("w7 w8", 1)
    assert ids.count(model.config.image_token_id) == model.config.num_image_tokens


def llama_like_tokenizer():
    """Like LLaVA-1.5's: `<unk>` 0, `<s>` 1, `</s>` 2, words filling the 128-token vocabulary, no `<image>`
    (and, as Llama's byte fallback, no text that reads as `<unk>`: the prompt's words are in it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "USER:": 3, "ASSISTANT:": 4} | {f"w{i}": i for i in range(5, 128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


def test_a_release_without_an_image_token_uses_unk_as_the_placeholder(dirs, tmp_path):
    """LLaVA-1.5's release: no image_token_index, a full vocabulary without `<image>`. The placeholder is
    `<unk>` (id 0): the tokenizer gets no extra token, training data and evaluation prompts write it."""
    from data.chat import ChatTokenizer
    from train.lmms.processor import EvalProcessor
    from train.model_source import ModelSource

    release = tmp_path / "release"
    shutil.copytree(dirs["original"], release)
    config = json.loads((release / "config.json").read_text())
    del config["image_token_index"]
    (release / "config.json").write_text(json.dumps(config))
    llama_like_tokenizer().save_pretrained(release)
    source = ModelSource(name="release", pretrained=str(release))
    tok = source.load_tokenizer(lambda: [], tmp_path)
    assert len(tok) == 128 and source.mllm_config.image_token_id == 0
    chat = ChatTokenizer(tok, "vicuna_v1", source.mllm_config.num_image_tokens, 256, system="", image_token_id=0)
    enc = chat.encode([{"from": "human", "value": "<image>\nw7 w8"}, {"from": "gpt", "value": "w9"}])
    assert enc.input_ids.count(0) == 16 and enc.labels[enc.input_ids.index(9)] == 9
    processor = EvalProcessor.from_pretrained(release, source.mllm_config, system_prompt="")
    assert processor.prompts.encode("w7", 1).count(0) == 16
