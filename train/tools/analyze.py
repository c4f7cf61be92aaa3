"""`python -m train analyze <shortv|vtw|vica|yopo|visipruner|all> [analyze.checkpoint=DIR] [overrides]`

(the method may also be given as `analyze.method=<name>`.)

Finds the layers (and heads) that matter for visual tokens on N calibration samples and writes, in
`analyze.out`: `plan_<method>.yaml` (train with it: `python -m train arch=file arch.path=<that file>`),
`scores_<method>.json` (raw per-layer / per-head numbers and the settings) and `<method>.png`.
Prints one JSON summary on stdout, e.g.
    python -m train analyze shortv analyze.checkpoint=outputs/tiny-dense/<run>/export
    python -m train analyze all model=llava15_7b model.pretrained=/ckpt/llava-1.5-7b-hf \
        data=shards data.source.train=... data.source.val=... analyze.samples=40

Analyses (models/calibration.py has the engine and the rules):
  shortv      visual Layer Contribution (freeze visual tokens in layer i, KL of the next token); the N
              lowest layers are frozen; text LC is measured as a reference
  vtw         KL when all visual tokens leave before layer K; K = first K >= min_layer with KL <= eta
  vica        KL when text cannot read visual tokens in layer i; the K highest become T2V layers
  yopo        per-head visual/text attention-mass ratio, majority vote over samples -> head masks
  visipruner  value-aware contribution of each visual token to the last prompt token per layer ->
              shallow / middle / exit boundaries
Every change is measured against the model's current plan (the checkpoint's, or `arch=...`), and the
emitted plan keeps that plan underneath (`layers:`) when it is not dense.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from data.batch import Batch
from models import MLLM
from models import calibration as cal
from models.config import ConfigError, check_keys
from models.methods import resolve_arch
from models.plan import Plan

from ..builders import build, build_data
from ..model_source import ModelSource
from . import analyze_plots as plots
from .cli import compose_cli

ANALYSES = ("shortv", "vtw", "vica", "yopo", "visipruner")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class Context:
    """What every analysis needs besides its scores."""

    model: MLLM
    knobs: DictConfig
    n_samples: int
    direction: str

    @property
    def depth(self) -> int:
        return len(self.model.plan.layers)

    @property
    def heads(self) -> int:
        return self.model.text_config.num_attention_heads


@dataclass
class Result:
    method: str
    arch: dict  # the plan file's content (arch schema)
    chosen: dict  # what the analysis picked (also in the stdout summary)
    scores: dict  # raw numbers for the JSON
    figure: object = None
    notes: list[str] = field(default_factory=list)


# --- setup ----------------------------------------------------------------------------------------


def parse_methods(name: str) -> list[str]:
    if name == "all":
        return list(ANALYSES)
    check_keys({name: 0}, set(ANALYSES) | {"all"}, "analyze.method")
    return [name]


def check_settings(a: DictConfig) -> None:
    if a.split not in ("train", "val"):
        raise ConfigError(f"analyze.split must be train or val, got {a.split!r}")
    if a.kl_direction not in cal.KL_DIRECTIONS:
        raise ConfigError(f"analyze.kl_direction must be one of {list(cal.KL_DIRECTIONS)}, got {a.kl_direction!r}")
    if int(a.samples) < 1 or int(a.batch_size) < 1:
        raise ConfigError("analyze.samples and analyze.batch_size must be >= 1")


def checkpoint_dir(path: str) -> Path:
    """The from_pretrained directory (a training run directory resolves to its `export/`)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"analyze.checkpoint={path!r}: no such directory")
    if not (p / "config.json").is_file() and (p / "export" / "config.json").is_file():
        p = p / "export"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"analyze.checkpoint={path!r} has no config.json: point it at a save_pretrained / export directory")
    return p


def model_sources(cfg: DictConfig) -> tuple[ModelSource, ModelSource]:
    """(model, tokenizer source): a checkpoint replaces the model's weights and architecture;
    its own tokenizer is preferred, else one is trained on the data like for the tiny presets."""
    spec = build(cfg.model, "model")
    if cfg.analyze.checkpoint:
        ckpt = checkpoint_dir(cfg.analyze.checkpoint)
        spec = replace(spec, pretrained=str(ckpt), vision_pretrained=None, llm_pretrained=None)
        if not spec.tokenizer and not any((ckpt / f).is_file() for f in TOKENIZER_FILES):
            return spec, replace(spec, pretrained=None, config=asdict(spec.mllm_config))
    return spec, spec


