"""`python -m train bench_packing [bench_packing.arms=[padded,packed]] [bench_packing.*=...]`

Training steps of one model on one sample stream, three ways: `padded` (batches of `batch_size` samples
in stream order), `grouped` (length-grouped batches, data/length_groups.py) and `packed` (rows of
`max_length` tokens, data/packing.py, as many rows as hold `batch_size` samples' tokens on average, so
every arm trains on about the same tokens per step). Each arm starts from the same weights and times
`steps` AdamW steps after `warmup` ones.

The length mix imitates LLaVA-665k scaled down by 16 (no histogram of it was at hand, so the shape is
assumed, the shares are the dataset's): `text_only` conversations (ShareGPT, 6%), image samples at
one image's tokens (576 / 16 = 36) and a `high_res` share at five images' (LLaVA-NeXT's 2880), with
lognormal text lengths (conf/bench_packing.yaml). Padding fraction and attention waste depend only on
these ratios; step times depend on the machine.

Prints a JSON list of rows and writes `{out}/bench_packing-<time>.json`:
  {"arm","steps","rows_per_step","samples_per_step","tokens_per_step","padding_fraction","samples_per_row",
   "attention_useful_fraction","step_ms","tokens_per_s","samples_per_s","loss_first","loss_last"}
`tokens_per_s` counts valid (non-pad) tokens; `attention_useful_fraction` is the share of the attention
scores computed (rows x longest row squared) that lie inside a sample's own causal triangle. On CPU
packed rows attend with a dense block mask, which computes all of a row's scores.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.batch import Batch, Collator
from data.chat import IGNORE
from data.length_groups import LengthGrouping
from data.packing import Packing

from ..builders import build
from .cli import compose_cli

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ARMS = ("padded", "grouped", "packed")


def draw_samples(b, config) -> list[dict]:
    """`b.samples` chat-like samples: 3 prompt tokens, the images' placeholders, a question, then the
    supervised answer (the last 40% of the text, never the token right after an image)."""
    rng = random.Random(b.seed)
    g = torch.Generator().manual_seed(b.seed)
    n_v, vocab = config.num_image_tokens, config.hf_text_config().vocab_size
    size = config.hf_vision_config().image_size
    out = []
    for i in range(b.samples):
        text_only = rng.random() < b.text_only
        images = 0 if text_only else (5 if rng.random() < b.high_res else 1)
        median, sigma = (b.text_only_median, b.text_only_sigma) if text_only else (b.text_median, b.text_sigma)
        n_text = max(6, round(median * math.exp(rng.gauss(0.0, sigma))))
        n_text = min(n_text, b.max_length - images * n_v)
        ids = [rng.randrange(4, vocab) for _ in range(n_text)]
        ids = [i if i != config.image_token_id else 4 for i in ids]
        ids = ids[:3] + [config.image_token_id] * (images * n_v) + ids[3:]
        answer = max(1, int(0.4 * n_text))
        labels = [IGNORE] * (len(ids) - answer) + ids[len(ids) - answer :]
        pixels = [torch.randn(3, size, size, generator=g) for _ in range(images)] or None
        out.append({"key": f"s{i}", "input_ids": ids, "labels": labels, "prompt_len": len(ids) - answer, "answer": "",
                    "skill": "all", "n_skipped": 0, "pixel_values": pixels, "image_sizes": []})
    return out


def arm_batches(arm: str, samples: list[dict], b) -> tuple[list[Batch], int]:
    """The arm's batches over the samples (buffer by buffer, as the data pipeline forms them) and its rows per batch."""
    collate = Collator(pad_id=0)
    if arm == "padded":
        return [collate(samples[i : i + b.batch_size]) for i in range(0, len(samples), b.batch_size)], b.batch_size
    mean = statistics.mean(len(s["input_ids"]) for s in samples)
    rows = max(1, round(b.batch_size * mean / b.max_length))
    buffer = b.batch_size * b.buffer_batches  # the same samples per buffer for both
    grouping = LengthGrouping(b.batch_size, b.buffer_batches) if arm == "grouped" else Packing(rows, b.max_length, buffer)
    batches = []
    for k in range(0, len(samples), grouping.buffer_size):
        buffer = [dict(s) for s in samples[k : k + grouping.buffer_size]]
        batches += [collate(batch) for batch in grouping.batches(buffer, random.Random(b.seed * 1_000_003 + k))]
    return batches, b.batch_size if arm == "grouped" else rows


