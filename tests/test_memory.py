"""The analytic memory model: ZeRO paper's numbers, strategy algebra, real parameter counts of
LLaVA-1.5-7B, LoRA far below full fine-tuning, and activations against what autograd really saves."""

import dataclasses
import json

import pytest
import torch

from omegaconf import OmegaConf

from models import MLLM
from models.memory import GB, STRATEGIES, ActShape, ParamCounts, activation_bytes, layer_activation_bytes, model_states
from train.tools.bench import make_batch
from train.tools.cli import compose_cli
from train.builders import build
from train.tools.memory import act_shape, count_params, memory_report, meta_model, table
from train.stage import StageConfig, apply_stage

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def states_gb(strategy, psi=7.5e9, n=64):
    return sum(model_states(ParamCounts(int(psi), 0, 0), strategy, n).values()) / GB


def test_zero_paper_figure1_7_5b_on_64_gpus():
    # Rajbhandari et al. 2020, Figure 1: baseline 120 GB, P_os 31.4, P_os+g 16.6, P_os+g+p 1.9
    assert states_gb("ddp") == pytest.approx(120.0)
    assert states_gb("deepspeed_zero1") == pytest.approx(31.4, abs=0.05)
    assert states_gb("deepspeed_zero2") == pytest.approx(16.6, abs=0.05)
    assert states_gb("deepspeed_zero3") == pytest.approx(1.9, abs=0.05)


def test_strategy_algebra():
    c = ParamCounts(trainable=1000, frozen=500, unit=100)
    ddp = model_states(c, "ddp", 4)
    assert (ddp["params"], ddp["grads"], ddp["optimizer"], ddp["frozen"], ddp["gathered"]) == (2000, 2000, 12000, 1000, 0)
    assert sum(model_states(c, "ddp", 4, "32-true")[k] for k in ("params", "grads", "optimizer")) == 16000  # 4 + 4 + 8
    z3, fsdp, off = (model_states(c, s, 4) for s in ("deepspeed_zero3", "fsdp", "deepspeed_zero3_offload"))
    assert z3 == fsdp and z3["frozen"] == 250 and z3["gathered"] == 2 * 100 * 2
    assert model_states(dataclasses.replace(c, root=70), "fsdp", 4)["gathered"] == (2 * 100 + 70) * 2  # root unit stays gathered
    on_gpu = {k: v for k, v in off.items() if k not in ("gathered", "host")}
    assert set(on_gpu.values()) == {0.0} and off["host"] == sum(v for k, v in z3.items() if k not in ("gathered", "host"))
    assert model_states(c, "deepspeed_zero2", 1) == model_states(c, "ddp", 1)  # one rank: nothing to partition
    with pytest.raises(ValueError, match="unknown strategy 'zero9'"):
        model_states(c, "zero9", 4)
    with pytest.raises(ValueError, match="unknown precision"):
        model_states(c, "ddp", 4, "fp8")


@pytest.fixture(scope="module")
def llava7b():
    cfg = compose_cli("memory", ["model=llava15_7b"])
    return build(cfg.model, "model")


def test_llava15_7b_parameter_counts(llava7b):
    full = count_params(meta_model(llava7b), "finetune", 128, LLAMA)
    lora = count_params(meta_model(llava7b), "lora", 128, LLAMA)
    assert full.trainable + full.frozen == lora.trainable - 319_815_680 + lora.frozen == 7_063_427_072  # LLaVA-1.5-7B: 7.06B
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert full.frozen == 303_507_456  # the CLIP ViT-L/14-336 tower
    per_layer = 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r (d_in + d_out) per adapted linear
    assert lora.trainable == 32 * per_layer + projector
    assert full.unit == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # one decoder layer
    assert full.root == 2 * 32064 * 4096 + 4096 + projector + (3 * 14 * 14 * 1024 + 1024 + 577 * 1024 + 4 * 1024)
    # embeddings, final norm, projector; CLIP patch conv, class embedding, positions, pre/post LayerNorm
    assert lora.trainable < 0.06 * full.trainable


