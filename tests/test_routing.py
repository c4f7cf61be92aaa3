"""Learned layer skipping (`LayerPolicy.route`, models/routing.py; p-MoD, gamma-MoD): the checks of
dynamic-depth.md §4.2 on tiny models. The presets `pmod` and `gamma_mod` also run through every preset
test (tests/test_plans*.py: the masked reference in prefill and decode on every family, packing, SDPA
paths, FLOPs against FlopCounterMode)."""

from dataclasses import replace

import pytest
import torch

from models import MLLM
from models.config import ConfigError
from models.generation import greedy_generate
from models.methods import resolve_arch
from models.plan import Plan, Route
from models.routing import budgets, ranked_keep
from tests.helpers import image_batch, left_padded, tiny_config
from tests.reference import reference_generate, reference_logits

LAYERS = 4
CONFIG = tiny_config(text_layers=LAYERS, image_size=32)  # 64 visual tokens per image


def routed(*layers: int, **route) -> Plan:
    return resolve_arch({"name": "routed", "methods": {"rules": [{"layers": list(layers), "set": {"route": {"keep": 0.5, **route}}}]}},
                        LAYERS, 4)


def model_with(plan: Plan, seed: int = 0, random_routers: bool = True, dtype=None) -> MLLM:
    torch.manual_seed(seed)
    model = MLLM.from_config(CONFIG, dtype=dtype)
    model.set_plan(plan)
    if random_routers:
        for router in model.routers.values():
            torch.nn.init.normal_(router.weight, std=0.1)
            torch.nn.init.normal_(router.bias, std=0.1)
    return model


def ragged_batch(seed: int = 0):
    """Rows with two images, one image and none (left-padded): ids, mask, pixels [3, 3, S, S], labels
    on the text after the last image."""
    g = torch.Generator().manual_seed(seed)
    n_v, size = CONFIG.num_image_tokens, CONFIG.hf_vision_config().image_size
    image = torch.full((n_v,), CONFIG.image_token_id)

    def words(n):
        return torch.randint(4, 128, (n,), generator=g)

    rows = [torch.cat([words(2), image, words(3), image, words(6)]), torch.cat([words(4), image, words(9)]), words(12)]
    ids, mask = left_padded(rows)
    labels = ids.masked_fill(~mask.bool(), -100)
    labels[:, : ids.shape[1] - 5] = -100
    return ids, mask, torch.randn(3, 3, size, size, generator=g), labels


def text_of(ids, mask):
    return mask.bool() & (ids != CONFIG.image_token_id)


def test_keep_one_at_the_initial_gate_is_bit_identical_to_dense():
    """Every layer routed with keep 1.0 and zero-initialised routers (w = 1 exactly): logits and every
    gradient equal the dense model's bit for bit."""
    ids, mask, pixels, labels = ragged_batch()
    results = []
    for plan in (Plan.dense(LAYERS), routed(0, 1, 2, 3, keep=1.0)):
        model = model_with(plan, random_routers=False).train()
        logits = model(ids, mask, pixels, logits="all").logits
        model(ids, mask, pixels, labels=labels).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("routers.")}
        results.append((logits, grads))
    (dense_logits, dense_grads), (logits, grads) = results
    text = text_of(ids, mask)
    assert torch.equal(logits[text], dense_logits[text])
    assert grads.keys() == dense_grads.keys()
    for name, g in grads.items():
        assert (g is None and dense_grads[name] is None) or torch.equal(g, dense_grads[name]), name


@pytest.mark.parametrize("route", [
    {},
    {"keep": 0.2, "rounding": "ceil", "router_input": "normed", "gate": "sigmoid", "skipped": "identity"},
    {"keep": 0.05, "min_keep": 0},  # floor(0.05 * 64) = 3, and 0 of a row's 0 candidates
    {"keep": 0.7, "router": "shared", "aux": 0.01},
], ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()) or "default")
def test_physical_routing_equals_the_masked_reference_with_ragged_images(route):
    model = model_with(routed(1, 2, 3, **route)).eval()
    ids, mask, pixels, _ = ragged_batch()
    with torch.no_grad():
        got = model(ids, mask, pixels, logits="all").logits
    text = text_of(ids, mask)
    assert (got - reference_logits(model, ids, mask, pixels))[text].abs().max().item() <= 1e-5
    model.set_plan(Plan.dense(LAYERS))
    with torch.no_grad():
        dense = model(ids, mask, pixels, logits="all").logits
    assert (got - dense)[text].abs().max().item() > 1e-3  # routing changed something


