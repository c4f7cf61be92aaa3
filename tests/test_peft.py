"""LoRA on the LLM only: targets, freezing, every decoder path (head/FFN subsets too), merged export,
adapter files, gradient checkpointing, and a 2-rank `python -m train peft=lora` job."""

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models import MLLM
from models.config import ConfigError
from models.lora import is_lora, load_adapter, merged_state_dict
from tests.helpers import image_batch
from tests.test_plans import plan_model
from train.builders import build
from train.peft import PeftConfig, apply_training_setup, export_model, trainable_counts
from train.stage import StageConfig

FINETUNE = StageConfig("finetune", train_vision=False, train_projector=True, train_llm=True)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(arch: str, r: int = 4, dropout: float = 0.0, seed: int = 0) -> MLLM:
    """A plan model with LoRA (finetune stage) whose B matrices are non-zero, so the adapter matters."""
    model = plan_model(arch, {}, seed=seed)
    apply_training_setup(model, FINETUNE, PeftConfig("lora", r=r, alpha=2 * r, dropout=dropout))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if is_lora(m):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.1)
    return model


def merged_copy(model: MLLM) -> MLLM:
    plain = MLLM.from_config(model.config, model.plan).eval()
    plain.load_state_dict(merged_state_dict(model))
    return plain


def text_logits(model: MLLM, batch) -> torch.Tensor:
    ids, mask, pixels = batch
    with torch.no_grad():
        logits = model(ids, mask, pixels, logits="all").logits
    return logits[mask.bool() & (ids != model.config.image_token_id)]


def test_lora_targets_llm_projections_only_and_counts():
    model = lora_model("xattn")
    adapted = {n for n, m in model.named_modules() if is_lora(m)}
    layers = model.text_config.num_hidden_layers
    assert adapted == {f"language_model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in range(layers) for p in PROJ}
    assert len(model.xattn) > 0 and not any(is_lora(m) for m in model.xattn.modules())
    assert not any(is_lora(m) for m in model.vision_tower.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("multi_modal_projector.", "xattn.")) or ".lora_" in n for n in trainable)
    assert any(n.startswith("xattn.") for n in trainable) and any(n.startswith("multi_modal_projector.") for n in trainable)
    counts = trainable_counts(model)
    text = model.text_config
    d, f, kv = text.hidden_size, text.intermediate_size, text.num_key_value_heads * text.hidden_size // text.num_attention_heads
    per_layer = 4 * ((d + d) + (d + kv) * 2 + (d + d)) + 4 * 3 * (d + f)  # r=4: r * (in + out) per projection
    assert counts["llm_lora"] == layers * per_layer
    assert counts["vision_tower"] == 0 and counts["lm_head"] == 0


def test_yopo_head_and_ffn_subsets_use_the_adapter():
    """YOPO reads weight rows/columns of kept heads and FFN neurons: LoRA logits == merged model."""
    model = lora_model("yopo")
    assert any(p.visual_heads is not None for p in model.plan.layers) and any(0 < p.visual_ffn < 1 for p in model.plan.layers)
    batch = image_batch(model.config, batch=2, pad_left=[0, 2], suffix=5)
    got, want = text_logits(model, batch), text_logits(merged_copy(model), batch)
    assert (got - want).abs().max().item() <= 1e-5
    base = MLLM.from_config(model.config, model.plan).eval()
    base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k})
    assert (got - text_logits(base, batch)).abs().max().item() > 1e-2  # the adapter changes the output


def test_merged_export_and_adapter_round_trip(tmp_path):
    model = lora_model("vica")
    batch = image_batch(model.config, batch=2, suffix=5)
    want = text_logits(model, batch)
    adapter = export_model(model, tmp_path / "export")
    assert adapter == tmp_path / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "trainable.safetensors"}
    exported = MLLM.from_pretrained(tmp_path / "export").eval()
    assert (text_logits(exported, batch) - want).abs().max().item() <= 1e-5
    # the adapter + trained projector applied to the base weights give the same model again
    base = MLLM.from_config(model.config, model.plan).eval()
    base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k})
    with torch.no_grad():
        for p in base.multi_modal_projector.parameters():
            p.add_(1.0)  # the projector must come from trainable.safetensors
    loaded = load_adapter(base, adapter).eval()
    assert (text_logits(loaded, batch) - want).abs().max().item() <= 1e-5


