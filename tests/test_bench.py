"""`python -m train bench`: rows for every plan, dense first, ratios against dense, a results file.
(Timings themselves are benchmarks, never asserted.)"""

import json

import pytest

from train.tools.bench import run_bench, split_arch_list

TINY = ["model=tiny", "bench.batch=1", "bench.n_text=8", "bench.new_tokens=2", "bench.warmup=0", "bench.repeats=1"]


def test_arch_list_parsing():
    assert split_arch_list(["arch=vica,shortv", "bench.batch=2"]) == (["vica", "shortv"], ["bench.batch=2"])
    assert split_arch_list(["arch=[vica,pdrop]"]) == (["[vica,pdrop]"], [])
    assert split_arch_list([]) == (["dense"], [])


def test_bench_rows_and_results_file(tmp_path):
    rows = run_bench(["vica", "fastv", "pmod"], [*TINY, "bench.n_visual=16", f"bench.out={tmp_path}"])
    assert [r["arch"] for r in rows] == ["dense", "vica", "fastv", "pmod"]
    keys = {"arch", "batch", "n_visual", "n_text", "prefill_ms", "train_step_ms", "decode_ms_per_token", "flops_ratio", "time_ratio",
            "train_time_ratio", "prefill_peak_mb", "train_peak_mb"}
    for r in rows:
        assert set(r) == keys and r["n_visual"] == 16 and r["n_text"] == 8
        assert r["prefill_peak_mb"] is None and r["train_peak_mb"] is None  # CPU: no allocator peaks
        assert r["prefill_ms"] > 0 and r["train_step_ms"] > 0 and r["decode_ms_per_token"] > 0
    assert rows[0]["flops_ratio"] == rows[0]["time_ratio"] == rows[0]["train_time_ratio"] == 1.0
    assert 0 < rows[1]["flops_ratio"] < rows[2]["flops_ratio"] < 1  # ViCA skips more than FastV R=50%
    assert 0 < rows[3]["flops_ratio"] < 1  # p-MoD's routers (zero-initialised: ties, the first tokens enter)
    (results,) = tmp_path.glob("bench-*.json")
    assert json.loads(results.read_text())["rows"] == rows


def test_bench_rejects_a_non_square_token_count(tmp_path):
    with pytest.raises(ValueError, match="bench.n_visual=15 must be a square number"):
        run_bench(["dense"], [*TINY, "bench.n_visual=15", f"bench.out={tmp_path}"])


def test_hf_row_on_the_same_weights_in_bf16(tmp_path):
    """`bench.hf=true`: a row for transformers' LlavaForConditionalGeneration and our dense time over
    HF's; `bench.dtype=bf16` runs every measurement in bf16."""
    rows = run_bench(["vica"], [*TINY, "bench.n_visual=16", "bench.hf=true", "bench.dtype=bf16", f"bench.out={tmp_path}"])
    assert [r["arch"] for r in rows] == ["dense", "vica", "hf_llava_sdpa"]
    hf, dense = rows[-1], rows[0]
    assert hf["flops_ratio"] == 1.0 and hf["prefill_ms"] > 0 and hf["train_step_ms"] > 0 and hf["decode_ms_per_token"] > 0
    assert dense["prefill_vs_hf"] == round(dense["prefill_ms"] / hf["prefill_ms"], 4)
    assert {"train_step_vs_hf", "decode_vs_hf"} <= set(dense)
    (results,) = tmp_path.glob("bench-tiny-cpu-bf16-*.json")
    assert json.loads(results.read_text())["config"]["dtype"] == "bf16"


def test_hf_twin_shares_our_weights_and_gives_our_logits():
    import torch

    from tests.helpers import image_batch, tiny_model
    from train.tools.bench import hf_twin
    from train.model_source import ModelSource

    model = tiny_model()
    hf = hf_twin(model, ModelSource(name="t"))
    assert hf.model.language_model.layers[0].self_attn.q_proj.weight is model.language_model.layers[0].self_attn.q_proj.weight
    ids, mask, pixels = image_batch(model.config, batch=2)
    with torch.no_grad():
        assert torch.allclose(model(ids, mask, pixels).logits, hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, atol=1e-5)


FAMILY_PRESETS = ["tiny_next", "tiny_internvl", "tiny_qwen2vl", "tiny_qwen25vl"]  # one per family beyond LLaVA-1.5


@pytest.mark.parametrize("model", FAMILY_PRESETS)
def test_bench_times_every_family_against_its_transformers_class(model, tmp_path):
    """Each sample's image (64 x 96) goes through the family's preprocessing: its visual tokens are the family's
    count for that size, plans' FLOPs follow the family's layout, and `bench.hf=true` times the family's own class."""
    from train.builders import build
    from train.tools.cli import compose_cli

    config = build(compose_cli("bench", [f"model={model}"]).model, "model").mllm_config
    overrides = [o for o in TINY if not o.startswith("model=")]
    rows = run_bench(["fastv"], [*overrides, f"model={model}", "bench.image_size=[64,96]", "bench.hf=true", f"bench.out={tmp_path}"])
    assert [r["arch"] for r in rows] == ["dense", "fastv", f"hf_{config.family}_sdpa"]
    assert {r["n_visual"] for r in rows} == {config.tokens_per_image((64, 96))}
    assert 0 < rows[1]["flops_ratio"] < 1 and all(r["prefill_ms"] > 0 for r in rows)


def test_n_visual_is_llava_15s_grid_only(tmp_path):
    with pytest.raises(ValueError, match="set bench.image_size"):
        run_bench(["dense"], [*[o for o in TINY if not o.startswith("model=")], "model=tiny_internvl", "bench.n_visual=16",
                              f"bench.out={tmp_path}"])


@pytest.mark.parametrize("model", FAMILY_PRESETS)
def test_hf_twin_of_every_family_gives_our_logits_on_the_bench_batch(model):
    """The bench batch's image inputs for transformers' class (`Family.hf_image_inputs`: NeXT's image_sizes,
    InternVL's flat tiles, Qwen's image_grid_thw and token types) give our dense logits."""
    import torch

    from train.builders import build
    from train.tools.bench import hf_twin, make_batch
    from train.tools.cli import compose_cli

    spec = build(compose_cli("bench", [f"model={model}", "model.config.text.num_hidden_layers=2"]).model, "model")
    torch.manual_seed(0)
    ours = spec.build().eval()
    batch = make_batch(ours, 2, 8, 0, image_size=(64, 96))
    hf = hf_twin(ours, spec).eval()
    with torch.no_grad():
        want = hf(input_ids=batch.ids, attention_mask=batch.mask, **batch.hf).logits
        got = ours(batch.ids, batch.mask, **batch.ours).logits
    assert (got - want).abs().max().item() <= 1e-4