def attention_useful_fraction(batch: Batch) -> float:
    """Scores inside the samples' own causal triangles / scores a dense kernel computes (rows x longest row^2)."""
    if batch.sample_index is None:
        lengths = batch.attention_mask.sum(1).tolist()
    else:
        lengths = [n for row, mask in zip(batch.sample_index, batch.attention_mask) for n in torch.bincount(row[mask.bool()]).tolist() if n]
    return sum(n * (n + 1) / 2 for n in lengths) / (batch.input_ids.numel() * batch.input_ids.shape[1])


def run_arm(arm: str, model, state: dict, samples: list[dict], b, device, dtype) -> dict:
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=b.lr)
    batches, rows = arm_batches(arm, samples, b)
    needed = b.warmup + b.steps
    if len(batches) < needed:
        raise ValueError(f"bench_packing: the {arm} arm has {len(batches)} batches, fewer than warmup + steps = {needed}; "
                         "raise bench_packing.samples")
    times, losses, tokens, pads, n_samples, useful = [], [], 0, 0, 0, []
    for i, batch in enumerate(batches[:needed]):
        inputs = dict(labels=batch.labels.to(device), pixel_values=None if batch.pixel_values is None else batch.pixel_values.to(device, dtype),
                      sample_index=None if batch.sample_index is None else batch.sample_index.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(batch.input_ids.to(device), batch.attention_mask.to(device), **inputs)
        loss = out.loss_sum / max(out.n_loss_tokens, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= b.warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
            tokens += int(batch.attention_mask.sum())
            pads += batch.n_padding
            n_samples += batch.n_samples
            useful.append(attention_useful_fraction(batch))
    seconds = sum(times)
    return {"arm": arm, "steps": b.steps, "rows_per_step": rows, "samples_per_step": round(n_samples / b.steps, 2),
            "tokens_per_step": round((tokens + pads) / b.steps), "padding_fraction": round(pads / (tokens + pads), 4),
            "samples_per_row": round(n_samples / (rows * b.steps), 2) if arm == "packed" else 1.0,
            "attention_useful_fraction": round(statistics.mean(useful), 4), "step_ms": round(1e3 * statistics.median(times), 1),
            "tokens_per_s": round(tokens / seconds, 1), "samples_per_s": round(n_samples / seconds, 2),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def run_bench_packing(argv: list[str] | None = None) -> tuple[list[dict], Path]:
    cfg = compose_cli("bench_packing", argv)
    b = cfg.bench_packing
    unknown = [a for a in b.arms if a not in ARMS]
    if unknown or not b.arms:
        raise ValueError(f"bench_packing.arms must list some of {list(ARMS)}, got {list(b.arms)}")
    if b.dtype not in DTYPES:
        raise ValueError(f"bench_packing.dtype must be one of {list(DTYPES)}, got {b.dtype!r}")
    if b.threads:
        torch.set_num_threads(int(b.threads))
    device, dtype = torch.device(b.device), DTYPES[b.dtype]
    source = build(cfg.model, "model")
    torch.manual_seed(b.seed)
    model = source.build().to(device=device, dtype=dtype)
    model.set_attention(b.attention)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    samples = draw_samples(b, source.mllm_config)
    rows = [run_arm(arm, model, state, samples, b, device, dtype) for arm in b.arms]
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_packing-{b.device}-{b.dtype}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    lengths = [len(s["input_ids"]) for s in samples]
    path.write_text(json.dumps({"config": OmegaConf.to_container(b, resolve=True), "mean_sample_tokens": statistics.mean(lengths),
                                "max_sample_tokens": max(lengths), "rows": rows}, indent=2))
    print(table(rows), file=sys.stderr)
    print(f"results: {path}", file=sys.stderr)
    return rows, path


def table(rows: list[dict]) -> str:
    lines = ["| arm | rows x length per step | samples / step | padding | samples / row | useful attention | step (ms) | valid tokens/s | samples/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['rows_per_step']} x {r['tokens_per_step'] // r['rows_per_step']} | {r['samples_per_step']} | "
                     f"{r['padding_fraction']:.3f} | {r['samples_per_row']} | {r['attention_useful_fraction']:.3f} | {r['step_ms']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['samples_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    rows, _ = run_bench_packing()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
