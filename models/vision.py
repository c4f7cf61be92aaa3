"""CLIP / SigLIP / InternViT vision towers, run only as deep as the feature layer (LLaVA-1.5,
LLaVA-NeXT, InternVL).

LLaVA reads the penultimate layer, so the last encoder layer (and the post-layernorm) never
influences the LLM; running it anyway, as `LlavaForConditionalGeneration` does, wastes 1/L of the
tower. We run the HF modules ourselves and stop at the feature layer. Besides the patch features,
a tower gives what pre-LLM steps score tokens by: the attention each patch receives in the feature
layer (from the CLS token where there is one: VisionZip's dominance) and each patch's cosine
similarity to the CLS feature (CLS-similarity knee).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MLLMConfig
from .gathered import gathered


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (MAE): the first half of the channels encodes the patch row,
    the second half its column, each as sines and cosines over geometric frequencies. `[grid*grid, dim]`."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a vision hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angle = coord[:, None].double() * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


@torch.no_grad()
def init_sincos_positions(tower: nn.Module, grid: int) -> None:
    """Start a randomly initialised tower's (learned) patch positions from `sincos_2d` (the CLS row,
    CLIP and InternViT, keeps its init). Trained from scratch, a tower then knows where each patch is from
    step 0 instead of learning it, which speeds up every place-based skill of small models."""
    embeddings = tower.embeddings
    if hasattr(embeddings, "position_embedding"):  # CLIP, SigLIP: an embedding table [n (+ CLS), d]
        table = embeddings.position_embedding.weight
    else:  # InternViT: a parameter [1, 1 + n, d]
        table = embeddings.position_embeddings
    with gathered([table]), torch.no_grad():
        rows = table.view(-1, table.shape[-1])
        rows[rows.shape[0] - grid * grid :] = sincos_2d(grid, rows.shape[1]).to(table)


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's blocks: `encoder.layers` (CLIP, SigLIP) or `encoder.layer` (InternViT)."""
    return tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer


def layer_attention(layer: nn.Module) -> nn.Module:
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention


def vision_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Hidden state after `n_layers` encoder layers (HF `hidden_states[n_layers]`); after InternViT's
    last layer, its final `layernorm` (HF's `last_hidden_state`, which InternVL reads)."""
    layers = encoder_layers(tower)
    h = tower.embeddings(pixel_values.to(next(tower.embeddings.parameters()).dtype))
    if hasattr(tower, "pre_layrnorm"):  # CLIP normalises before the encoder
        h = tower.pre_layrnorm(h)
    internvit = not hasattr(tower.encoder, "layers")
    for layer in layers[:n_layers]:
        h = layer(h) if internvit else layer(h, None)
    if internvit and n_layers == len(layers):
        h = tower.layernorm(h)
    return h


def attention_received(attn: nn.Module, x: torch.Tensor, from_cls: bool) -> torch.Tensor:
    """Head-averaged attention [N, n] each token gets in a CLIP/SigLIP/InternViT attention module on
    its input `x` [N, n, d]: from the CLS query (token 0), or averaged over all queries."""
    n, length, _ = x.shape
    heads = lambda t: t.view(n, t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q_norm, k_norm = getattr(attn, "q_norm", nn.Identity()), getattr(attn, "k_norm", nn.Identity())  # InternViT's qk-norm
    k = heads(k_norm(attn.k_proj(x)))
    q = heads(q_norm(attn.q_proj(x[:, :1] if from_cls else x)))
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)  # [N, H, queries, n]
    return probs.mean((1, 2))


def tower_features(tower: nn.Module, pixel_values: torch.Tensor, config: MLLMConfig, scores: str | None = None):
    """Patch features [N, n_v, d_vision] of each image (or tile) for the projector, and per feature
    token the score a pre-LLM step asks for ([N, n_v], else None):

    * `cls_similarity`: cosine similarity to the CLS feature (CLIP, InternViT; arXiv 2409.01162);
    * `dominance`: the head-averaged attention each token receives in the feature layer, from CLS
      when there is one (SigLIP: averaged over all queries), read by a forward hook inside the
      layer's own forward (where ZeRO-3/FSDP have gathered its weights); a CLS token kept among the
      features always ranks first (as in VisionZip)."""
    n_layers = config.vision_layers_used
    seen = {}
    hook = None
    if scores == "dominance":
        if n_layers == 0:
            raise ValueError("pre_llm.method=dominant reads the attention of the tower's feature layer, but "
                             "vision_feature_layer=0 is the embedding output; pick a later feature layer")

        def read_attention(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            with torch.no_grad():
                seen["received"] = attention_received(module, x, config.has_cls)

        hook = layer_attention(encoder_layers(tower)[n_layers - 1]).register_forward_hook(read_attention, with_kwargs=True)
    try:
        h = vision_hidden_states(tower, pixel_values, n_layers)
    finally:
        if hook is not None:
            hook.remove()
    cls = h[:, 0] if config.has_cls else None
    drop_cls = config.vision_feature_select_strategy == "default" and config.has_cls
    features = h[:, 1:] if drop_cls else h
    score = None
    if scores == "cls_similarity":
        score = F.cosine_similarity(features.float(), cls.float()[:, None], dim=-1)
    elif scores == "dominance":
        score = seen["received"]
        if drop_cls:
            score = score[:, 1:]
        elif config.has_cls:
            score = score.clone()
            score[:, 0] = math.inf
    elif scores is not None:
        raise ValueError(f"unknown tower score {scores!r} (cls_similarity, dominance)")
    return features, score
