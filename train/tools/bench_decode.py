"""`python -m train bench_decode [arch=<a>[,<b>...]] [bench_decode.batches=[1,16]] [bench_decode.*=...]`

Decode throughput of greedy generation: per plan and batch size, the time of one decode step and the
tokens per second it gives, eager and compiled (`torch.compile(fullgraph=True)` of the fixed-shape step,
a CUDA graph on CUDA; models/decoding.py `compiled_step`), beside transformers' `generate` (greedy, its
own cache) on the same weights. Steps are timed from the first generated token to the last, with what
a greedy loop does between them (argmax, the end-of-sequence check that reads back whether every row is
done): ours in the loop of `models.generation.greedy_generate`, transformers' by a stopping criterion
that notes the time after each token. Each number is the median of `repeats` generations of
`new_tokens` after one warm-up generation (which compiles). Prints a JSON list of rows and writes it to
`bench_decode.out/decode-<model>-<time>.json`:
  {"arch", "runner": "ours" | "ours_compiled" | "hf_generate", "batch", "new_tokens", "decode_ms_per_step", "tokens_per_s"}
Timings are benchmarks, not tests: they depend on the machine; docs/gpu-readiness.md lists ours.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models.decoding import compiled_step, reserve
from models.generation import COMPILE_BUCKET
from models.plan import Plan

from ..builders import build
from .bench import hf_twin, make_batch, split_arch_list
from .cli import compose_cli


def wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def ours_ms(model, ids, mask, pixels, new_tokens: int, compile: dict | None) -> float:
    """Milliseconds per decode step of one greedy generation (prefill, then `new_tokens` - 1 timed steps);
    `compile`: `torch.compile` options of the compiled step (None: eager)."""
    out = model(ids, mask, pixels, logits="last", use_cache=True)
    state, logits = out.cache, out.logits
    reserve(model, state, new_tokens, bucket=1 if compile is None else COMPILE_BUCKET)
    step = model.decode_step if compile is None else compiled_step(model, **compile)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    wait(ids.device)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = logits.argmax(-1)
        done |= token == -1  # (never: every row generates every token, like a generation that has not ended)
        bool(done.all())
        logits = step(token, state)
    logits.argmax(-1)
    wait(ids.device)
    return 1e3 * (time.perf_counter() - start) / (new_tokens - 1)


@torch.no_grad()
def hf_ms(hf, ids, mask, pixels, new_tokens: int) -> float:
    """The same of transformers' `generate`: a stopping criterion notes the time after every token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Times(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            wait(input_ids.device)
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    times = Times()
    hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([times]))
    return 1e3 * (times.times[-1] - times.times[0]) / (len(times.times) - 1)


def median_ms(measure, repeats: int) -> float:
    measure()  # warm-up: allocator, thread pools, the compilation of a compiled step
    return statistics.median(measure() for _ in range(repeats))


def run_bench_decode(archs: list[str], overrides: list[str]) -> list[dict]:
    base = compose_cli("bench_decode", overrides + ["arch=dense"])
    b = base.bench_decode
    if b.new_tokens < 2:
        raise ValueError(f"bench_decode.new_tokens={b.new_tokens} must be >= 2 (decode time is n tokens minus one)")
    device = torch.device(b.device)
    if b.threads:
        torch.set_num_threads(int(b.threads))
    spec = dataclasses.replace(build(base.model, "model"), dtype="float32")
    torch.manual_seed(b.seed)
    with torch.device(device):
        model = spec.build().eval()
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode-{spec.name}-{b.device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"config": OmegaConf.to_container(b, resolve=True), "model": spec.name, "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    rows: list[dict] = []

    def add(arch: str, runner: str, batch: int, ms: float) -> None:
        rows.append({"arch": arch, "runner": runner, "batch": batch, "new_tokens": b.new_tokens, "decode_ms_per_step": round(ms, 3),
                     "tokens_per_s": round(batch * 1e3 / ms, 1) if ms > 0 else None})
        path.write_text(json.dumps({**meta, "rows": rows}, indent=2))

    for batch in b.batches:
        inputs = make_batch(model, batch, b.n_text, b.seed, device)
        ids, mask, pixels = inputs.ids, inputs.mask, inputs.ours["pixel_values"]
        for arch in ["dense"] + [a for a in archs if a != "dense"]:
            cfg = compose_cli("bench_decode", overrides + [f"arch={arch}"])
            plan = spec.plan(OmegaConf.to_container(cfg.arch, resolve=True))
            model.set_plan(plan)
            for runner, compile in (("ours", None), ("ours_compiled", {"backend": b.backend})):
                torch._dynamo.reset()  # a fresh compilation per plan and batch
                add(plan.name, runner, batch, median_ms(lambda: ours_ms(model, ids, mask, pixels, b.new_tokens, compile), b.repeats))
        if b.hf:
            model.set_plan(Plan.dense(model.text_config.num_hidden_layers))
            hf = hf_twin(model, spec).eval()
            add("dense", "hf_generate", batch, median_ms(lambda: hf_ms(hf, ids, mask, pixels, b.new_tokens), b.repeats))
    print(f"results: {path}", file=sys.stderr)
    return rows


def main() -> None:
    archs, rest = split_arch_list(sys.argv[1:])
    print(json.dumps(run_bench_decode(archs, rest)))


if __name__ == "__main__":
    main()