def test_the_router_keeps_the_best_scores_of_each_image_ties_to_the_earlier_token():
    g = torch.Generator().manual_seed(0)
    b, v = 3, 40
    scores = torch.randint(0, 4, (b, v), generator=g).float()  # many ties
    image = (torch.arange(v) >= 25).long().expand(b, v).clone()  # two images of 25 and 15 tokens
    candidates = torch.rand(b, v, generator=g) > 0.2
    route = Route(keep=0.3)
    n = torch.zeros(b, v, dtype=torch.long)
    n[:, 0], n[:, 1] = (candidates & (image == 0)).sum(1), (candidates & (image == 1)).sum(1)
    got = ranked_keep(scores, image, candidates, budgets(route, n))
    want = torch.zeros_like(candidates)
    for row in range(b):
        for im in (0, 1):
            members = [j for j in range(v) if candidates[row, j] and image[row, j] == im]
            for j in sorted(members, key=lambda j: (-float(scores[row, j]), j))[: route.budget(len(members))]:
                want[row, j] = True
    assert torch.equal(got, want)
    tied = ranked_keep(torch.zeros(b, v), image, candidates, budgets(route, n))  # zero-initialised routers
    for row in range(b):
        for im in (0, 1):
            members = [j for j in range(v) if candidates[row, j] and image[row, j] == im]
            assert [j for j in members if tied[row, j]] == members[: route.budget(len(members))]


def test_budgets_round_as_the_route_says():
    n = torch.tensor([0, 1, 7, 64, 576])
    for route in (Route(keep=0.844), Route(keep=0.15, rounding="ceil"), Route(keep=0.05, min_keep=0), Route(keep=0.5, min_keep=3)):
        assert budgets(route, n).tolist() == [route.budget(int(x)) for x in n]
    assert Route(keep=0.8445).budget(576) == 486 and Route(keep=0.5, rounding="ceil").budget(7) == 4


def test_the_router_learns_and_autograd_equals_a_finite_difference():
    """At zero init every score ties and the router still gets a gradient (through the gate on the kept
    tokens' FFN and on the skipped tokens' state); in fp64 a central difference on the bias (which moves
    every score alike, so the kept set stays) agrees with autograd, for tied and for random routers (to
    0.3%: transformers' RMSNorm computes in fp32, which keeps the step at 1e-2)."""
    ids, mask, pixels, labels = ragged_batch()
    supervised = labels[:, 1:] != -100

    def loss(model):  # the model's own loss is fp32 (cross-entropy on float logits): this one stays fp64
        logits = model(ids, mask, pixels, logits="all").logits[:, :-1][supervised]
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:][supervised])

    for random_routers in (False, True):
        model = model_with(routed(1, 2), random_routers=random_routers, dtype=torch.float64).train()
        loss(model).backward()
        assert all(r.weight.grad.abs().sum() > 0 for r in model.routers.values())
        for router in model.routers.values():
            want, eps = router.bias.grad.item(), 1e-2
            with torch.no_grad():
                router.bias += eps
                up = loss(model).item()
                router.bias -= 2 * eps
                down = loss(model).item()
                router.bias += eps
            assert want != 0 and (up - down) / (2 * eps) == pytest.approx(want, rel=3e-3), (random_routers, want)


