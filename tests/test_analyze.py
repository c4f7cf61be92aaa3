"""`python -m train analyze`: the calibration engine, planted cases it must find, the decision
rules on hand-made scores, and the CLI writing plans that load, scores and figures."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from data.chat import ChatTokenizer
from data.batch import Collator
from models.families.llava import PadToSquare
from data.datamodule import ImageSpec, SampleEncoder
from data.pipeline import ShardStream
from models import MLLM, MLLMConfig
from models import calibration as cal
from models.methods import load_arch, resolve_arch
from tests.helpers import image_batch, tiny_config
from tests.test_train import small_task_model_config
from train.tools import analyze as cli
from train.tools.cli import compose_cli

CONF = Path(__file__).resolve().parents[1] / "conf" / "arch"
DEPTH = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription (50x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def with_plan(model: MLLM, arch: dict) -> MLLM:
    t = model.text_config
    model.set_plan(resolve_arch(arch, t.num_hidden_layers, t.num_attention_heads))
    return model


def random_batches(config, n_batches=2, batch=3):
    out = []
    for seed in range(n_batches):
        ids, mask, pixels = image_batch(config, batch=batch, pad_left=[0, 2, 4][:batch], suffix=6, seed=seed)
        out.append(SimpleNamespace(prompt_ids=ids, prompt_mask=mask, pixel_values=pixels))
    return out


def kl_per_layer(model, batches, make_variant):
    """Mean KL per layer of `make_variant(plan, i)` (a Plan or a Variant)."""
    depth = model.text_config.num_hidden_layers
    variants = {i: make_variant(model.plan, i) for i in range(depth)}
    variants = {i: v if isinstance(v, cal.Variant) else cal.Variant(v) for i, v in variants.items()}
    kl, _ = cal.calibrate(model, batches, variants, progress=False)
    return [cal.mean(kl[i]) for i in range(depth)]


# --- the engine ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["dense", "vica", "shortv", "fastv", "pdrop", "visipruner", "vtw", "yopo", "xattn", "cls_knee"])
def test_layer_hook_sees_every_layer_and_changes_nothing(preset):
    """Analyses hook into the model's own forward: a hook that keeps each layer's outputs sees every
    layer once, in order, with its policy, and leaves the logits exactly as without a hook."""
    torch.manual_seed(0)
    model = MLLM.from_config(tiny_config(text_layers=8, image_size=32)).eval()
    with_plan(model, yaml.safe_load((CONF / f"{preset}.yaml").read_text()))
    for block in model.xattn.values():
        torch.nn.init.normal_(block.attn_gate)
    (batch,) = random_batches(model.config, n_batches=1)
    with torch.no_grad():
        want = model(batch.prompt_ids, batch.prompt_mask, batch.pixel_values, logits="last").logits
        seen = []

        def keep(step: cal.LayerStep):
            seen.append((step.index, step.policy))
            return step.text_out, step.vis_out

        got = cal.last_logits(model, batch, keep)
    assert torch.equal(got, want)
    assert seen == list(enumerate(model.plan.layers))


def test_recomputed_attention_is_the_layers_own():
    """The attention maps the statistics use, pushed through o_proj and the FFN, give exactly the
    dense layer's output at the last prompt token (same norm, projections, RoPE, masks)."""
    torch.manual_seed(0)
    model = MLLM.from_config(tiny_config(text_layers=3)).eval()
    (batch,) = random_batches(model.config, n_batches=1)
    errors = []

    def check(s: cal.LayerStep):
        m = cal.layer_attention(s.layer, s.text_in, s.vis_in)
        rows = torch.arange(len(s.query_idx))
        o = (m.probs[rows, :, s.query_idx].unsqueeze(-1) * m.values).sum(2).flatten(1)  # [B, H*dh]
        layer = s.layer
        h = s.text_in.h[rows, s.query_idx] + layer.self_attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        errors.append((h - s.text_out.h[rows, s.query_idx]).abs().max().item())
        assert torch.allclose(m.probs.sum(-1), torch.ones(()))

    with torch.no_grad():
        cal.last_logits(model, batch, check)
    assert len(errors) == 3 and max(errors) < 1e-5


