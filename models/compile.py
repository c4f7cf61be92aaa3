"""`model.compile=true`: torch.compile each decoder layer, where the time goes.

Layers are compiled in place (`nn.Module.compile`), so parameter names, checkpoints and exports are
unchanged, and one compiled graph serves every layer with the same policy and shapes. The rest of the
model (vision tower, projector, stream bookkeeping, LM head) stays eager: it runs once per forward and
holds the data-dependent gathers that would only cause graph breaks. Shapes that change between
batches (sequence length, kept visual tokens) are compiled as dynamic after the first change.
"""

from __future__ import annotations

from torch import nn


def compile_decoder_layers(model: nn.Module, **options) -> nn.Module:
    """Compile every `PlannedDecoderLayer` of `model` (an MLLM) with `torch.compile` `options`."""
    for layer in model.language_model.layers:
        layer.compile(**options)
    return model