def grads(model: MLLM, batch, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Parameter gradients of one loss, and how often layer 0's q_proj ran (recomputation counts)."""
    ids, mask, pixels = batch
    calls = []
    hook = model.language_model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    model.gradient_checkpointing = checkpointing
    model.zero_grad()
    labels = ids.clone()
    labels[:, : int((ids == model.config.image_token_id).nonzero()[:, 1].max()) + 2] = -100  # answer tokens only
    torch.manual_seed(0)  # same LoRA dropout masks (checkpointing replays the RNG state)
    model(ids, mask, pixels, labels=labels).loss.backward()
    hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("arch", ["yopo", "vica"])
def test_gradient_checkpointing_with_lora_and_frozen_embeddings(arch):
    model = lora_model(arch, dropout=0.1)
    assert not model.language_model.embed_tokens.weight.requires_grad
    batch = image_batch(model.config, batch=2, suffix=5)
    (plain, n_plain), (ckpt, n_ckpt) = grads(model, batch, False), grads(model, batch, True)
    assert n_ckpt == 2 * n_plain  # the layer really was recomputed in backward
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name
    assert any(".lora_A" in n and g.abs().sum() > 0 for n, g in ckpt.items())
    assert any(".lora_B" in n and g.abs().sum() > 0 for n, g in ckpt.items())
    assert all(g.abs().sum() > 0 for n, g in ckpt.items() if n.startswith("multi_modal_projector."))


def test_peft_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        build(OmegaConf.create({"_target_": "train.peft.PeftConfig", "name": "lora", "alpah": 8}), "peft")
    with pytest.raises(ConfigError, match="r > 0"):
        PeftConfig("lora", r=0)
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="peft=qlora needs"):
            PeftConfig("qlora")
    model = plan_model("vica", {})
    with pytest.raises(ConfigError, match="stage=pretrain freezes it"):
        apply_training_setup(model, StageConfig("pretrain", False, True, False), PeftConfig(name="lora"))
    with pytest.raises(ConfigError, match=r"\['qkv_proj'\] match no layer"):
        apply_training_setup(model, FINETUNE, PeftConfig(name="lora", target_modules=["q_proj", "qkv_proj"]))


@pytest.mark.slow
def test_lora_two_cpu_ranks_ddp_then_deepspeed_zero2_and_zero3(tmp_path):
    """`peft=lora stage=finetune` on 2 gloo ranks. DDP from config: the merged export equals the
    LoRA model of the last checkpoint. Then DeepSpeed ZeRO-2 and ZeRO-3 fine-tune that export
    (`model.pretrained`; under ZeRO-3 built partitioned, LoRA B re-zeroed gathered, adapter saved from
    the gathered weights): each export equals the base + its saved adapter (and trained projector)."""
    from tests.test_distributed import train_two_ranks

    lora = ["peft=lora", "peft.r=4", "stage=finetune", "optim.lr=1e-2"]
    run, summary = train_two_ranks(tmp_path / "ddp", "strategy=ddp", *lora)
    check_adapter_files(Path(summary["adapter"]))
    exported = MLLM.from_pretrained(run / "export").eval()
    rebuilt = MLLM.from_config(exported.config, exported.plan)
    apply_training_setup(rebuilt, FINETUNE, PeftConfig("lora", r=4))
    state = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    rebuilt.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    batch = image_batch(exported.config, batch=2, suffix=5)
    assert (text_logits(exported, batch) - text_logits(rebuilt.eval(), batch)).abs().max().item() <= 1e-5

    for strategy in ("deepspeed_zero2", "deepspeed_zero3"):
        run2, summary2 = train_two_ranks(tmp_path / strategy, f"strategy={strategy}", f"model.pretrained={run / 'export'}", *lora)
        check_adapter_files(Path(summary2["adapter"]))
        exported2 = MLLM.from_pretrained(run2 / "export").eval()
        adapted = load_adapter(MLLM.from_pretrained(run / "export"), summary2["adapter"]).eval()
        assert (text_logits(exported2, batch) - text_logits(adapted, batch)).abs().max().item() <= 1e-5, strategy
        assert (text_logits(exported2, batch) - text_logits(exported, batch)).abs().max().item() > 1e-3, strategy  # it trained


def check_adapter_files(adapter: Path) -> None:
    from safetensors.torch import load_file

    lora = load_file(str(adapter / "adapter_model.safetensors"))
    assert lora and all(k.startswith("language_model.layers.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at zero: it trained
    extra = load_file(str(adapter / "trainable.safetensors"))
    assert extra and all(k.startswith("multi_modal_projector.") for k in extra)