@pytest.mark.parametrize("random_routers", [False, True], ids=["tied", "random"])
def test_gradient_checkpointing_gives_identical_losses_and_gradients(random_routers):
    ids, mask, pixels, labels = ragged_batch()
    runs = []
    for checkpointing in (False, True):
        model = model_with(routed(1, 2, 3, aux=0.1), random_routers=random_routers).train()
        model.gradient_checkpointing = checkpointing
        out = model(ids, mask, pixels, labels=labels)
        (out.loss + out.route_aux_loss).backward()
        runs.append((out.loss.detach(), out.route_aux_loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, aux_a, grads_a), (loss_b, aux_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b) and torch.equal(aux_a, aux_b)
    for name, g in grads_a.items():
        assert (g is None and grads_b[name] is None) or torch.equal(g, grads_b[name]), name


def test_text_is_never_routed_and_a_sample_does_not_depend_on_its_batch_mates():
    model = model_with(routed(0, 1, 2, 3, keep=0.3)).eval()
    ids, mask, pixels, _ = ragged_batch()
    with torch.no_grad():
        together = model(ids, mask, pixels, logits="all").logits
        model_dense = model_with(Plan.dense(LAYERS)).eval()
        text_only = model_dense(ids[2:], mask[2:], None, logits="all").logits
        for row, images in ((0, slice(0, 2)), (1, slice(2, 3)), (2, slice(0, 0))):
            keep = mask[row].bool()
            alone = model(ids[row : row + 1, keep], mask[row : row + 1, keep], pixels[images] if images.stop else None, logits="all").logits
            text = text_of(ids[row : row + 1, keep], mask[row : row + 1, keep])
            assert (alone[text] - together[row : row + 1, keep][text]).abs().max().item() <= 1e-5
    text = text_of(ids[2:], mask[2:])
    assert (text_only[text] - together[2:][text]).abs().max().item() <= 1e-5  # a text-only row runs as dense


def test_decoding_equals_the_full_forward_and_each_layer_caches_text_plus_its_kept_tokens():
    model = model_with(routed(1, 2, 3, keep=0.3)).eval()
    ids, mask, pixels = image_batch(CONFIG, batch=2, pad_left=[0, 3], suffix=5)
    got = greedy_generate(model, ids, mask, pixels, max_new_tokens=4, eos_token_id=[-1])
    assert torch.equal(got, reference_generate(model, ids, mask, pixels, max_new_tokens=4))
    cache = model(ids, mask, pixels, logits="last", use_cache=True).cache
    n_v = CONFIG.num_image_tokens
    kept = [n_v] + [model.plan.layers[i].route.budget(n_v) for i in (1, 2, 3)]
    assert [int(k.is_visual[0].sum()) for k in cache.keys] == kept
    assert [int((k.valid & ~k.is_visual)[0].sum()) for k in cache.keys] == [int(text_of(ids, mask)[0].sum())] * LAYERS


def test_stats_and_aux_loss():
    model = model_with(routed(1, 3, keep=0.25, aux=0.5), random_routers=False).train()
    ids, mask, pixels, labels = ragged_batch()
    out = model(ids, mask, pixels, labels=labels)
    assert sorted(out.route_stats) == [1, 3]
    for stats in out.route_stats.values():
        assert stats.keep.item() == pytest.approx(0.25) and stats.weight.item() == 1.0  # 16 of 64 per image, w = 1 at init
    # binary cross-entropy of score 0 against 16 kept of 64: log 2, times 0.5, for each of the two layers
    assert out.route_aux_loss.item() == pytest.approx(2 * 0.5 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    out.route_aux_loss.backward()
    assert all(r.weight.grad is not None for r in model.routers.values())
    text_only = model(ids[2:], mask[2:], None, labels=labels[2:])
    text_only.route_aux_loss.backward()  # 0, but every router took part (data-parallel ranks without images)
    assert text_only.route_aux_loss.item() == 0.0


@pytest.mark.parametrize("arch, message", [
    ({"methods": {"pmod": {}, "vica": {}}}, "visual_update=frozen updates none"),
    ({"methods": {"rules": [{"layers": [1], "set": {"route": {"keep": 0.5}, "drop_visual": True}}]}}, "route has no visual tokens"),
    ({"methods": {"vtw": {"K": 8}, "rules": [{"layers": [2], "set": {"route": {"keep": 0.5}}}]}}, "route has no visual tokens"),
    ({"methods": {"pmod": {}, "pdrop": {}}}, "route and select.source=current"),
    ({"methods": {"rules": [{"layers": [1], "set": {"route": {"keep": 0.5}}}], "fastv": {"K": 16}}}, "next layer's select.source=previous"),
    ({"methods": {"rules": [{"layers": [1], "set": {"route": {"keep": 1.5}}}]}}, "route.keep must be in"),
    ({"methods": {"rules": [{"layers": [1], "set": {"route": {}}}]}}, "route needs keep"),
    ({"methods": {"rules": [{"layers": [1], "set": {"route": {"keep": 0.5, "gate": "relu"}}}]}}, "route.gate must be one of"),
    ({"methods": {"rules": [{"layers": [1], "set": {"route": {"keep": 0.5, "rotuer": "own"}}}]}}, "did you mean 'router'"),
])
def test_plans_that_cannot_route_fail_at_config_time(arch, message):
    with pytest.raises(ConfigError, match=message):
        resolve_arch(arch, num_layers=4, num_heads=4)


def test_routing_composes_with_selections_and_pre_llm_steps():
    for arch in ({"methods": {"fastv": {"K": 8}, "pmod": {}}}, {"methods": {"pool": {"kernel": 3}, "gamma_mod": {}}},
                 {"methods": {"random": {"K": 8, "keep": 0.5}, "pmod": {}}}):
        plan = resolve_arch(arch, LAYERS, 4)
        model = model_with(plan).eval()
        ids, mask, pixels = image_batch(CONFIG, batch=2, pad_left=[0, 3], suffix=5)
        with torch.no_grad():
            got = model(ids, mask, pixels, logits="all").logits
        text = text_of(ids, mask)
        assert (got - reference_logits(model, ids, mask, pixels))[text].abs().max().item() <= 1e-5, plan.name


def test_routers_survive_save_and_load(tmp_path):
    model = model_with(routed(1, 2, router="shared"))
    model.save_pretrained(tmp_path / "export")
    loaded = MLLM.from_pretrained(tmp_path / "export")
    assert loaded.plan == model.plan and list(loaded.routers) == ["shared"]
    assert torch.equal(loaded.routers["shared"].weight, model.routers["shared"].weight)
    assert replace(model.plan.layers[1].route, keep=0.5) == model.plan.layers[1].route


# --- training: optimizer group, stages, LoRA, the job ----------------------------------------------------


def test_routers_train_with_the_llm_in_their_own_optimizer_group(tmp_path):
    from safetensors.torch import load_file

    from train.optim import OptimConfig, build_optimizer
    from train.peft import PeftConfig, apply_training_setup, export_model, trainable_prefixes
    from train.stage import StageConfig, apply_stage

    model = model_with(routed(1, 2))
    router_params = {id(p) for p in model.routers.parameters()}
    assert apply_stage(model, StageConfig("finetune", False, True, True))["routers"] == 2 * (64 + 1)
    opt, _ = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1, router_lr=2e-5), 10)
    own = [g for g in opt.param_groups if router_params & {id(p) for p in g["params"]}]
    assert len(own) == 1 and {id(p) for p in own[0]["params"]} == router_params
    assert own[0]["initial_lr"] == 2e-5 and own[0]["weight_decay"] == 0.0
    default, _ = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1), 10)
    assert [g["initial_lr"] for g in default.param_groups if router_params & {id(p) for p in g["params"]}] == [1e-3]
    assert apply_stage(model, StageConfig("pretrain", False, True, False))["routers"] == 0

    lora = model_with(routed(1, 2))
    counts = apply_training_setup(lora, StageConfig("finetune", False, True, True), PeftConfig("lora", r=4, alpha=8, dropout=0.0))
    assert counts["routers"] == 2 * (64 + 1) and "routers." in trainable_prefixes(lora)
    adapter = export_model(lora, tmp_path / "export")
    assert "routers.2.weight" in load_file(adapter / "trainable.safetensors")
    exported = MLLM.from_pretrained(tmp_path / "export")
    assert torch.equal(exported.routers["2"].weight, lora.routers["2"].weight) and exported.plan == lora.plan


