"""`Family.vision_flops` (models/vision_flops.py) counts exactly what `FlopCounterMode` measures when
each family encodes a batch: the tower and the projector separately, per image summed, on LLaVA-1.5
(CLIP without and with CLS, SigLIP), LLaVA-NeXT tiles, InternVL tiles with their thumbnail and MobileVLM V2's
LDPv2."""

from __future__ import annotations

import pytest
import torch

from models import MLLM
from models.flops import measure_flops
from models.vision_flops import vision_flops_of_batch
from tests.helpers import (image_batch, internvl_images, next_batch, tiny_config, tiny_internvl_config, next_images, tiny_mobilevlm_config,
                           tiny_next_config)

CASES = {
    "llava-clip": (lambda: tiny_config(), None),
    "llava-clip-full": (lambda: tiny_config(vision_feature_select_strategy="full"), None),
    "llava-siglip": (lambda: tiny_config("siglip", vision_feature_layer=-1), None),
    "llava_next": (lambda: tiny_next_config(), next_images),
    "internvl": (lambda: tiny_internvl_config(), internvl_images),
    "mobilevlm": (lambda: tiny_mobilevlm_config(), None),  # LDPv2: the MLP on 256 patches, the PEG conv on 144
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vision_flops_match_flop_counter(case):
    make_config, images = CASES[case]
    torch.manual_seed(0)
    model = MLLM.from_config(make_config()).eval()
    if images is None:
        _, _, pixels = image_batch(model.config, batch=3)
        sizes = None
    else:
        _, _, pixels, sizes = next_batch(model.config, images=images)
    seen = []
    hook = model.multi_modal_projector.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        total, _ = measure_flops(model.family.encode, model, pixels, sizes)
        hook.remove()
        projector, _ = measure_flops(model.multi_modal_projector, seen[0])
    want = vision_flops_of_batch(model.config, pixels, sizes)
    assert want["projector"] == projector > 0
    assert want["tower"] == total - projector


def flops_cli(*args) -> dict:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "train", "flops", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_flops_cli_reports_tower_projector_and_llm_apart():
    """families.md §9.2's tower column (LLaVA-1.5-7B 0.38 and NeXT-7B 1.9 count all 24 CLIP layers; LLaVA
    stops at the penultimate: 23/24 of it) and InternVL2.5-8B at 480 x 640 (13 tiles: LLM 53.4, tower 9.4);
    the LLM numbers are the ones the CLI gave before (ShortV's 8.5 for LLaVA-1.5-7B)."""
    llava = flops_cli("model=llava15_7b")
    assert llava["dense_tflops"] == pytest.approx(8.5, abs=0.05)
    assert llava["tower_tflops"] == pytest.approx(0.38 * 23 / 24, rel=0.01) and llava["tiles"] == 1
    assert llava["dense_total_tflops"] == pytest.approx(llava["dense_tflops"] + llava["tower_tflops"] + llava["projector_tflops"], abs=1e-5)
    assert flops_cli("model=llava_next_7b")["tower_tflops"] == pytest.approx(1.9 * 23 / 24, rel=0.02)
    intern = flops_cli("model=internvl2_5_8b", "flops.image_size=[480,640]")
    assert (intern["n_visual"], intern["tiles"], intern["max_tiles"]) == (3328, 13, 12)
    assert intern["dense_tflops"] == pytest.approx(53.4, abs=0.05) and intern["tower_tflops"] == pytest.approx(9.4, abs=0.05)


def test_internvl2_5_8b_visipruner_baseline_reading():
    """VisiPruner's InternVL2.5-8B baseline, 11.00 TFLOPs (MACs, visual rows): at 5 tiles (a 672 x 672
    image: 2 x 2 + thumbnail, 1280 tokens) the LLM's visual rows (9.36) plus the tower and projector
    (1.85) give 11.21, within 2%; the LLM alone does not reach it (no integer tile count does)."""
    row = flops_cli("model=internvl2_5_8b", "arch=visipruner", "flops.convention=mac", "flops.scope=visual", "flops.n_text=74")
    assert (row["n_visual"], row["tiles"]) == (1280, 5)
    assert row["dense_total_tflops"] == pytest.approx(11.00, rel=0.02)
    assert row["plan_total_tflops"] < row["dense_total_tflops"] and row["tower_tflops"] == pytest.approx(1.81, abs=0.01)
