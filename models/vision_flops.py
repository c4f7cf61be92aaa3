"""Analytic forward FLOPs (2 x multiply-accumulates) of the visual front-end: the tower and the
projector, per image, as the families run them (`Family.vision_flops`).

The LLM count (`models/flops.py`) is what in-LLM plans reduce; the tower and the projector run
whatever the plan does (pre-LLM pruning and pooling act after the projector; only uniform frame
subsampling, `frames`, runs the tower on fewer of a video's steps: `towered_size`), and at high
resolution they are no longer small next to the LLM (families.md §9: InternVL2.5-8B's tower on 13
tiles is 9.4 TFLOPs). Counted are the matmuls and convolutions (what
`torch.utils.flop_counter.FlopCounterMode` counts; `tests/test_vision_flops.py` checks each family
against it): the patch embedding, per tower layer Q/K/V/O, attention scores and mixing over every
token (4 * n^2 * d, no halving), the two-matrix MLP, then the projector's linear layers. Norms,
activations and positional additions are not counted.
"""

from __future__ import annotations


def vit_flops(tokens: int, patches: int, patch_size: int, width: int, mlp: int, layers: int, channels: int = 3) -> int:
    """One image (or tile) through a ViT: the patch-embedding convolution over `patches` patches,
    then `layers` blocks over `tokens` tokens (the patches plus a CLS where there is one)."""
    embed = 2 * patches * channels * patch_size**2 * width
    block = 8 * tokens * width**2 + 4 * tokens**2 * width + 4 * tokens * width * mlp
    return embed + layers * block


def mlp_flops(tokens: int, widths: list[int]) -> int:
    """`tokens` rows through linear layers of widths[0] -> widths[1] -> ... (biases not counted)."""
    return sum(2 * tokens * a * b for a, b in zip(widths, widths[1:]))


def tower_flops(config, layers: int | None = None) -> int:
    """One tile of `config`'s tower, through `layers` blocks (default: the ones the family runs)."""
    vision = config.hf_vision_config()
    g = config.grid_size
    patch = config.tile_size // g
    return vit_flops(g * g + int(config.has_cls), g * g, patch, vision.hidden_size, vision.intermediate_size,
                     config.vision_layers_used if layers is None else layers, vision.num_channels)


def towered_size(plan, size: tuple[int, ...]) -> tuple[int, ...]:
    """The size of what the tower runs on under `plan`: a video's grid (t, h, w) with only the steps
    uniform frame subsampling keeps (models/selection.py `frame_steps`); anything else as given."""
    from .selection import frame_steps

    pre = plan.pre_llm if plan is not None else None
    if pre is None or pre.method != "frames" or len(size) != 3:
        return size
    return (len(frame_steps(int(size[0]), pre.keep)), *size[1:])


def vision_flops_of_batch(config, pixel_values, image_sizes, plan=None) -> dict[str, int]:
    """Tower and projector FLOPs (and any other part a family counts: Qwen3-VL's DeepStack mergers)
    of every image of a batch under `plan`, summed (images without a size, as LLaVA-1.5 gives them,
    count as one tower-sized image)."""
    family = config.model_family
    n = family.image_count(pixel_values, image_sizes)
    sizes = image_sizes.tolist() if image_sizes is not None else [(config.tile_size, config.tile_size)] * n
    total = {"tower": 0, "projector": 0}
    for size in sizes:
        for part, flops in family.vision_flops(config, towered_size(plan, tuple(int(v) for v in size))).items():
            total[part] = total.get(part, 0) + flops
    return total