def test_a_routed_job_trains_logs_exports_and_evaluates(tmp_path):
    """`python -m train arch=gamma_mod` (2 layers: layer 0 routed, the shared router): the auxiliary loss,
    the realised keep and the mean gate are logged; the export holds the trained routers, loads back into
    MLLM (not into transformers, which the summary says) and evaluates to the run's own metrics; a routed
    plan whose routers a checkpoint lacks refuses to evaluate."""
    import json
    import subprocess
    import sys

    from tests.test_train import DATA, ROOT, evaluate

    cmd = [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", "run_name=routed", "arch=gamma_mod",
           "trainer.max_steps=4", "trainer.val_check_interval=4", *DATA, "eval.noimage=false",
           "model.config.text.num_hidden_layers=2", "model.config.vision.num_hidden_layers=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "routed").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    m = summary["metrics"]
    assert m["route/keep/0"] == pytest.approx(0.5) and 0 < m["route/weight/0"] < 1 and m["train/route_aux_loss"] > 0
    assert summary["export_class"] is None and "MLLM.from_pretrained only" in proc.stdout
    exported = MLLM.from_pretrained(run / "export")
    assert list(exported.routers) == ["shared"] and exported.routers["shared"].weight.abs().sum() > 0  # trained from zero

    proc, evaluated = evaluate(tmp_path, f"model.pretrained={run / 'export'}", "eval.noimage=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert evaluated["arch"] == "gamma_mod" and {k: v for k, v in evaluated["metrics"].items() if k.startswith("val/")} == \
        {k: v for k, v in m.items() if k.startswith("val/")}
    proc, _ = evaluate(tmp_path, f"model.pretrained={run / 'export'}", "arch=pmod")
    assert proc.returncode != 0 and "routers ['1']" in proc.stderr and "needs training" in proc.stderr
