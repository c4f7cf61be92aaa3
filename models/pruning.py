"""Pre-LLM steps that change the visual tokens entering the LLM (`PreSelect` in `models/plan.py`).

CLS-similarity knee (arXiv 2409.01162): the similarity of patch features to CLS is long-tailed: a
few patches are very similar, most are not. Sorting it in descending order and cutting at the knee
(Kneedle: the point farthest below the chord between the curve's ends, after normalising both
axes) keeps a per-image number of tokens.

Dominant tokens (VisionZip, arXiv 2412.04467): the tokens the tower's CLS attends to most in its
feature layer carry most of the image; VisionZip keeps them (and merges the rest into a few
contextual tokens, which is not done here).

Pooling: k x k average pooling of the projector output on the patch grid, the cheapest compression
of LLaVA-style models (LLaVA-OneVision, arXiv 2408.03326, pools 2 x 2 for video frames).

Pruning returns a keep mask over each image's tokens; pooling returns the pooled tokens in the
first slots of each image and a mask that keeps those slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MLLMConfig
from .vision import image_features


def knee_counts(sorted_desc: Tensor, min_keep: int = 1) -> Tensor:
    """Tokens to keep [N] for each descending curve [N, n] (the knee point is kept)."""
    n = sorted_desc.shape[1]
    if n < 3:
        return torch.full(sorted_desc.shape[:1], n, device=sorted_desc.device)
    x = torch.linspace(0, 1, n, device=sorted_desc.device, dtype=sorted_desc.dtype)
    lo, hi = sorted_desc[:, -1:], sorted_desc[:, :1]
    y = (sorted_desc - lo) / (hi - lo).clamp_min(1e-12)
    gap = (1 - x)[None] - y  # distance below the chord from (0, 1) to (1, 0), up to a constant
    return (gap.argmax(1) + 1).clamp(min=min(min_keep, n))


def cls_knee_keep(features: Tensor, cls: Tensor, min_keep: int = 1) -> Tensor:
    """Boolean keep mask [N, n_v] over each image's patch features [N, n_v, d] given CLS [N, d]."""
    sim = F.cosine_similarity(features.float(), cls.float()[:, None], dim=-1)
    order = sim.argsort(1, descending=True)
    counts = knee_counts(torch.gather(sim, 1, order), min_keep)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(sim.shape[1], device=sim.device).expand_as(order))
    return rank < counts[:, None]


def top_keep(scores: Tensor, k: int) -> Tensor:
    """Boolean mask [N, n] of each row's `k` highest scores."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(1, scores.topk(k, dim=1).indices, True)


def attention_received(attn: nn.Module, x: Tensor, from_cls: bool) -> Tensor:
    """Head-averaged attention [N, n] each token gets in a CLIP/SigLIP attention module on its
    input `x` [N, n, d]: from the CLS query (token 0), or averaged over all queries."""
    n, length, _ = x.shape
    heads = lambda t: t.view(n, t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    k = heads(attn.k_proj(x))
    q = heads(attn.q_proj(x[:, :1] if from_cls else x))
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)  # [N, H, queries, n]
    return probs.mean((1, 2))


def features_and_dominance(tower: nn.Module, pixel_values: Tensor, config: MLLMConfig) -> tuple[Tensor, Tensor | None, Tensor]:
    """`image_features` plus each feature token's dominance [N, n_v]: the attention it receives
    in the tower's feature layer (from CLS when there is one). A forward hook reads that layer's
    attention input inside the layer's own forward (where ZeRO-3/FSDP have gathered its weights);
    the CLS token itself, when it is among the features, always ranks first (as in VisionZip)."""
    n_layers = config.vision_layers_used
    if n_layers == 0:
        raise ValueError("pre_llm.method=dominant reads the attention of the tower's feature layer, but "
                         "vision_feature_layer=0 is the embedding output; pick a later feature layer")
    seen = {}

    def read_attention(module, args, kwargs, output):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad():
            seen["received"] = attention_received(module, x, config.has_cls)

    hook = tower.encoder.layers[n_layers - 1].self_attn.register_forward_hook(read_attention, with_kwargs=True)
    try:
        features, cls = image_features(tower, pixel_values, config)
    finally:
        hook.remove()
    received = seen["received"]
    if features.shape[1] < received.shape[1]:  # CLS dropped from the features (LLaVA's "default")
        received = received[:, 1:]
    elif config.has_cls:
        received = received.clone()
        received[:, 0] = math.inf
    return features, cls, received


def pool_tokens(tokens: Tensor, grid: int, kernel: int) -> tuple[Tensor, Tensor]:
    """`kernel` x `kernel` mean of each image's tokens [N, grid^2, d] over the grid (partial windows
    at the bottom/right edges average what they cover). Returns [N, grid^2, d] holding the
    ceil(grid / kernel)^2 pooled tokens first (raster order, zeros after them) and their keep mask."""
    n, n_v, d = tokens.shape
    if n_v != grid * grid:
        raise ValueError(f"pooling needs the {grid}x{grid} patch grid as visual tokens, got {n_v} tokens per image "
                         "(a CLS token among them? use vision_feature_select_strategy=default)")
    image = tokens.transpose(1, 2).reshape(n, d, grid, grid)
    pooled = F.avg_pool2d(image, kernel, stride=kernel, ceil_mode=True).flatten(2).transpose(1, 2)  # [N, n_p, d]
    out = torch.cat([pooled, tokens.new_zeros(n, n_v - pooled.shape[1], d)], 1)
    keep = (torch.arange(n_v, device=tokens.device) < pooled.shape[1]).expand(n, -1)
    return out, keep