def test_kl_direction_matches_shortv_code():
    """ShortV: nn.KLDivLoss(log_softmax(orig), softmax(modified)) = KL(p_modified || p_orig)."""
    g = torch.Generator().manual_seed(0)
    orig, mod = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    shortv = torch.nn.KLDivLoss(reduction="none")(orig.log_softmax(-1), mod.softmax(-1)).sum(-1)
    assert torch.allclose(cal.kl_divergence(orig.log_softmax(-1), mod.log_softmax(-1), "mod_base"), shortv, atol=1e-6)
    reverse = torch.nn.KLDivLoss(reduction="none")(mod.log_softmax(-1), orig.softmax(-1)).sum(-1)
    assert torch.allclose(cal.kl_divergence(orig.log_softmax(-1), mod.log_softmax(-1), "base_mod"), reverse, atol=1e-6)
    with pytest.raises(ValueError, match="KL direction"):
        cal.kl_divergence(orig, mod, "forward")


def test_variants_restore_the_plan_and_are_relative_to_it():
    model = with_plan(MLLM.from_config(tiny_config(text_layers=4)).eval(), {"methods": {"vtw": {"K": 2, "reference_depth": 4}}})
    before = model.plan
    assert cal.withdraw_visual(before, 3) is before  # already withdrawn before layer 2: nothing to change
    assert [p.drop_visual for p in cal.withdraw_visual(before, 1).layers] == [False, True, False, False]
    cal.calibrate(model, random_batches(model.config, 1), {1: cal.Variant(cal.freeze_visual(before, 1)),
                                                            2: cal.Variant(freeze_text=2)}, progress=False)
    assert model.plan is before


# --- planted cases -----------------------------------------------------------------------------------


def test_vica_knockout_finds_the_only_layer_where_text_reads_the_image():
    j = 3
    torch.manual_seed(0)
    model = with_plan(MLLM.from_config(tiny_config(text_layers=DEPTH)).eval(), {"methods": {"vica": {"t2v_layers": [j], "reference_depth": DEPTH}}})
    kl = kl_per_layer(model, random_batches(model.config), cal.knock_out_text_to_visual)
    assert cal.top_k(kl, 1) == [j] and kl[j] > 0
    assert all(v < 1e-9 for i, v in enumerate(kl) if i != j), kl


def test_shortv_finds_the_only_layer_that_updates_visual_tokens():
    j = 2
    torch.manual_seed(0)
    arch = {"methods": {"rules": [{"layers": "all", "set": {"visual_update": "frozen"}}, {"layers": [j], "set": {"visual_update": "full"}}]}}
    model = with_plan(MLLM.from_config(tiny_config(text_layers=DEPTH)).eval(), arch)
    kl = kl_per_layer(model, random_batches(model.config), cal.freeze_visual)
    assert cal.rank_ascending(kl)[-1] == j and kl[j] > 0
    assert all(v < 1e-9 for i, v in enumerate(kl) if i != j), kl


def test_layer_contribution_of_an_identity_layer_is_zero_for_both_token_types():
    """Dense model whose layer j writes nothing (o_proj and down_proj zeroed): freezing either token
    type there changes nothing; every other layer matters for text; the last layer's visual LC is
    exactly 0 (visual states updated there are never read: ShortV's observation)."""
    j = 1
    torch.manual_seed(0)
    model = MLLM.from_config(tiny_config(text_layers=4)).eval()
    layer = model.language_model.layers[j]
    torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    batches = random_batches(model.config)
    visual = kl_per_layer(model, batches, cal.freeze_visual)
    text = kl_per_layer(model, batches, lambda plan, i: cal.Variant(freeze_text=i))
    assert visual[j] == 0 and text[j] == 0
    assert visual[-1] < 1e-6  # rounding only: a dense layer runs as one causal sequence, a frozen one masked
    assert all(text[i] > 0 for i in range(4) if i != j) and visual[0] > 0
    assert cal.rank_ascending(visual)[0] == j


