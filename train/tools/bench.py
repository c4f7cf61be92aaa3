"""`python -m train bench model=<m> arch=<a>[,<b>...] [bench.batch=..] [bench.n_visual=..]`

Times each plan against `dense` on the same randomly initialised model in one process: prefill
(vision tower + LLM, KV cache built), one training step (forward + backward on the answer tokens)
and greedy decoding per token, each the median of `bench.repeats` runs after `bench.warmup`.
Prints a JSON list of rows and writes it to `bench.out/bench-<model>-<time>.json`:
  {"arch","batch","n_visual","n_text","prefill_ms","train_step_ms","decode_ms_per_token",
   "flops_ratio","time_ratio"}   (ratios are prefill, against dense)
Timings are benchmarks, not tests: they depend on the machine; the README lists ours.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from models.flops import Shape, prefill_flops
from models.plan import Plan

from ..builders import build
from .cli import compose_cli


def split_arch_list(argv: list[str]) -> tuple[list[str], list[str]]:
    """`arch=a,b` lists plans to compare (`arch=[a,b]` is one combined plan); other args pass through."""
    archs, rest = [], []
    for a in argv:
        if a.startswith("arch=") and "," in a and not a.startswith("arch=["):
            archs += a[len("arch=") :].split(",")
        elif a.startswith("arch="):
            archs.append(a[len("arch=") :])
        else:
            rest.append(a)
    return archs or ["dense"], rest


def _median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def make_batch(model, batch: int, n_text: int, seed: int):
    """Prompt = 3 text tokens, the image, then the rest of the text (like a system prompt + question);
    the last tokens (up to 8, never the one right after the image) are the supervised answer."""
    if n_text < 5:
        raise ValueError(f"bench.n_text={n_text} must be >= 5 (3 tokens before the image, a question, an answer)")
    g = torch.Generator().manual_seed(seed)
    n_v, vocab = model.config.num_image_tokens, model.text_config.vocab_size
    ids = torch.randint(4, vocab, (batch, n_text + n_v), generator=g)
    ids[:, 3 : 3 + n_v] = model.config.image_token_id
    size = model.config.hf_vision_config().image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.full_like(ids, -100)
    answer = min(8, n_text - 4)
    labels[:, -answer:] = ids[:, -answer:]
    return ids, torch.ones_like(ids), pixels, labels


def time_plan(model, batch, cfg) -> dict:
    ids, mask, pixels, labels = batch
    b = cfg.bench

    @torch.no_grad()
    def prefill():
        return model(ids, mask, pixels, logits="last", use_cache=True)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(ids, mask, pixels, labels=labels).loss.backward()

    @torch.no_grad()
    def decode():
        out = prefill()
        state, token = out.cache, out.logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(b.new_tokens):
            token = model.decode_step(token, state).argmax(-1)
        return (time.perf_counter() - t) / b.new_tokens

    model.eval()
    prefill_ms = _median_ms(prefill, b.warmup, b.repeats)
    model.train()
    train_ms = _median_ms(train_step, b.warmup, b.repeats)
    model.eval()
    decode_ms = 1e3 * statistics.median(decode() for _ in range(max(1, b.repeats // 2)))
    return {"prefill_ms": round(prefill_ms, 2), "train_step_ms": round(train_ms, 2), "decode_ms_per_token": round(decode_ms, 3)}


def run_bench(archs: list[str], overrides: list[str]) -> list[dict]:
    base = compose_cli("bench", overrides + ["arch=dense"])
    b = base.bench
    if b.threads:
        torch.set_num_threads(int(b.threads))
    if b.n_visual is not None:
        side = math.isqrt(int(b.n_visual))
        if side * side != b.n_visual:
            raise ValueError(f"bench.n_visual={b.n_visual} must be a square number (a patch grid)")
        with open_dict(base):
            base.model.config.vision.image_size = side * base.model.config.vision.patch_size
    source = build(base.model, "model")
    torch.manual_seed(b.seed)
    model = source.build()
    for p in model.parameters():
        p.requires_grad_(True)
    batch = make_batch(model, b.batch, b.n_text, b.seed)
    shape = Shape.from_hf(model.text_config)
    n_v = model.config.num_image_tokens
    dense_flops = prefill_flops(shape, Plan.dense(shape.layers), n_v, b.n_text)
    rows = []
    for arch in ["dense"] + [a for a in archs if a != "dense"]:
        cfg = compose_cli("bench", overrides + [f"arch={arch}"])
        plan = source.plan(OmegaConf.to_container(cfg.arch, resolve=True))
        model.set_plan(plan)
        timing = time_plan(model, batch, base)
        rows.append({"arch": plan.name, "batch": b.batch, "n_visual": n_v, "n_text": b.n_text, **timing,
                     "flops_ratio": round(prefill_flops(shape, plan, n_v, b.n_text) / dense_flops, 4)})
    for r in rows:
        r["time_ratio"] = round(r["prefill_ms"] / rows[0]["prefill_ms"], 4)
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{source.name}-nv{n_v}-b{b.batch}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"config": OmegaConf.to_container(base.bench, resolve=True), "model": source.name,
                                "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"results: {path}", file=sys.stderr)
    return rows


def main() -> None:
    archs, rest = split_arch_list(sys.argv[1:])
    print(json.dumps(run_bench(archs, rest)))


if __name__ == "__main__":
    main()
