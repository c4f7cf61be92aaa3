"""`python -m train bench_dispatch [arch=<a>[,<b>...]] [bench_dispatch.models=[tiny,tiny_qwen2vl,...]] [bench_dispatch.*=...]`

What a GPU would pay for, counted on any device (models/dispatch_count.py): per model family and plan,
the aten ops and the kernels among them (ops that are neither views nor allocations: the launches) and
host syncs by kind of a prefill (`logits="last"`, KV
cache built), one decode step and one training step (forward with labels + backward), beside
transformers' class of the family on the very same weights (`LlavaForConditionalGeneration`,
`Qwen2VLForConditionalGeneration`, ...; none for MobileVLM, which no transformers class runs), and the
graph breaks `torch._dynamo.explain` finds in the decode step. Every count is taken on a warm model (one
untimed run first). Batches: `batch` rows, each `n_text` text tokens around one random image of
`image_size` (height, width) through the family's own preprocessing. Prints a JSON list of rows and
writes it to `bench_dispatch.out/dispatch-<time>.json`:
  {"model","family","arch","runner": "ours"|"hf","n_visual": [per row],
   "prefill": {"ops", "kernels", "syncs", "by_kind"}, "decode": {...}, "train": {...}, "decode_graph_breaks", "break_reasons"}
Counts are exact and machine-independent (the same torch and transformers give the same numbers).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.batch import collate_images
from models.decoding import reserve
from models.dispatch_count import Census, count_dispatch
from models.plan import Plan

from ..builders import build
from .bench import HFRunner, hf_twin, split_arch_list
from .cli import compose_cli


def family_batch(model, batch: int, n_text: int, image_size: tuple[int, int], seed: int) -> dict:
    """`batch` rows of 3 text tokens, one image (the family's wrap tokens around its placeholders), the
    rest of the text; the last tokens (up to 8) are the supervised answer. Returns our inputs (`ids`,
    `mask`, `pixel_values`, `image_sizes`, `labels`) and transformers' image inputs (`hf`)."""
    if n_text < 5:
        raise ValueError(f"bench_dispatch.n_text={n_text} must be >= 5 (3 tokens before the image, a question, an answer)")
    config, family = model.config, model.family
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    process = family.image_processor(config)
    images = [process(Image.fromarray(rng.integers(0, 255, (*image_size, 3), dtype=np.uint8))) for _ in range(batch)]
    pixel_values, image_sizes = collate_images([{"pixel_values": [im.pixels], "image_sizes": [im.size]} for im in images])
    wrap = family.image_wrap_ids(config)
    reserved = {*config.visual_token_ids, *(wrap or ())}
    vocab = model.text_config.vocab_size
    rows = []
    for im in images:
        text = torch.randint(8, vocab, (n_text,), generator=g)
        text[torch.isin(text, torch.tensor(sorted(reserved)))] = 7
        image = torch.full((config.tokens_per_image(im.size),), config.image_token_id)
        if wrap is not None:
            image = torch.cat([torch.tensor(wrap[:1]), image, torch.tensor(wrap[1:])])
        rows.append(torch.cat([text[:3], image, text[3:]]))
    length = max(len(r) for r in rows)  # left padding, as for generation
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    labels = torch.full_like(ids, -100)
    answer = min(8, n_text - 4)
    labels[:, -answer:] = ids[:, -answer:]
    return {"ids": ids, "mask": mask, "pixel_values": pixel_values.to(model.dtype), "image_sizes": image_sizes, "labels": labels,
            "hf": family.hf_image_inputs(config, ids, mask, pixel_values.to(model.dtype), image_sizes),
            "n_visual": [len(r) - n_text for r in rows]}


class Ours:
    """Prefill, one decode step and a training step of our MLLM under its plan, with the batch's sizes read
    on the host beforehand (models/host_sizes.py), as the training module and generation do."""

    def __init__(self, model, b: dict):
        self.model, self.b = model, b
        self.sizes = model.batch_sizes(b["ids"], b["mask"], b["pixel_values"], b["image_sizes"], b["labels"])

    def prefill(self):
        b = self.b
        out = self.model(b["ids"], b["mask"], b["pixel_values"], logits="last", use_cache=True, image_sizes=b["image_sizes"],
                         sizes=self.sizes)
        reserve(self.model, out.cache, 16)  # what generation does: room for the tokens to come
        return out.logits, out.cache

    def step(self, token, state):
        return self.model.decode_step(token, state)

    def loss(self):
        b = self.b
        return self.model(b["ids"], b["mask"], b["pixel_values"], labels=b["labels"], image_sizes=b["image_sizes"], sizes=self.sizes).loss


class Theirs:
    """The same three operations through transformers' class of the family."""

    def __init__(self, hf, b: dict):
        self.model, self.b, self.runner = hf, b, HFRunner(hf)
        self.mask = torch.cat([b["mask"], b["mask"].new_ones(b["mask"].shape[0], 1)], 1)

    def prefill(self):
        b = self.b
        out = self.model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=True, logits_to_keep=1, **b["hf"])
        return out.logits[:, -1], getattr(out, self.runner.cache_arg)

    def step(self, token, cache):
        deltas = getattr(self.model.model, "rope_deltas", None)  # M-RoPE: positions past the prompt, as generate gives them
        if deltas is None:
            return self.runner.step(token, cache, self.mask)[0]
        positions = (self.mask.cumsum(-1) - 1)[None, :, -1:].expand(3, -1, -1) + deltas
        out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self.runner.cache_arg: cache})
        return out.logits[:, -1]

    def loss(self):
        b = self.b
        return self.model(input_ids=b["ids"], attention_mask=b["mask"], labels=b["labels"], **b["hf"]).loss