# --- decision rules on hand-made scores ------------------------------------------------------------


def test_vtw_rule_first_layer_at_or_after_min_layer_under_eta():
    curve = [0.9, 0.5, 0.002, 0.2, 0.01, 0.004, 0.0029, 0.001, 0.0]
    assert cal.vtw_layer(curve, eta=0.003, min_layer=5) == 6  # layer 2 is under eta but before min_layer
    assert cal.vtw_layer(curve, eta=0.003, min_layer=0) == 2
    assert cal.vtw_layer(curve, eta=0.003, min_layer=6) == 6  # "<= eta", inclusive at min_layer
    assert cal.vtw_layer(curve[:6], eta=0.003, min_layer=5) is None
    assert cal.vtw_layer([float("nan"), 0.0], eta=0.1, min_layer=0) == 1


def test_ranking_and_top_k_rules():
    nan = float("nan")
    assert cal.rank_ascending([0.3, 0.0, nan, 0.1, 0.0]) == [1, 4, 3, 0, 2]
    assert cal.top_k([0.3, 0.0, nan, 0.1, 0.5], 2) == [0, 4]
    with pytest.raises(ValueError, match="must be in 1..3"):
        cal.top_k([1.0, 2.0, 3.0], 4)


def test_yopo_vote_keeps_heads_active_on_most_samples():
    ratios = torch.zeros(10, 3, 4)  # [samples, layers, heads]
    ratios[:, :, 1] = 1.0  # always active
    ratios[:5, :, 2] = 1.0  # active on half the samples
    ratios[:3, :, 3] = 1.0  # on 30%
    kept, votes = cal.yopo_heads(ratios, tau=0.5, vote=0.4, full_layers=1)
    assert kept == [[0, 1, 2, 3], [1, 2], [1, 2]]
    assert votes[1].tolist() == pytest.approx([0.0, 1.0, 0.5, 0.3])
    kept, _ = cal.yopo_heads(torch.zeros(4, 2, 3).index_fill_(2, torch.tensor([2]), 0.01), tau=0.5, vote=0.4, full_layers=0)
    assert kept == [[2], [2]]  # no head passes: the most active one stays (a plan needs one)


def test_visipruner_rules_on_hand_made_contributions():
    def layer(cos_values, norms):
        return torch.tensor(cos_values), torch.tensor(norms)

    # 6 layers, 4 visual tokens: layer 2 is the first where a token moves the output (cos < 0.995);
    # tokens 1 and 3 are kept there (norm > 0.2); layers 3 and 5 have no kept-token impact -> exit 6?
    rows = [layer([1, 1, 1, 1], [0, 0, 0, 0]), layer([0.999, 1, 1, 1], [0.1, 0, 0, 0]), layer([1, 0.9, 1, 0.99], [0.1, 0.5, 0, 0.3]),
            layer([0.9, 0.9995, 1, 0.9999], [0, 0, 0, 0]), layer([1, 0.99, 1, 1], [0, 0, 0, 0]), layer([1, 1, 1, 1], [0, 0, 0, 0])]
    cos, norm = [c for c, _ in rows], [n for _, n in rows]
    # layer 3: kept tokens 1, 3 stay above 0.999 (token 0 is not kept) -> count 1; layer 4: token 1 -> no;
    # layer 5 -> count 2: vision leaves before layer 6
    assert cal.visipruner_sample(cos, norm, 0.995, 0.2, 0.999, 2) == (2, 6)
    assert cal.visipruner_sample(cos, norm, 0.995, 0.2, 0.999, 1) == (2, 4)
    assert cal.visipruner_sample(cos[:2], norm[:2], 0.995, 0.2, 0.999, 2) == (None, None)
    # medians with "never" counted as the depth: F = 3 of [2, 2, 3, never], exit = never (8) -> clamped
    stages = cal.visipruner_stages([2, 3, 2, None], [5, None, 5, None], depth=8)
    assert (stages["filter_layer"], stages["shallow"], stages["middle"], stages["exit"]) == (3, 3, 4, 8 - 1)
    assert stages["exit_clamped"] and stages["samples_filtering"] == 3
    stages = cal.visipruner_stages([0, 0, 1], [3, 4, 4], depth=8)
    assert (stages["shallow"], stages["middle"], stages["exit"]) == (1, 2, 4) and not stages["exit_clamped"]
    assert not cal.visipruner_stages([None, None, 1], [None, None, 3], depth=8)["detected"]  # most never filter
    with pytest.raises(ValueError, match="at least 4 layers"):
        cal.visipruner_stages([1], [2], depth=3)


