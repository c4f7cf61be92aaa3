"""The analytic FLOPs model counts what the engine runs, and reproduces the papers' tables."""

import pytest
import torch
import yaml

from models.blind_scores import image_keys_for
from models.flops import Shape, measure_flops, plan_terms, prefill_flops
from models.methods import resolve_arch
from models.mllm import query_index
from models.plan import Plan
from models.decoder import run_decoder
from models.streams import images_per_row
from tests.helpers import image_batch
from tests.test_plans import CONF, PRESETS, plan_model


def measured_decoder_flops(model, batch=2):
    input_ids, mask, pixels = image_batch(model.config, batch=batch, suffix=9)
    with torch.no_grad():
        layout, text, vis = model.embed_inputs(input_ids, mask, pixels)
        pre = model.plan.pre_llm
        counts = {-1: vis.n} if pre is not None and pre.tokens(model.config.num_image_tokens) is None else {}  # CLS knee: measured
        keys = image_keys_for(model.plan, pixels, images_per_row(vis))
        flops, _ = measure_flops(
            run_decoder, model.language_model, model.plan, text, vis, query_index(text, None), model.xattn, image_keys=keys,
            rope=model.rope_table(text, input_ids.shape[1]) if model.plan.renumbers else None, routing=model.routing(),
        )
    return flops / batch, text.n, vis, counts


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "visipruner"])  # threshold counts: below
def test_analytic_flops_match_flop_counter(name):
    model = plan_model(name, {})
    measured, n_t, vis, counts = measured_decoder_flops(model)
    shape = Shape.from_hf(model.text_config)
    terms, _ = plan_terms(shape, model.plan, model.config.num_image_tokens, n_t, counts=counts)
    analytic = sum(terms.values())
    assert abs(analytic - measured) / measured < 0.02, (analytic, measured)


def test_threshold_counts_are_honoured():
    model = plan_model("visipruner", {"threshold": 0.0})  # keeps every token with a positive score
    measured, n_t, vis, _ = measured_decoder_flops(model, batch=1)
    shape = Shape.from_hf(model.text_config)
    sel = next(i for i, p in enumerate(model.plan.layers) if p.select)
    terms, _ = plan_terms(shape, model.plan, model.config.num_image_tokens, n_t, counts={sel: model.config.num_image_tokens})
    assert abs(sum(terms.values()) - measured) / measured < 0.02


LLAVA7B = Shape(d=4096, m=11008, layers=32, heads=32, kv_heads=32, head_dim=128)


def arch(name, **knobs):
    a = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    if knobs:
        (m,) = a["methods"]
        a["methods"][m].update(knobs)
    return resolve_arch(a, 32, 32)


def tflops(plan, n_t=64, **kw):
    return prefill_flops(LLAVA7B, plan, 576, n_t, **kw) / 1e12


def test_reproduces_paper_tables():
    dense = Plan.dense(32)
    assert tflops(dense) == pytest.approx(8.5, abs=0.05)  # ShortV table, whole sequence
    assert tflops(arch("fastv")) == pytest.approx(4.9, abs=0.05)  # FastV K=2 R=50%
    assert tflops(arch("vtw")) == pytest.approx(4.7, abs=0.05)  # VTW K=16
    assert tflops(arch("shortv")) == pytest.approx(4.7, abs=0.05)  # ShortV N=19
    assert tflops(arch("shortv")) / tflops(dense) == pytest.approx(0.55, abs=0.01)
    assert tflops(dense, n_t=46, scope="visual_side") == pytest.approx(7.65, abs=0.02)  # ViCA baseline
    assert tflops(arch("vica"), n_t=46, scope="visual_side") == pytest.approx(0.31, abs=0.01)
    assert tflops(arch("vica"), n_t=46, scope="visual_side") / tflops(dense, n_t=46, scope="visual_side") == pytest.approx(0.041, abs=0.002)
    assert tflops(dense, n_t=74, scope="visual", convention="mac") == pytest.approx(3.82, abs=0.01)  # VisiPruner


@pytest.mark.parametrize("name, knobs, kept", [
    ("random", {}, 192), ("uniform", {"keep": 2 / 9}, 128), ("dominant", {"keep": 1 / 9}, 64), ("pool", {}, 144), ("pool", {"kernel": 3}, 64),
    ("random", {"keep": 0.3333333333}, 192), ("uniform", {"keep": 0.2222222222}, 128), ("dominant", {"keep": 0.1111111111}, 64),
])
def test_baselines_before_the_llm_cost_the_dense_model_on_fewer_tokens(name, knobs, kept):
    """Selecting before layer 0 or a pre-LLM step: every layer sees `kept` visual tokens, no probe."""
    assert prefill_flops(LLAVA7B, arch(name, **knobs), 576, 64) == prefill_flops(LLAVA7B, Plan.dense(32), kept, 64)


