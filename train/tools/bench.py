"""`python -m train bench model=<m> arch=<a>[,<b>...] [bench.batch=..] [bench.image_size=[H,W]] [bench.device=cuda bench.dtype=bf16]`

Times each plan against `dense` on the same randomly initialised model in one process: prefill
(vision tower + LLM, KV cache built), one training step (forward + backward on the answer tokens)
and greedy decoding per token, each the median of `bench.repeats` runs after `bench.warmup`.
Every sample holds one random image of `bench.image_size`, preprocessed by the model's family (LLaVA-1.5's
square, NeXT's and InternVL's tiles, Qwen's patches), so its visual tokens are the family's count for that
size; `bench.n_visual` instead sets LLaVA-1.5's square grid directly.
`bench.hf=true` adds a row for transformers' class of the family (`hf_<family>_sdpa`: e.g.
`LlavaForConditionalGeneration`, SDPA attention) on the same weights (shared tensors) and the dense row's
time relative to it.
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

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from data.batch import collate_images
from models.config import ConfigError
from models.flops import ImageTokens, Shape, prefill_flops
from models.plan import Plan

from ..builders import build
from ..model_source import ModelSource
from .cli import compose_cli

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


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


@dataclasses.dataclass
class BenchBatch:
    """`batch` prompts of one image each: ids, mask and labels, the image inputs of our model (`ours`:
    pixel_values, image_sizes) and of transformers' class of the family (`hf`), and the image's size
    as the family reports it (what its tokens and places follow from)."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    ours: dict
    hf: dict
    size: tuple[int, ...]
    n_visual: int


def make_batch(model, batch: int, n_text: int, seed: int, device: torch.device | str = "cpu",
               image_size: tuple[int, int] = (672, 672)) -> BenchBatch:
    """Prompt = 3 text tokens, the image (its placeholders, between the family's wrapping tokens when its
    config fixes their ids: Qwen), then the rest of the text (like a system prompt + question); the last
    tokens (up to 8, never the one right after the image) are the supervised answer. The image: random
    pixels of `image_size` (height, width), through the family's preprocessing."""
    if n_text < 5:
        raise ValueError(f"bench.n_text={n_text} must be >= 5 (3 tokens before the image, a question, an answer)")
    config = model.config
    family = config.model_family
    height, width = image_size
    rng = np.random.default_rng(seed)
    processed = family.image_processor(config)(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    pixels, sizes = collate_images([{"pixel_values": [processed.pixels], "image_sizes": [processed.size]}] * batch)
    n_v = config.tokens_per_image(processed.size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.text_config.vocab_size, (batch, n_text + n_v), generator=g)
    special = {config.image_token_id, *(family.image_wrap_ids(config) or ()), *config.token_ids.values()}
    ids[torch.isin(ids, torch.tensor(sorted(special)))] = 4  # text never holds an image token (LLaVA's id 32000 is in range)
    ids[:, 3 : 3 + n_v] = config.image_token_id
    if family.image_wrap_ids(config):
        ids[:, 2], ids[:, 3 + n_v] = family.image_wrap_ids(config)
    labels = torch.full_like(ids, -100)
    answer = min(8, n_text - 4)
    labels[:, -answer:] = ids[:, -answer:]
    ids, mask, labels = (t.to(device) for t in (ids, torch.ones_like(ids), labels))
    pixels, sizes = pixels.to(device, model.dtype), sizes.to(device)
    hf = family.hf_image_inputs(config, ids, mask, pixels, sizes)
    return BenchBatch(ids, mask, labels, {"pixel_values": pixels, "image_sizes": sizes}, hf, processed.size, n_v)


class OursRunner:
    """Prefill / training step / one decoding step of our MLLM under its current plan."""

    def __init__(self, model):
        self.model = model

    def prefill(self, b: BenchBatch):
        out = self.model(b.ids, b.mask, logits="last", use_cache=True, **b.ours)
        return out.logits, out.cache

    def loss(self, b: BenchBatch):
        return self.model(b.ids, b.mask, labels=b.labels, **b.ours).loss

    def step(self, token, state, mask):
        return self.model.decode_step(token, state), state


class HFRunner:
    """The same three operations through transformers' class of the family (`LlavaForConditionalGeneration`, ...)."""

    def __init__(self, hf):
        self.model = hf
        # the KV cache argument is `cache` in recent transformers 5.x, `past_key_values` before
        self.cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def prefill(self, b: BenchBatch):
        out = self.model(input_ids=b.ids, attention_mask=b.mask, use_cache=True, logits_to_keep=1, **b.hf)
        return out.logits[:, -1], getattr(out, self.cache_arg)

    def loss(self, b: BenchBatch):
        return self.model(input_ids=b.ids, attention_mask=b.mask, labels=b.labels, **b.hf).loss

    def step(self, token, cache, mask):
        """One decode step with the grown attention mask, as `generate` gives it. Not on M-RoPE models (Qwen),
        whose forward would misalign positions it derives from a full-length mask and the prefill's rope
        deltas: the bench's rows have no padding, so there the cache's length gives every position."""
        mrope = getattr(getattr(self.model, "model", None), "rope_deltas", None) is not None
        masked = {} if mrope else {"attention_mask": mask}
        out = self.model(input_ids=token[:, None], use_cache=True, **masked, **{self.cache_arg: cache})
        return out.logits[:, -1], getattr(out, self.cache_arg)


def time_runner(runner, params, batch: BenchBatch, b, clock: Clock) -> dict:
    """Prefill, training step and decode timings (+ peak memory) of one runner on one batch."""
    model = runner.model

    @torch.no_grad()
    def prefill():
        return runner.prefill(batch)

    def train_step():
        for p in params:
            p.grad = None
        runner.loss(batch).backward()

    @torch.no_grad()
    def decode() -> float:
        logits, state = prefill()
        token, m = logits.argmax(-1), batch.mask

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


def warm_up(runner, params, batch: BenchBatch) -> None:
    """One prefill and one training step: allocator pools, thread pools and kernel caches get set up
    here rather than inside whichever row is measured first."""
    runner.model.eval()
    with torch.no_grad():
        runner.prefill(batch)
    runner.model.train()
    runner.loss(batch).backward()
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
        family = base.model.config.get("family", "llava")
        if family != "llava":
            raise ConfigError(f"bench.n_visual sets LLaVA-1.5's square patch grid; the {family} family's visual tokens "
                              "follow from the image: set bench.image_size=[H,W] instead")
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
    batch = make_batch(model, b.batch, b.n_text, b.seed, device, tuple(b.image_size))
    clock = Clock(device)
    warm_up(OursRunner(model), params, batch)  # the first measurement should not pay for a cold process
    shape = Shape.from_hf(model.text_config)
    n_v = batch.n_visual
    image = ImageTokens.from_places(model.family.image_places(model.config, batch.size))  # the family's layout (tiles, newlines)
    dense_flops = prefill_flops(shape, Plan.dense(shape.layers), image, b.n_text)
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
                     "flops_ratio": round(prefill_flops(shape, plan, image, b.n_text) / dense_flops, 4)})
        save()
    if b.hf:
        model.set_plan(Plan.dense(shape.layers))
        timing = time_runner(HFRunner(hf_twin(model, spec)), params, batch, b, clock)
        rows.append({"arch": f"hf_{model.family.name}_sdpa", "batch": b.batch, "n_visual": n_v, "n_text": b.n_text, **timing, "flops_ratio": 1.0})
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
