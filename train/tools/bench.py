"""`python -m train bench model=<m> arch=<a>[,<b>...] [bench.batch=..] [bench.n_visual=..] [bench.device=cuda bench.dtype=bf16]`

Times each plan against `dense` on the same randomly initialised model in one process: prefill
(vision tower + LLM, KV cache built), one training step (forward + backward on the answer tokens)
and greedy decoding per token, each the median of `bench.repeats` runs after `bench.warmup`.
`bench.hf=true` adds a row for transformers' `LlavaForConditionalGeneration` (SDPA attention) on
the same weights (shared tensors) and the dense row's time relative to it.
Prints a JSON list of rows and writes it to `bench.out/bench-<model>-<time>.json`:
  {"arch","batch","n_visual","n_text","prefill_ms","train_step_ms","decode_ms_per_token",
   "prefill_peak_mb","train_peak_mb","flops_ratio","time_ratio","train_time_ratio"}
   (ratios against dense: prefill FLOPs, prefill time, training-step time)
On CUDA, times come from CUDA events around synchronised runs and the peaks are
`torch.cuda.max_memory_allocated` (weights included; the training step's also holds the gradients);
on CPU the peaks are null. `bench.dtype=bf16` puts weights and activations in bf16 (the training step
is then a pure-bf16 step: no fp32 master weights). Model presets with no weights (`llava15_7b`) are
built with random weights directly on the device.
Timings are benchmarks, not tests: they depend on the machine; docs/results.md lists ours.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf, open_dict

from models.flops import Shape, prefill_flops
from models.plan import Plan

from ..builders import build
from ..model_source import ModelSource
from .cli import compose_cli

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
HF_ROW = "hf_llava_sdpa"


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


class Clock:
    """Milliseconds of `fn()`: CUDA events around the run (then a synchronisation) on GPUs, wall time on CPUs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def ms(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def median_ms(self, fn, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        return statistics.median(self.ms(fn) for _ in range(repeats))

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.cuda else None


def make_batch(model, batch: int, n_text: int, seed: int, device: torch.device | str = "cpu"):
    """Prompt = 3 text tokens, the image, then the rest of the text (like a system prompt + question);
    the last tokens (up to 8, never the one right after the image) are the supervised answer."""
    if n_text < 5:
        raise ValueError(f"bench.n_text={n_text} must be >= 5 (3 tokens before the image, a question, an answer)")
    g = torch.Generator().manual_seed(seed)
    n_v, vocab = model.config.num_image_tokens, model.text_config.vocab_size
    ids = torch.randint(4, vocab, (batch, n_text + n_v), generator=g)
    ids[ids == model.config.image_token_id] = 4  # text never holds an image token (LLaVA's id 32000 is in range)
    ids[:, 3 : 3 + n_v] = model.config.image_token_id
    size = model.config.hf_vision_config().image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.full_like(ids, -100)
    answer = min(8, n_text - 4)
    labels[:, -answer:] = ids[:, -answer:]
    return tuple(t.to(device) for t in (ids, torch.ones_like(ids), pixels.to(model.dtype), labels))


class OursRunner:
    """Prefill / training step / one decoding step of our MLLM under its current plan."""

    def __init__(self, model):
        self.model = model

    def prefill(self, ids, mask, pixels):
        out = self.model(ids, mask, pixels, logits="last", use_cache=True)
        return out.logits, out.cache

    def loss(self, ids, mask, pixels, labels):
        return self.model(ids, mask, pixels, labels=labels).loss

    def step(self, token, state, mask):
        return self.model.decode_step(token, state), state


class HFRunner:
    """The same three operations through transformers' `LlavaForConditionalGeneration`."""

    def __init__(self, hf):
        self.model = hf
        # the KV cache argument is `cache` in recent transformers 5.x, `past_key_values` before
        self.cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def prefill(self, ids, mask, pixels):
        out = self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], getattr(out, self.cache_arg)

    def loss(self, ids, mask, pixels, labels):
        return self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss

    def step(self, token, cache, mask):
        out = self.model(input_ids=token[:, None], attention_mask=mask, use_cache=True, **{self.cache_arg: cache})
        return out.logits[:, -1], getattr(out, self.cache_arg)


def time_runner(runner, params, batch, b, clock: Clock) -> dict:
    """Prefill, training step and decode timings (+ peak memory) of one runner on one batch."""
    ids, mask, pixels, labels = batch
    model = runner.model

    @torch.no_grad()
    def prefill():
        return runner.prefill(ids, mask, pixels)

    def train_step():
        for p in params:
            p.grad = None
        runner.loss(ids, mask, pixels, labels).backward()

    @torch.no_grad()
    def decode() -> float:
        logits, state = prefill()
        token, m = logits.argmax(-1), mask

        def steps():
            nonlocal token, state, m
            for _ in range(b.new_tokens):
                m = torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
                logits, state = runner.step(token, state, m)
                token = logits.argmax(-1)

        return clock.ms(steps) / b.new_tokens

    model.eval()
    clock.reset_peak()
    prefill_ms = clock.median_ms(prefill, b.warmup, b.repeats)
    prefill_peak = clock.peak_mb()
    model.train()
    clock.reset_peak()
    train_ms = clock.median_ms(train_step, b.warmup, b.repeats)
    train_peak = clock.peak_mb()
    for p in params:  # free the gradients before the next measurement
        p.grad = None
    model.eval()
    decode_ms = statistics.median(decode() for _ in range(max(1, b.repeats // 2)))
    return {"prefill_ms": round(prefill_ms, 2), "train_step_ms": round(train_ms, 2), "decode_ms_per_token": round(decode_ms, 3),
            "prefill_peak_mb": prefill_peak, "train_peak_mb": train_peak}


def warm_up(runner, params, batch) -> None:
    """One prefill and one training step: allocator pools, thread pools and kernel caches get set up
    here rather than inside whichever row is measured first."""
    ids, mask, pixels, labels = batch
    runner.model.eval()
    with torch.no_grad():
        runner.prefill(ids, mask, pixels)
    runner.model.train()
    runner.loss(ids, mask, pixels, labels).backward()
    for p in params:
        p.grad = None


def hf_twin(model, spec: ModelSource):
    """transformers' class of the model's family (`LlavaForConditionalGeneration`, SDPA) holding
    the very same weight tensors as `model`."""
    import transformers
    from transformers.initialization import no_init_weights

    family = model.family
    device = model.lm_head.weight.device
    with torch.device(device), no_init_weights():
        hf_class = getattr(transformers, family.hf_architecture)
        hf = hf_class._from_config(model.config.hf_config(), attn_implementation="sdpa", dtype=model.dtype)
    ours = model.state_dict(keep_vars=True)
    hf.load_state_dict({k: ours[family.to_internal_name(k)] for k in hf.state_dict()}, assign=True, strict=True)
    if spec.gradient_checkpointing:  # like ours: the decoder layers only, not the vision tower
        lm = hf.model.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # the name in recent transformers 5.x
            lm.activation_checkpointing_enable()
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return hf


def run_bench(archs: list[str], overrides: list[str]) -> list[dict]:
    base = compose_cli("bench", overrides + ["arch=dense"])
    b = base.bench
    if b.dtype not in DTYPES:
        raise ValueError(f"bench.dtype must be one of {list(DTYPES)}, got {b.dtype!r}")
    device = torch.device(b.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench.device=cuda but torch sees no CUDA device (a CPU build of torch, or no GPU): use bench.device=cpu")
    if b.threads:
        torch.set_num_threads(int(b.threads))
    if b.n_visual is not None:
        side = math.isqrt(int(b.n_visual))
        if side * side != b.n_visual:
            raise ValueError(f"bench.n_visual={b.n_visual} must be a square number (a patch grid)")
        with open_dict(base):
            base.model.config.vision.image_size = side * base.model.config.vision.patch_size
    spec = dataclasses.replace(build(base.model, "model"), dtype=DTYPES[b.dtype])
    torch.manual_seed(b.seed)
    with torch.device(device):
        model = spec.build()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    batch = make_batch(model, b.batch, b.n_text, b.seed, device)
    clock = Clock(device)
    warm_up(OursRunner(model), params, batch)  # the first measurement should not pay for a cold process
    shape = Shape.from_hf(model.text_config)
    n_v = model.config.num_image_tokens
    dense_flops = prefill_flops(shape, Plan.dense(shape.layers), n_v, b.n_text)
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{spec.name}-{b.device}-{b.dtype}-nv{n_v}-b{b.batch}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"config": OmegaConf.to_container(base.bench, resolve=True), "model": spec.name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    rows: list[dict] = []

    def save() -> None:  # after every row: a run stopped by a time limit keeps what it measured
        for r in rows:
            r["time_ratio"] = round(r["prefill_ms"] / rows[0]["prefill_ms"], 4)
            r["train_time_ratio"] = round(r["train_step_ms"] / rows[0]["train_step_ms"], 4)
        path.write_text(json.dumps({**meta, "rows": rows}, indent=2))

    for arch in ["dense"] + [a for a in archs if a != "dense"]:
        cfg = compose_cli("bench", overrides + [f"arch={arch}"])
        plan = spec.plan(OmegaConf.to_container(cfg.arch, resolve=True))
        model.set_plan(plan)
        timing = time_runner(OursRunner(model), params, batch, b, clock)
        rows.append({"arch": plan.name, "batch": b.batch, "n_visual": n_v, "n_text": b.n_text, **timing,
                     "flops_ratio": round(prefill_flops(shape, plan, n_v, b.n_text) / dense_flops, 4)})
        save()
    if b.hf:
        model.set_plan(Plan.dense(shape.layers))
        timing = time_runner(HFRunner(hf_twin(model, spec)), params, batch, b, clock)
        rows.append({"arch": HF_ROW, "batch": b.batch, "n_visual": n_v, "n_text": b.n_text, **timing, "flops_ratio": 1.0})
        for name, key in (("prefill", "prefill_ms"), ("train_step", "train_step_ms"), ("decode", "decode_ms_per_token")):
            rows[0][f"{name}_vs_hf"] = round(rows[0][key] / rows[-1][key], 4)  # our dense time / HF's: below 1 is faster
        save()
    print(f"results: {path}", file=sys.stderr)
    return rows


def main() -> None:
    archs, rest = split_arch_list(sys.argv[1:])
    print(json.dumps(run_bench(archs, rest)))


if __name__ == "__main__":
    main()
