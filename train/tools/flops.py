"""`python -m train flops model=<m> arch=<a> [flops.image_size=[H,W]] [flops.n_text=..] [flops.convention=..] [flops.scope=..]`

Prints one JSON object with the analytic prefill TFLOPs of the plan and of dense on the same
model (per sample, decoder layers, see `models/flops.py` for what is counted), the visual
front-end's own TFLOPs (`tower_tflops`, `projector_tflops`: the image through the tower and the
projector, `Family.vision_flops`, the same for every plan) and the sums of the three parts
(`*_total_tflops`), and the resolution budget it assumed: the image size, the tower's tile size
and, for tiling families, the pinpoints or the most tiles and the tiles this image takes, for Qwen
the pixel bounds (`pixels`: min, max); the visual tokens follow from them (the family's own layout,
newlines included), e.g.
    python -m train flops model=llava15_7b arch=shortv       # ratio 0.55 (ShortV table: 4.7 / 8.5)
    python -m train flops model=llava15_7b arch=vica flops.scope=visual_side flops.n_text=46   # 0.31 / 7.65
    python -m train flops model=llava_next_13b arch=shortv   # 2928 visual tokens at 672 x 672 (ShortV: 81.8 -> 41.0)
    python -m train flops model=internvl2_5_8b arch=visipruner flops.convention=mac flops.n_text=74   # 5 tiles at 672 x 672
    python -m train flops model=qwen2_vl_7b flops.image_size=[1344,1344] model.config.max_pixels=12845056   # tower 25.5 T
    python -m train flops model=qwen2_5_vl_7b flops.image_size=[448,448] flops.frames=64 arch=frames   # a video (docs/video.md)
    python -m train flops model=qwen3_5_27b arch=fastv     # a hybrid LLM: the LLM's TFLOPs per layer kind too
With `flops.frames` the input is a video of that many frames of `image_size` (Qwen: the family's frame
preprocessing gives its grid), and the KV cache of a sample is reported too (bf16).
A hybrid LLM (Qwen3.5) adds `layer_kinds`: the dense and planned TFLOPs of its linear-attention layers and of
the rest (full-attention layers, routers, gated blocks), with each part's ratio (scope total only).
"""

from __future__ import annotations

import json

from models.flops import ImageTokens, Shape, by_layer_kind, convert, kv_cache_bytes, plan_terms, prefill_flops
from models.families.internvl import max_tiles as family_max_tiles
from models.plan import Plan
from models.vision_flops import towered_size

from ..builders import model_and_plan
from .cli import compose_cli


def flops_report(cfg) -> dict:
    model, plan = model_and_plan(cfg)
    f = cfg.flops
    config = model.mllm_config
    shape = Shape.from_hf(config.hf_text_config())
    size = tuple(int(v) for v in f.image_size)
    frames = f.get("frames")
    if frames is not None:  # a video: its patch grid (t, h, w) stands for the size
        size = config.model_family.video_processor(config).grid(int(frames), size)
    n_visual = f.n_visual if f.n_visual is not None else ImageTokens.from_places(config.model_family.image_places(config, size))
    kw = dict(convention=f.convention, scope=f.scope, ffn=f.ffn)
    dense = prefill_flops(shape, Plan.dense(shape.layers), n_visual, f.n_text, **kw)
    planned = prefill_flops(shape, plan, n_visual, f.n_text, threshold_keep=f.threshold_keep, pre_llm_keep=f.pre_llm_keep, **kw)
    family = config.model_family
    vision = dense_vision = tiles = None  # flops.n_visual gives tokens, not an image: the tower's cost is unknown
    if f.n_visual is None:
        def front(which: tuple[int, ...]) -> dict:
            return {part: convert(flops, f.convention) / 1e12 for part, flops in family.vision_flops(config, which).items()}
        vision, dense_vision = front(towered_size(plan, size)), front(size)  # frame subsampling: fewer steps through the tower
        tiles = family.tiles_per_image(config, size) if hasattr(family, "tiles_per_image") else 1
    return {
        "model": model.name,
        "arch": plan.name,
        "n_visual": n_visual if isinstance(n_visual, int) else n_visual.n,
        "n_text": f.n_text,
        "image_size": list(f.image_size) if f.n_visual is None else None,
        "frames": frames,
        "grid_thw": list(size) if frames is not None else None,
        "tile_size": config.tile_size if hasattr(config.hf_vision_config(), "image_size") else None,  # Qwen: no tiles
        "pinpoints": config.image_grid_pinpoints,
        "pixels": [config.min_pixels, config.max_pixels] if config.max_pixels is not None else None,
        "max_tiles": family_max_tiles(config) if config.family == "internvl" else None,
        "tiles": tiles,
        "convention": f.convention,
        "scope": f.scope,
        "dense_tflops": round(dense / 1e12, 6),
        "plan_tflops": round(planned / 1e12, 6),
        "ratio": round(planned / dense, 6),
        **vision_columns(vision, dense_vision, dense / 1e12, planned / 1e12),
        **({"kv_cache_gib": {"dense": kv_cache_bytes(shape, Plan.dense(shape.layers), n_visual, f.n_text) / 2**30,
                             "plan": kv_cache_bytes(shape, plan, n_visual, f.n_text, threshold_keep=f.threshold_keep,
                                                    pre_llm_keep=f.pre_llm_keep) / 2**30}} if frames is not None else {}),
        "layer_kinds": layer_kind_columns(shape, plan, n_visual, f) if shape.linear is not None and f.scope == "total" else None,
    }


def layer_kind_columns(shape: Shape, plan: Plan, n_visual, f) -> dict:
    """A hybrid LLM's prefill TFLOPs split into its linear-attention layers and the rest, dense and planned."""
    kw = dict(ffn=f.ffn, threshold_keep=f.threshold_keep, pre_llm_keep=f.pre_llm_keep)
    dense = by_layer_kind(plan_terms(shape, Plan.dense(shape.layers), n_visual, f.n_text, **kw)[0])
    planned = by_layer_kind(plan_terms(shape, plan, n_visual, f.n_text, **kw)[0])
    return {kind: {"dense_tflops": round(convert(dense[kind], f.convention) / 1e12, 6),
                   "plan_tflops": round(convert(planned[kind], f.convention) / 1e12, 6),
                   "ratio": round(planned[kind] / dense[kind], 6)} for kind in dense}


def vision_columns(vision: dict | None, dense_vision: dict | None, dense: float, planned: float) -> dict:
    """The tower's, projector's (and Qwen3-VL's DeepStack mergers') TFLOPs under the plan and the totals
    with the LLM's, dense and planned (None without an image; deepstack None for families without it)."""
    if vision is None:
        return dict.fromkeys(("tower_tflops", "projector_tflops", "deepstack_tflops", "dense_total_tflops", "plan_total_tflops"))
    deepstack = vision.get("deepstack")
    return {"tower_tflops": round(vision["tower"], 6), "projector_tflops": round(vision["projector"], 6),
            "deepstack_tflops": None if deepstack is None else round(deepstack, 6),
            "dense_total_tflops": round(dense + sum(dense_vision.values()), 6), "plan_total_tflops": round(planned + sum(vision.values()), 6)}


def main() -> None:
    print(json.dumps(flops_report(compose_cli("flops"))))


if __name__ == "__main__":
    main()