def load_model(cfg: DictConfig, spec: ModelSource, device: torch.device) -> MLLM:
    """The model under its base plan: `arch=...` when given, else the checkpoint's own plan."""
    if not (spec.pretrained or spec.vision_pretrained or spec.llm_pretrained):
        print("warning: no checkpoint given (analyze.checkpoint / model.pretrained): analysing randomly initialised weights",
              file=sys.stderr)
    torch.manual_seed(cfg.seed)
    plan = spec.plan(OmegaConf.to_container(cfg.arch, resolve=True)) if "arch" in cfg and cfg.arch is not None else None
    return spec.build(plan).to(device).eval()


def calibration_batches(cfg: DictConfig, spec: ModelSource, model: MLLM) -> list[Batch]:
    """N samples with an image from the data's shards, encoded and collated as for evaluation
    (left-padded prompts: everything before the evaluated reply, data/validity.py)."""
    from data.pipeline import ShardStream

    a = cfg.analyze
    _, dm = build_data(spec, build(cfg.data, "data"), cfg.paths.data_dir, cfg.seed)
    urls = dm.val_urls if a.split == "val" else dm.train_urls
    stream = ShardStream(urls, dm.encoder, seed=cfg.seed, shuffle_buffer=int(a.shuffle_buffer))
    samples = list(islice((s for s in stream if s["pixel_values"] is not None), int(a.samples)))
    if not samples:
        raise ConfigError(f"no samples with an image in the {a.split} shards ({len(urls)} shard(s), e.g. {urls[0]})")
    if len(samples) < a.samples:
        print(f"warning: only {len(samples)} samples with an image in the {a.split} shards (asked for {a.samples})", file=sys.stderr)
    device = model.lm_head.weight.device
    batches = []
    for i in range(0, len(samples), int(a.batch_size)):
        b = dm.collate(samples[i : i + int(a.batch_size)])
        batches.append(replace(b, prompt_ids=b.prompt_ids.to(device), prompt_mask=b.prompt_mask.to(device),
                               pixel_values=b.pixel_values.to(device, model.dtype),
                               image_sizes=None if b.image_sizes is None else b.image_sizes.to(device)))
    return batches


# --- variants each analysis needs ------------------------------------------------------------------


def variants_for(methods: list[str], model: MLLM, knobs: DictConfig) -> tuple[dict[tuple[str, int], cal.Variant], list[str]]:
    """Every (family, layer) variant the methods need; variants the base plan cannot take (e.g. a
    knock-out before a layer that scores tokens with it) are left out and named."""
    plan, t = model.plan, model.text_config
    wanted = {}
    for i in range(len(plan.layers)):
        if "shortv" in methods:
            wanted["shortv_visual", i] = cal.Variant(cal.freeze_visual(plan, i))
            if knobs.shortv.text:
                wanted["shortv_text", i] = cal.Variant(freeze_text=i)
        if "vtw" in methods:
            wanted["vtw", i] = cal.Variant(cal.withdraw_visual(plan, i))
        if "vica" in methods:
            wanted["vica", i] = cal.Variant(cal.knock_out_text_to_visual(plan, i))
    out, skipped = {}, []
    for key, v in wanted.items():
        try:
            if v.plan is not None:
                v.plan.validate(t.num_attention_heads)
            out[key] = v
        except ConfigError as e:
            skipped.append(f"{key[0]} layer {key[1]} not measured (score NaN): {e}")
    return out, skipped


def per_layer(kl: dict, family: str, depth: int) -> list[float]:
    """Mean KL per layer (NaN where the variant was not measured)."""
    return [cal.mean(kl.get((family, i), [])) for i in range(depth)]


def per_sample(kl: dict, family: str, depth: int) -> list[list[float]]:
    return [kl.get((family, i), []) for i in range(depth)]


def fraction_of_layers(value, fraction: float, depth: int, name: str) -> int:
    """A layer count knob: `value`, or the paper's fraction of the depth when null."""
    n = max(1, round(fraction * depth)) if value is None else int(value)
    if not 1 <= n <= depth:
        raise ConfigError(f"{name}={n} must be in 1..{depth} (the model has {depth} layers)")
    return n


def vtw_min_layer(value, depth: int) -> int:
    """First withdrawal layer searched: `value`, or VTW's 5 of 32 scaled to the depth (at least 1)."""
    k = max(1, round(5 * depth / 32)) if value is None else int(value)
    if not 0 <= k < depth:
        raise ConfigError(f"analyze.vtw.min_layer={k} must be in 0..{depth - 1} (the model has {depth} layers)")
    return k