def test_random_selection_later_in_the_llm_costs_full_layers_before_it():
    plan = arch("random", K=16)
    terms, present = plan_terms(LLAVA7B, plan, 576, 64)
    assert present == [576] * 16 + [192] * 16 and "probe" not in terms


def test_llava_next_flops_reproduce_shortv_next_13b_and_follow_the_image_size():
    """ShortV's LLaVA-NeXT-13B row (81.8 -> 41.0 TFLOPs, 24 of 40 layers frozen) within 3%, its NeXT-7B
    list (19 of 32), and 2928 visual tokens at 672 x 672 (2880 + 48 newlines) from the family's layout."""
    import subprocess
    import sys
    import json

    def flops(*args):
        out = subprocess.run([sys.executable, "-m", "train", "flops", *args], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    row = flops("model=llava_next_13b", "arch=shortv")
    assert row["n_visual"] == 2928 and row["image_size"] == [672, 672] and row["tile_size"] == 336 and row["pinpoints"]
    assert abs(row["dense_tflops"] - 81.8) / 81.8 < 0.03 and abs(row["plan_tflops"] - 41.0) / 41.0 < 0.03
    assert flops("model=llava_next_13b", "arch=shortv", "flops.image_size=[336,336]")["n_visual"] == 576 + 24 * 25  # 1176: unpadded to 24 x 24
    assert flops("model=llava15_7b", "arch=dense")["n_visual"] == 576


def test_reproduces_pmod_prefill_flops():
    """p-MoD's Tables 1-2 (2xMAC, every token, decoder layers; it states neither its prompt length nor
    NeXT's image): LLaVA-1.5-7B 8.38 -> 4.92 at our default 64 text tokens, LLaVA-NeXT-7B 39.46 -> 21.94
    for a 672 x 616 image (2736 visual tokens), both within 3%; at 672 x 672 (2928 tokens) NeXT is 43.4."""
    from train.tools.flops import flops_report
    from train.tools.cli import compose_cli

    for overrides, dense, routed in ((["model=llava15_7b"], 8.38, 4.92), (["model=llava_next_7b", "flops.image_size=[672,616]"], 39.46, 21.94)):
        row = flops_report(compose_cli("flops", ["arch=pmod", *overrides]))
        assert abs(row["dense_tflops"] - dense) / dense < 0.03 and abs(row["plan_tflops"] - routed) / routed < 0.03, row
    assert tflops(arch("gamma_mod")) / tflops(Plan.dense(32)) == pytest.approx(0.60, abs=0.01)


def test_shortv_takes_the_papers_list_for_each_model():
    from models.methods import SHORTV_PAPER

    for (family, depth), (n, ranking) in SHORTV_PAPER.items():
        plan = resolve_arch(yaml.safe_load((CONF / "shortv.yaml").read_text()), depth, 32, family)
        assert sorted(i for i, p in enumerate(plan.layers) if not p.updates_visual) == sorted(ranking[:n])
    assert sum(not p.updates_visual for p in resolve_arch({"methods": {"shortv": {}}}, 4, 4, "llava_next").layers) == 2  # scaled


@pytest.mark.parametrize("name", [p for p in PRESETS if p not in ("visipruner", "cls_knee")])
def test_analytic_flops_match_flop_counter_on_next(name):
    """On LLaVA-NeXT (tiles, newlines, rows of different lengths) the analytic count of one image's
    layout equals FlopCounterMode on the real forward."""
    from models.flops import ImageTokens
    from tests.helpers import next_batch
    from tests.test_plans_next import next_plan_model

    model = next_plan_model(name, {})
    ids, mask, pixels, sizes = next_batch(model.config, prefix=3, suffix=9)
    config = model.config
    shape = Shape.from_hf(model.text_config)
    for row in range(len(sizes)):  # one row (one image) at a time: the analytic count is per sample
        keep = mask[row].bool()
        one = ids[row : row + 1, keep], mask[row : row + 1, keep], pixels[row : row + 1], sizes[row : row + 1]
        with torch.no_grad():
            layout, text, vis = model.embed_inputs(*one[:3], one[3])
            keys = image_keys_for(model.plan, one[2], images_per_row(vis))
            measured, _ = measure_flops(run_decoder, model.language_model, model.plan, text, vis, query_index(text, None),
                                        model.xattn, image_keys=keys,
                                        rope=model.rope_table(text, one[0].shape[1]) if model.plan.renumbers else None,
                                        routing=model.routing())
        image = ImageTokens.from_places(config.model_family.image_places(config, tuple(sizes[row].tolist())))
        terms, _ = plan_terms(shape, model.plan, image, text.n)
        assert abs(sum(terms.values()) - measured) / measured < 0.02, (name, row, sum(terms.values()), measured)
