"""`python -m train memory [model=llava15_7b] [memory.gpus=8] [memory.*=...]`

Analytic per-GPU training memory of a model preset for each strategy and fine-tuning mode
(`models/memory.py` has every formula and its source). Parameter counts come from the preset's
real architecture, built on the `meta` device (no weights, no downloads) and frozen the way
training freezes it:
  finetune  LLaVA stage 2 (`stage=finetune`): LLM + LM head + projector train, vision tower frozen;
  lora      LoRA (rank `memory.lora.r`) on the LLM's projections, projector trains fully, the base
            LLM, embeddings, LM head and vision tower frozen (as `train/peft.py` sets it up).
Prints one JSON object on stdout, a table on stderr, and writes the JSON to
`memory.out/memory-<model>-<N>gpu-mb<micro_batch>.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from models import MLLM
from models.memory import GB, STRATEGIES, ActShape, ParamCounts, activation_bytes, estimate

from ..builders import build
from ..model_source import ModelSource
from ..stage import StageConfig, apply_stage
from .cli import compose_cli

MODES = ("finetune", "lora")


def meta_model(spec: ModelSource) -> MLLM:
    with torch.device("meta"):
        return MLLM.from_config(spec.mllm_config)


def lora_linears(layers: nn.Module, targets: list[str]) -> list[nn.Linear]:
    """The linears LoRA adapts in LLM decoder `layers` (never the vision tower's same-named ones)."""
    return [m for name, m in layers.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]


def count_params(model: MLLM, mode: str, r: int, targets: list[str]) -> ParamCounts:
    """Trainable / frozen / largest-unit parameter counts for a fine-tuning mode."""
    if mode not in MODES:
        raise ValueError(f"memory.modes: unknown mode {mode!r}; one of {list(MODES)}")
    apply_stage(model, StageConfig("finetune", train_vision=False, train_projector=True, train_llm=mode == "finetune"))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = lora_linears(model.language_model.layers, targets) if mode == "lora" else []
    if mode == "lora" and not adapters:
        raise ValueError(f"memory.lora.targets={targets} match no linear in the LLM's decoder layers")
    lora = sum(r * (lin.in_features + lin.out_features) for lin in adapters)
    layer_lora = lora // len(model.language_model.layers)
    layers = [*model.language_model.layers, *model.family.vision_layers(model)]
    sizes = [sum(p.numel() for p in u.parameters()) for u in layers]
    others = [sum(p.numel() for p in u.parameters()) for u in (model.language_model.embed_tokens, model.lm_head, model.multi_modal_projector)]
    unit = max(sizes[: len(model.language_model.layers)]) + layer_lora
    return ParamCounts(trainable=trainable + lora, frozen=total - trainable, unit=max(unit, *sizes, *others), root=total - sum(sizes))


def act_shape(model: MLLM, seq_len: int, mode: str, r: int, targets: list[str], dropout: float, n_visual: int) -> ActShape:
    text = model.text_config
    heads = text.num_attention_heads
    inputs = tuple(lin.in_features for lin in lora_linears(model.language_model.layers[0], targets)) if mode == "lora" else ()
    return ActShape(
        seq_len=seq_len, n_visual=n_visual, hidden=text.hidden_size, ffn=active_ffn_width(text),
        layers=text.num_hidden_layers, heads=heads, kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size, vision_hidden=model.config.hf_vision_config().hidden_size,
        lora_r=r if mode == "lora" else 0, lora_inputs=inputs, lora_dropout=dropout if mode == "lora" else 0.0,
        frozen_llm=mode == "lora")


def active_ffn_width(text) -> int:
    """The FFN width a token's activations span: the MLP's, or in an MoE LLM its top-k experts' together
    (each token's SwiGLU intermediates in each expert it is routed to)."""
    if getattr(text, "num_experts", 0):
        return text.num_experts_per_tok * text.moe_intermediate_size
    return text.intermediate_size


def memory_report(cfg) -> dict:
    m = cfg.memory
    unknown = [s for s in m.strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"memory.strategies: unknown {unknown}; known {sorted(STRATEGIES)}")
    if not (isinstance(m.lora.r, int) and m.lora.r > 0):
        raise ValueError(f"memory.lora.r must be a positive integer, got {m.lora.r}")
    spec = build(cfg.model, "model")
    gc = spec.gradient_checkpointing if m.gradient_checkpointing is None else bool(m.gradient_checkpointing)
    targets = list(m.lora.targets)
    config = spec.mllm_config
    size = tuple(int(v) for v in m.image_size)
    frames = m.get("frames")
    grid = config.model_family.video_processor(config).grid(int(frames), size) if frames is not None else size
    n_visual = config.tokens_per_image(grid)  # the family's count: LLaVA-1.5 576, LLaVA-NeXT 2928 at 672 x 672, a video's t*h*w/4
    seq_len = m.seq_len if m.seq_len is not None else n_visual + m.text_tokens
    report = {"model": spec.name, "gpus": m.gpus, "precision": m.precision, "seq_len": seq_len, "n_visual": n_visual,
              "image_size": list(size), "frames": frames, "pinpoints": config.image_grid_pinpoints,
              "micro_batch": m.micro_batch, "gradient_checkpointing": gc, "unit": "GB = 1e9 bytes, per GPU",
              "modes": {}, "rows": []}
    for mode in m.modes:
        model = meta_model(spec)
        counts = count_params(model, mode, m.lora.r, targets)
        act = act_shape(model, seq_len, mode, m.lora.r, targets, m.lora.dropout, n_visual)
        report["modes"][mode] = {
            "trainable_params": counts.trainable, "frozen_params": counts.frozen, "largest_unit_params": counts.unit,
            "root_unit_params": counts.root,
            "activations_per_sample_gb": {"checkpointed": round(activation_bytes(act, True) / GB, 3),
                                          "not_checkpointed": round(activation_bytes(act, False) / GB, 3)},
        }
        for strategy in m.strategies:
            row = estimate(counts, act, strategy, m.gpus, m.precision, m.micro_batch, gc)
            report["rows"].append({"mode": mode, **row})
    return report


def inputs(report: dict) -> str:
    size = f"{report['image_size'][0]} x {report['image_size'][1]}"
    return f"{report['frames']} frames of {size}" if report.get("frames") else f"{size} images"


def table(report: dict) -> str:
    cols = ["params_gb", "grads_gb", "optimizer_gb", "frozen_gb", "gathered_gb", "activations_gb", "total_gb", "host_gb"]
    head = ["mode", "strategy", *(c.removesuffix("_gb") for c in cols)]
    lines = [
        f"{report['model']} on {report['gpus']} GPUs, {report['precision']}, per GPU in GB (1e9 B); activations: "
        f"{report['micro_batch']} x {report['seq_len']} tokens ({report['n_visual']} visual: {inputs(report)}), "
        f"gradient checkpointing {report['gradient_checkpointing']}",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report["rows"]:
        lines.append("| " + " | ".join([r["mode"], r["strategy"], *(f"{r[c]:.2f}" for c in cols)]) + " |")
    for mode, c in report["modes"].items():
        lines.append(f"{mode}: trainable {c['trainable_params'] / 1e6:.1f}M, frozen {c['frozen_params'] / 1e6:.1f}M, "
                     f"activations/sample {c['activations_per_sample_gb']['checkpointed']:.2f} GB checkpointed, "
                     f"{c['activations_per_sample_gb']['not_checkpointed']:.2f} GB not")
    return "\n".join(lines)


def main() -> None:
    cfg = compose_cli("memory")
    report = memory_report(cfg)
    out = Path(cfg.memory.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory-{report['model']}-{report['gpus']}gpu-mb{report['micro_batch']}.json"
    path.write_text(json.dumps(report, indent=2))
    print(table(report), file=sys.stderr)
    print(f"results: {path}", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