def counts(census: Census) -> dict:
    return {"ops": census.n_ops, "kernels": census.kernels, "syncs": census.n_syncs, "by_kind": dict(sorted(census.syncs.items()))}


def census_of(runner, graph_breaks: bool) -> dict:
    """Counts of a prefill, a decode step and a training step (each after one uncounted run), and the
    decode step's graph breaks."""
    model = runner.model
    model.eval()
    with torch.no_grad():
        runner.prefill()
        with count_dispatch() as prefill:
            logits, state = runner.prefill()
        token = logits.argmax(-1)
        runner.step(token, copy.deepcopy(state))
        fresh = copy.deepcopy(state)
        with count_dispatch() as decode:
            runner.step(token, fresh)
    model.train()
    runner.loss().backward()
    model.zero_grad(set_to_none=True)
    with count_dispatch() as train:
        runner.loss().backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    row = {"prefill": counts(prefill), "decode": counts(decode), "train": counts(train)}
    if graph_breaks:
        row.update(decode_graph_breaks(runner, token, state))
    return row


def decode_graph_breaks(runner, token, state) -> dict:
    """Graph breaks `torch._dynamo.explain` finds in one decode step (on a copy of the state)."""
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(runner.step)(token, copy.deepcopy(state))
    torch._dynamo.reset()
    reasons = sorted({str(r.reason).splitlines()[0][:160] for r in explained.break_reasons})
    return {"decode_graph_breaks": explained.graph_break_count, "break_reasons": reasons}


def run_bench_dispatch(archs: list[str], overrides: list[str]) -> list[dict]:
    base = compose_cli("bench_dispatch", overrides)
    b = base.bench_dispatch
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dispatch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"config": OmegaConf.to_container(b, resolve=True), "archs": archs, "torch": torch.__version__}
    import transformers

    meta["transformers"] = transformers.__version__
    rows: list[dict] = []
    for name in b.models:
        cfg = compose_cli("bench_dispatch", [*overrides, f"model={name}"])
        spec = dataclasses.replace(build(cfg.model, "model"), dtype="float32")
        torch.manual_seed(b.seed)
        model = spec.build()
        batch = family_batch(model, b.batch, b.n_text, tuple(b.image_size), b.seed)
        common = {"model": spec.name, "family": model.family.name, "n_visual": batch["n_visual"]}
        for arch in archs:
            arch_cfg = compose_cli("bench_dispatch", [*overrides, f"model={name}", f"arch={arch}"])
            plan = spec.plan(OmegaConf.to_container(arch_cfg.arch, resolve=True))
            model.set_plan(plan)
            rows.append({**common, "arch": plan.name, "runner": "ours", **census_of(Ours(model, batch), b.graph_breaks)})
            path.write_text(json.dumps({**meta, "rows": rows}, indent=2))
        if b.hf and not model.family.original_layout:
            model.set_plan(Plan.dense(model.text_config.num_hidden_layers))
            hf = hf_twin(model, spec)
            rows.append({**common, "arch": "dense", "runner": "hf", **census_of(Theirs(hf, batch), b.graph_breaks)})
            path.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"results: {path}", file=sys.stderr)
    return rows


def main() -> None:
    archs, rest = split_arch_list(sys.argv[1:])
    print(json.dumps(run_bench_dispatch(archs, rest)))


if __name__ == "__main__":
    main()