def check_layer_knobs(a: DictConfig, methods: list[str], depth: int) -> None:
    """Layer-count knobs against the model's depth, before any forward pass."""
    if "shortv" in methods:
        fraction_of_layers(a.shortv.N, 19 / 32, depth, "analyze.shortv.N")
    if "vica" in methods:
        fraction_of_layers(a.vica.K, 8 / 32, depth, "analyze.vica.K")
    if "vtw" in methods:
        vtw_min_layer(a.vtw.min_layer, depth)
    if "visipruner" in methods and depth < 4:
        raise ConfigError(f"visipruner needs at least 4 layers (shallow < middle < exit), the model has {depth}")


def with_base(arch: dict, plan: Plan) -> dict:
    """The method's plan on top of a non-dense base plan: the base as explicit per-layer policies
    (`layers:`, merged with the method's own per-layer entries), the method's rules over it."""
    if plan.is_dense:
        return arch
    base = plan.to_dict()
    layers = [{**b, **a} for b, a in zip(base["layers"], arch["layers"])] if arch.get("layers") else base["layers"]
    return {**arch, "layers": layers, **({"pre_llm": base["pre_llm"]} if base["pre_llm"] else {})}


def final_plan(r: Result, model: MLLM) -> dict:
    """The plan to write: on top of the model's base plan when the two combine, else the method's
    own (noted); either way one that resolves and that the model accepts."""
    combined = with_base(r.arch, model.plan)
    if combined is r.arch:
        verify_plan(r.arch, model)
        return r.arch
    try:
        verify_plan(combined, model)
        return combined
    except ConfigError as e:
        verify_plan(r.arch, model)
        r.notes.append(f"the base plan {model.plan.name!r} cannot stay underneath ({e}); this plan replaces it")
        return r.arch


# --- the analyses -------------------------------------------------------------------------------


def analyze_shortv(kl: dict, stats, ctx: Context) -> Result:
    k = ctx.knobs.shortv
    visual = per_layer(kl, "shortv_visual", ctx.depth)
    text = per_layer(kl, "shortv_text", ctx.depth) if k.text else None
    n = fraction_of_layers(k.N, 19 / 32, ctx.depth, "analyze.shortv.N")
    ranked = cal.rank_ascending(visual)
    arch = {"name": "shortv-analyzed", "methods": {"shortv": {"N": n, "ranked_layers": ranked, "reference_depth": ctx.depth}}}
    chosen = {"N": n, "frozen_layers": sorted(ranked[:n]), "ranked_layers": ranked}
    scores = {"visual_lc": visual, "text_lc": text, "visual_lc_per_sample": per_sample(kl, "shortv_visual", ctx.depth)}
    fig = plots.shortv_figure(visual, text, chosen["frozen_layers"], ctx.n_samples, ctx.direction)
    return Result("shortv", arch, chosen, scores, fig)


def analyze_vtw(kl: dict, stats, ctx: Context) -> Result:
    k = ctx.knobs.vtw
    curve = per_layer(kl, "vtw", ctx.depth)
    min_layer = vtw_min_layer(k.min_layer, ctx.depth)
    K = cal.vtw_layer(curve, float(k.eta), min_layer)
    notes = []
    if K is None:
        notes.append(f"no layer >= {min_layer} has KL <= eta={k.eta}; the plan withdraws nothing (raise analyze.vtw.eta)")
        arch = {"name": "vtw-analyzed", "methods": {}}
    else:
        arch = {"name": "vtw-analyzed", "methods": {"vtw": {"K": K, "reference_depth": ctx.depth}}}
    fig = plots.vtw_figure(curve, float(k.eta), min_layer, K, ctx.n_samples, ctx.direction)
    scores = {"withdraw_kl": curve, "withdraw_kl_per_sample": per_sample(kl, "vtw", ctx.depth)}
    return Result("vtw", arch, {"K": K, "eta": float(k.eta), "min_layer": min_layer}, scores, fig, notes)


def analyze_vica(kl: dict, stats, ctx: Context) -> Result:
    scores_ = per_layer(kl, "vica", ctx.depth)
    K = fraction_of_layers(ctx.knobs.vica.K, 8 / 32, ctx.depth, "analyze.vica.K")
    t2v = cal.top_k(scores_, K)
    arch = {"name": "vica-analyzed", "methods": {"vica": {"t2v_layers": t2v, "reference_depth": ctx.depth}}}
    fig = plots.vica_figure(scores_, t2v, ctx.n_samples, ctx.direction)
    scores = {"knockout_kl": scores_, "knockout_kl_per_sample": per_sample(kl, "vica", ctx.depth)}
    notes = ["ViCA plans freeze visual tokens everywhere: train (stage=finetune) with the plan active"]
    return Result("vica", arch, {"K": K, "t2v_layers": t2v}, scores, fig, notes)