def test_lora_needs_far_less_memory_than_full_finetuning():
    cfg = compose_cli("memory", ["memory.gpus=8", "memory.strategies=[ddp,deepspeed_zero3]"])
    rows = {(r["mode"], r["strategy"]): r for r in memory_report(cfg)["rows"]}
    for s in ("ddp", "deepspeed_zero3"):
        assert rows["lora", s]["total_gb"] < 0.35 * rows["finetune", s]["total_gb"]
    assert rows["finetune", "ddp"]["total_gb"] > 80 > rows["finetune", "deepspeed_zero3"]["total_gb"]  # full FT needs ZeRO on 80 GB
    assert "| finetune | ddp |" in table(memory_report(cfg))


def test_memory_report_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown \\['zero9'\\]"):
        memory_report(compose_cli("memory", ["memory.strategies=[zero9]"]))
    with pytest.raises(ValueError, match="unknown mode 'qlora'"):
        memory_report(compose_cli("memory", ["memory.modes=[qlora]"]))
    with pytest.raises(ValueError, match="must exceed the 576 visual tokens"):
        memory_report(compose_cli("memory", ["memory.seq_len=500"]))


def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    a = ActShape(seq_len=2048, n_visual=576, hidden=4096, ffn=11008, layers=32, heads=32, head_dim=128, vocab=32064, vision_hidden=1024)
    layer = layer_activation_bytes(a)
    assert activation_bytes(a, False) - activation_bytes(a, True) == 31 * layer - 32 * 2 * 2048 * 4096
    assert 10 * activation_bytes(a, True) < activation_bytes(a, False)
    with_lora = dataclasses.replace(a, lora_r=128, lora_inputs=(4096,) * 6 + (11008,), frozen_llm=True)
    assert layer_activation_bytes(with_lora) == layer - 4 * 2048 * 4096 + 7 * 2 * 2048 * 128


def saved_bytes(model, fn) -> int:
    """Bytes of every tensor autograd saves for backward during `fn` (parameters excluded, shared
    storage counted once; references kept so a freed storage's address is never counted twice)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.untyped_storage().nbytes() for t in kept.values())


@pytest.mark.parametrize("overrides,lora_dropout", [
    ([], None),
    (["model.config.text.num_key_value_heads=2", "model.config.text.intermediate_size=1024"], None),
    ([], 0.0),
    ([], 0.1),
])
def test_activation_formula_matches_what_autograd_saves(overrides, lora_dropout):
    """bf16 forward of a 2-layer bench_mid model (576 visual tokens) with a loss: full fine-tuning
    (MHA and GQA) and peft LoRA (with and without dropout)."""
    cfg = compose_cli("bench", ["model=bench_mid", "model.config.text.num_hidden_layers=2", *overrides])
    spec = build(cfg.model, "model")
    torch.manual_seed(0)
    model = MLLM.from_config(spec.mllm_config).to(torch.bfloat16)
    mode = "finetune" if lora_dropout is None else "lora"
    batch = make_batch(model, 1, 64, 0)
    ids, mask, pixels, labels = batch.ids, batch.mask, batch.ours["pixel_values"], batch.labels
    a = act_shape(model, ids.shape[1], mode, 8, LLAMA, lora_dropout or 0.0, model.config.num_image_tokens)
    a = dataclasses.replace(a, supervised=int((labels != -100).sum()))
    apply_stage(model, StageConfig("finetune", train_vision=False, train_projector=True, train_llm=mode == "finetune"))
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = r"language_model\.layers\.\d+\.(?:[\w.]+\.)?(?:" + "|".join(LLAMA) + ")"
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=targets), model)
        model.to(torch.bfloat16).multi_modal_projector.requires_grad_(True)  # peft froze everything else
    measured = saved_bytes(model, lambda: model(ids, mask, pixels.bfloat16(), labels=labels))
    assert activation_bytes(a, False) == pytest.approx(measured, rel=0.03)


def test_cli_writes_results(tmp_path, capsys, monkeypatch):
    from train.tools import memory

    monkeypatch.setattr("sys.argv", ["python -m train memory", "model=bench_mid", "memory.gpus=2", "memory.seq_len=640", f"memory.out={tmp_path}"])
    memory.main()
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "memory-bench_mid-2gpu-mb1.json").read_text())
    assert printed == saved and len(saved["rows"]) == 2 * 5
    assert {r["strategy"] for r in saved["rows"]} == {"ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp"}
    assert set(STRATEGIES) >= {r["strategy"] for r in saved["rows"]}

