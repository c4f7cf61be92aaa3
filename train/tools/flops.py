"""`python -m train flops model=<m> arch=<a> [flops.image_size=[H,W]] [flops.n_text=..] [flops.convention=..] [flops.scope=..]`

Prints one JSON object with the analytic prefill TFLOPs of the plan and of dense on the same
model (per sample, decoder layers, see `models/flops.py` for what is counted), and the resolution
budget it assumed: the image size, the tower's tile size and, for tiling families, the pinpoints;
the visual tokens follow from them (the family's own layout, newlines included), e.g.
    python -m train flops model=llava15_7b arch=shortv       # ratio 0.55 (ShortV table: 4.7 / 8.5)
    python -m train flops model=llava15_7b arch=vica flops.scope=visual_side flops.n_text=46   # 0.31 / 7.65
    python -m train flops model=llava_next_13b arch=shortv   # 2928 visual tokens at 672 x 672 (ShortV: 81.8 -> 41.0)
"""

from __future__ import annotations

import json

from models.flops import ImageTokens, Shape, prefill_flops
from models.plan import Plan

from ..builders import model_and_plan
from .cli import compose_cli


def flops_report(cfg) -> dict:
    model, plan = model_and_plan(cfg)
    f = cfg.flops
    config = model.mllm_config
    shape = Shape.from_hf(config.hf_text_config())
    size = tuple(int(v) for v in f.image_size)
    n_visual = f.n_visual if f.n_visual is not None else ImageTokens.from_places(config.model_family.image_places(config, size))
    kw = dict(convention=f.convention, scope=f.scope, ffn=f.ffn)
    dense = prefill_flops(shape, Plan.dense(shape.layers), n_visual, f.n_text, **kw)
    planned = prefill_flops(shape, plan, n_visual, f.n_text, threshold_keep=f.threshold_keep, pre_llm_keep=f.pre_llm_keep, **kw)
    return {
        "model": model.name,
        "arch": plan.name,
        "n_visual": n_visual if isinstance(n_visual, int) else n_visual.n,
        "n_text": f.n_text,
        "image_size": list(size) if f.n_visual is None else None,
        "tile_size": config.hf_vision_config().image_size,
        "pinpoints": config.image_grid_pinpoints,
        "convention": f.convention,
        "scope": f.scope,
        "dense_tflops": round(dense / 1e12, 6),
        "plan_tflops": round(planned / 1e12, 6),
        "ratio": round(planned / dense, 6),
    }


def main() -> None:
    print(json.dumps(flops_report(compose_cli("flops"))))


if __name__ == "__main__":
    main()