def analyze_yopo(kl: dict, stats: cal.AttentionStats, ctx: Context) -> Result:
    k = ctx.knobs.yopo
    ratios = torch.tensor(stats.head_ratio)  # [N, L, H]
    full = min(int(k.full_head_layers), ctx.depth)
    kept, votes = cal.yopo_heads(ratios, float(k.tau), float(k.vote), full)
    arch = {"name": "yopo-analyzed", "layers": [{"visual_heads": heads} if len(heads) < ctx.heads else {} for heads in kept]}
    activity = ratios.mean(0)
    fig = plots.yopo_figure(activity.tolist(), votes.tolist(), kept, float(k.tau), float(k.vote), full, ctx.n_samples)
    chosen = {"visual_heads": kept, "heads_kept": sum(map(len, kept)), "heads_total": ctx.depth * ctx.heads}
    scores = {"head_ratio_mean": activity.tolist(), "vote_share": votes.tolist(), "head_ratio_per_sample": stats.head_ratio}
    notes = ["only head masks are emitted; add YOPO's window / FFN fraction / cut as rules if wanted"]
    return Result("yopo", arch, chosen, scores, fig, notes)


def analyze_visipruner(kl: dict, stats: cal.AttentionStats, ctx: Context) -> Result:
    k = ctx.knobs.visipruner
    detections = [cal.visipruner_sample(c, n, float(k.layer_threshold), float(k.token_threshold), float(k.exit_threshold),
                                        int(k.exit_count)) for c, n in zip(stats.token_cos, stats.token_norm)]
    try:
        stages = cal.visipruner_stages([f for f, _ in detections], [e for _, e in detections], ctx.depth)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    notes = []
    if not stages["detected"]:
        notes.append(f"most samples never filter (no single visual token moves the last output below cos {k.layer_threshold}, "
                     f"{stages['samples_filtering']} of {len(detections)} do); using the paper's boundaries 6 / 9 / 24 of 32 "
                     "scaled to the model")
        s = max(1, 6 * ctx.depth // 32)
        m = max(s + 1, 9 * ctx.depth // 32)
        stages = {**stages, "shallow": s, "middle": m, "exit": min(max(m + 1, 24 * ctx.depth // 32), ctx.depth - 1)}
    elif stages["exit_clamped"]:
        notes.append("the median sample never withdraws vision: exit clamped to the last layer")
    knobs = {"shallow": stages["shallow"], "middle": stages["middle"], "exit": stages["exit"], "threshold": float(k.token_threshold),
             "reference_depth": ctx.depth, "semantics": str(k.semantics)}
    arch = {"name": "visipruner-analyzed", "methods": {"visipruner": knobs}}
    median_cos = [_median([float(c[layer].min()) if c[layer].numel() else 1.0 for c in stats.token_cos]) for layer in range(ctx.depth)]
    n_tokens = [cal.mean([float((n[layer] > k.token_threshold).sum()) for n in stats.token_norm]) for layer in range(ctx.depth)]
    mass = [cal.mean([m[layer] for m in stats.visual_mass_last]) for layer in range(ctx.depth)]
    fig = plots.visipruner_figure(mass, median_cos, n_tokens, stages, float(k.layer_threshold), float(k.token_threshold), ctx.n_samples)
    scores = {"visual_attention_mass_last": mass, "median_min_token_cos": median_cos, "tokens_above_threshold": n_tokens,
              "per_sample": [{"filter_layer": f, "exit": e} for f, e in detections]}
    return Result("visipruner", arch, {**stages}, scores, fig, notes)


def json_safe(x):
    """NaN / inf -> None (strict JSON); tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


NUMBER_LIST = re.compile(r"\[[-+\d\s,.eEnul]*\]")  # a JSON list of numbers / nulls


def dump_json(obj) -> str:
    """Indented JSON with every list of numbers on one line (per-layer rows stay readable)."""
    return NUMBER_LIST.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), json.dumps(json_safe(obj), indent=1))


class PlanDumper(yaml.SafeDumper):
    """Block mappings, flow lists of scalars: `ranked_layers: [3, 1, 0]`, `- visual_heads: [0, 2]`."""


PlanDumper.add_representer(
    list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=all(not isinstance(x, (list, dict)) for x in data))
)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


ANALYSES: dict[str, Callable[[dict, "cal.AttentionStats | None", Context], Result]] = {
    "shortv": analyze_shortv, "vtw": analyze_vtw, "vica": analyze_vica, "yopo": analyze_yopo, "visipruner": analyze_visipruner,
}
NEEDS_ATTENTION = {"yopo", "visipruner"}


# --- outputs ---------------------------------------------------------------------------------------


def verify_plan(arch: dict, model: MLLM) -> Plan:
    """The emitted plan resolves for this model and the model accepts it (never write a plan that fails later)."""
    t = model.text_config
    plan = resolve_arch(arch, t.num_hidden_layers, t.num_attention_heads, model.config.family, getattr(t, "layer_types", None))
    with cal.plan_applied(model, plan):
        pass
    return plan


def write_plan(path: Path, r: Result, source: str, n: int) -> None:
    header = [f"# Plan written by `python -m train analyze analyze.method={r.method}` on {source}",
              f"# from {n} calibration samples ({time.strftime('%Y-%m-%d %H:%M')}); raw scores: scores_{r.method}.json.",
              f"# Train / evaluate with it: python -m train arch=file arch.path={path}"] + [f"# note: {x}" for x in r.notes]
    path.write_text("\n".join(header) + "\n" + yaml.dump(r.arch, Dumper=PlanDumper, sort_keys=False))


def log_wandb(out: Path, figures: dict[str, Path], chosen: dict, settings: dict, project: str) -> str:
    """Log the figures as images to a W&B run under `out` (offline unless WANDB_MODE says otherwise)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    run = wandb.init(project=project, name=out.name, dir=str(out), job_type="analyze", config=settings)
    run.log({f"analyze/{m}": wandb.Image(str(p), caption=f"{m}: see scores_{m}.json") for m, p in figures.items()})
    run.summary.update({f"{m}/{k}": v for m, c in chosen.items() for k, v in c.items() if isinstance(v, (int, float, str))})
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir


def analyze(cfg: DictConfig) -> dict:
    start = time.time()
    a = cfg.analyze
    methods = parse_methods(str(a.method))
    check_settings(a)
    if a.threads:
        torch.set_num_threads(int(a.threads))
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device))
    spec, tok_spec = model_sources(cfg)
    model = load_model(cfg, spec, device)
    depth = model.text_config.num_hidden_layers
    check_layer_knobs(a, methods, depth)
    batches = calibration_batches(cfg, tok_spec, model)
    n = sum(b.size for b in batches)
    variants, skipped = variants_for(methods, model, a)
    kl, stats = cal.calibrate(model, batches, variants, attention=bool(NEEDS_ATTENTION & set(methods)),
                              direction=str(a.kl_direction), progress=bool(a.progress))
    ctx = Context(model, a, n, str(a.kl_direction))
    out = Path(str(a.out)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    source = spec.pretrained or f"model={spec.name} (config)"
    settings = {"methods": methods, "samples": n, "source": source, "base_plan": model.plan.name, "depth": depth,
                "heads": ctx.heads, "analyze": OmegaConf.to_container(a, resolve=True)}
    summary = {"out": str(out), "samples": n, "base_plan": model.plan.name, "methods": {}}
    figures, chosen = {}, {}
    for m in methods:
        r = ANALYSES[m](kl, stats, ctx)
        r.notes += [x for x in skipped if x.startswith(m)]
        r.arch = final_plan(r, model)
        plan_path, score_path, fig_path = out / f"plan_{m}.yaml", out / f"scores_{m}.json", out / f"{m}.png"
        write_plan(plan_path, r, source, n)
        plots.save(r.figure, fig_path)
        score_path.write_text(dump_json({"method": m, "settings": settings, "chosen": r.chosen, "notes": r.notes,
                                         "plan": r.arch, "scores": r.scores}))
        figures[m], chosen[m] = fig_path, r.chosen
        brief = {k: v for k, v in r.chosen.items() if k not in ("ranked_layers", "visual_heads")}
        summary["methods"][m] = {"plan": str(plan_path), "scores": str(score_path), "figure": str(fig_path), "chosen": brief,
                                 **({"notes": r.notes} if r.notes else {})}
    if a.wandb:
        summary["wandb"] = log_wandb(out, figures, chosen, settings, str(a.wandb_project))
    summary["seconds"] = round(time.time() - start, 1)
    return summary


def method_shorthand(argv: list[str]) -> list[str]:
    """`python -m train analyze shortv ...` = `python -m train analyze analyze.method=shortv ...`."""
    return [f"analyze.method={a}" if "=" not in a and not a.startswith("-") else a for a in argv]


def main(argv: list[str] | None = None) -> dict:
    try:
        summary = analyze(compose_cli("analyze", method_shorthand(list(sys.argv[1:] if argv is None else argv))))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