# --- the CLI on a tiny trained checkpoint -------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_args(synthetic_dir, tmp_path_factory):
    root, _ = synthetic_dir
    listed = lambda split: "[" + ",".join(f"'{p}'" for p in sorted(root.glob(f"{split}-*.tar"))) + "]"  # noqa: E731
    work = tmp_path_factory.mktemp("analyze")
    return ["data=shards", f"data.source.train={listed('train')}", f"data.source.val={listed('val')}", f"paths.root_dir={work}",
            "analyze.samples=6", "analyze.batch_size=3", "analyze.progress=false", "analyze.threads=1"]


@pytest.fixture(scope="module")
def checkpoint(synthetic_dir, task_tokenizer, tmp_path_factory):
    """A 6-layer model trained for a few steps on the synthetic task, saved with its tokenizer."""
    root, _ = synthetic_dir
    base = small_task_model_config()
    config = MLLMConfig(**{**base.__dict__, "text": {**base.text, "num_hidden_layers": DEPTH}})
    chat = ChatTokenizer(task_tokenizer, "vicuna", config.num_image_tokens, 512, system="")
    stream = ShardStream(sorted(str(p) for p in root.glob("train-*.tar")), SampleEncoder(chat, ImageSpec(PadToSquare(64, (0.5,) * 3, (0.5,) * 3))))
    collate, samples = Collator(0), iter(stream)
    torch.manual_seed(0)
    model = MLLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        b = collate([next(samples) for _ in range(8)])
        loss = model(b.input_ids, b.attention_mask, b.pixel_values, labels=b.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "export"
    model.eval().save_pretrained(path)
    task_tokenizer.save_pretrained(path)
    return path


def run_cli(args, capsys) -> tuple[dict, str]:
    """Run the CLI in-process; the last stdout line is the JSON summary it returns. (summary, stderr)"""
    summary = cli.main(args)
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    return summary, captured.err


def assert_loadable(plan_file: Path, model: MLLM):
    t = model.text_config
    plan = resolve_arch(load_arch({"path": str(plan_file)}), t.num_hidden_layers, t.num_attention_heads)
    model.set_plan(plan)
    cfg = compose_cli("train", ["arch=file", f"arch.path={plan_file}"])  # what `python -m train arch=file arch.path=<file>` composes
    assert resolve_arch(OmegaConf.to_container(cfg.arch), t.num_hidden_layers, t.num_attention_heads) == plan
    return plan


def test_all_analyses_on_a_trained_checkpoint_write_loadable_plans_scores_figures(checkpoint, shard_args, tmp_path, capsys):
    out = tmp_path / "out"
    run_dir = checkpoint.parent  # a training run directory: its export/ is used (with its tokenizer)
    s, _ = run_cli([*shard_args, "analyze.method=all", f"analyze.checkpoint={run_dir}", f"analyze.out={out}", "analyze.wandb=true"], capsys)
    assert s["samples"] == 6 and set(s["methods"]) == set(cli.ANALYSES)
    model = MLLM.from_pretrained(checkpoint)
    for method, r in s["methods"].items():
        plan = assert_loadable(Path(r["plan"]), model)
        scores = json.loads(Path(r["scores"]).read_text())
        assert scores["settings"]["samples"] == 6 and scores["method"] == method
        assert Path(r["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if method == "shortv":
            assert len(scores["scores"]["visual_lc"]) == DEPTH and scores["scores"]["visual_lc"][-1] < 1e-6  # 0 up to rounding
            assert sum(not p.updates_visual for p in plan.layers) == r["chosen"]["N"] == round(19 / 32 * DEPTH)
        if method == "vica":
            assert [i for i, p in enumerate(plan.layers) if p.text_reads] == r["chosen"]["t2v_layers"]
        if method == "yopo":
            assert len(scores["scores"]["head_ratio_mean"]) == DEPTH
    images = list((out / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    assert len(images) == len(cli.ANALYSES) and s["wandb"].startswith(str(out / "wandb"))


def test_analysis_is_relative_to_the_checkpoint_plan(checkpoint, shard_args, tmp_path, capsys):
    """A checkpoint carrying a ViCA plan with one T2V layer: the knock-out finds exactly it, and the
    emitted plan keeps the checkpoint's plan underneath. (Saved without a tokenizer: one is
    trained on the shards, as for the tiny presets.)"""
    j = 4
    model = with_plan(MLLM.from_pretrained(checkpoint), {"methods": {"vica": {"t2v_layers": [j], "reference_depth": DEPTH}}})
    planted = tmp_path / "vica-ckpt"
    model.save_pretrained(planted)
    s, _ = run_cli([*shard_args, "analyze.method=vica", "analyze.vica.K=1", f"analyze.checkpoint={planted}", f"analyze.out={tmp_path / 'o'}"],
                capsys)
    r = s["methods"]["vica"]
    assert s["base_plan"] == "vica" and r["chosen"]["t2v_layers"] == [j]
    kl = json.loads(Path(r["scores"]).read_text())["scores"]["knockout_kl"]
    assert kl[j] > 0 and all(v < 1e-9 for i, v in enumerate(kl) if i != j)
    assert "layers" in yaml.safe_load(Path(r["plan"]).read_text())
    assert_loadable(Path(r["plan"]), model)


def test_build_from_model_config_trains_a_tokenizer_and_finds_vtw_layer(shard_args, tmp_path, capsys):
    s, err = run_cli([*shard_args, "analyze.method=vtw", "analyze.vtw.eta=1e9", "analyze.vtw.min_layer=2", f"analyze.out={tmp_path}",
                 "model.config.vision.image_size=32", "model.config.text.num_hidden_layers=3"], capsys)
    assert s["methods"]["vtw"]["chosen"]["K"] == 2  # every KL <= a huge eta: the first searched layer
    plan = yaml.safe_load(Path(s["methods"]["vtw"]["plan"]).read_text())
    assert plan["methods"] == {"vtw": {"K": 2, "reference_depth": 3}}
    assert "randomly initialised" in err


@pytest.mark.parametrize(
    "override, message",
    [
        (["analyze.method=shortvv"], "did you mean 'shortv'"),
        (["analyze.checkpoint=/nonexistent/ckpt"], "no such directory"),
        (["analyze.method=shortv", "analyze.shortv.N=99"], "analyze.shortv.N=99 must be in 1..3"),
        (["analyze.method=vica", "analyze.vica.K=0"], "analyze.vica.K=0 must be in 1..3"),
        (["analyze.kl_direction=forward"], "kl_direction must be one of"),
        (["analyze.method=vtw", "analyze.vtw.min_layer=3"], "analyze.vtw.min_layer=3 must be in 0..2"),
        (["analyze.method=visipruner"], "visipruner needs at least 4 layers"),
    ],
)
def test_clear_errors(override, message, shard_args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*shard_args, "model.config.text.num_hidden_layers=3", *override])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
