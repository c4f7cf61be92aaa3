"""Efficiency and throughput metrics logged beside accuracy (names listed in docs/results.md, "What a run records").

`EfficiencyMetrics` measures, at every evaluation, on the first validation batch: prefill latency,
decode speed and KV-cache size of the model's plan, plus the analytic FLOPs of that plan (per
sample, decoder layers; convention and scope as configured) and peak memory. `Throughput` logs
training tokens/s and, on GPUs with a known peak, MFU.
"""

from __future__ import annotations

import resource
import time

import lightning as L
import torch

from models.flops import ImageTokens, Shape, by_layer_kind, convert, plan_terms, prefill_flops
from models.vision_flops import vision_flops_of_batch
from models.plan import Plan
from models.streams import visual_mask

# dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class EfficiencyMetrics(L.Callback):
    def __init__(self, convention: str = "2mac", scope: str = "total", decode_tokens: int = 8):
        self.convention, self.scope, self.decode_tokens = convention, scope, decode_tokens

    def counting(self) -> dict:
        """How eff/*flops* were counted (recorded beside them in metrics.json)."""
        return {"convention": self.convention, "scope": self.scope, "per": "sample, prefill, decoder layers"}

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0:
            return
        model = module.model
        ids, mask, pixels = batch.prompt_ids, batch.prompt_mask, batch.pixel_values
        shape = Shape.from_hf(model.text_config)
        kw = dict(convention=self.convention, ffn="swiglu")
        plan_flops = dense_flops = visual = 0.0
        rows = sample_visual_tokens(model, batch)
        for n_v, n_text in rows:  # per sample, averaged over the batch's rows (images of different sizes count as they are)
            plan_flops += prefill_flops(shape, model.plan, n_v, n_text, scope=self.scope, **kw) / len(rows)
            dense_flops += prefill_flops(shape, Plan.dense(shape.layers), n_v, n_text, scope=self.scope, **kw) / len(rows)
            visual += prefill_flops(shape, model.plan, n_v, n_text, scope="visual_side", **kw) / len(rows)
        vision = vision_flops_of_batch(model.config, pixels, batch.image_sizes, model.plan)  # the batch's images, per sample below

        sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
        sync()
        t = time.perf_counter()
        out = model(ids, mask, pixels, logits="last", use_cache=True, image_sizes=batch.image_sizes, step_seconds=batch.step_seconds)
        sync()
        prefill_ms = 1e3 * (time.perf_counter() - t)
        state, token = out.cache, out.logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(self.decode_tokens):
            token = model.decode_step(token, state).argmax(-1)
        sync()
        decode_ms = 1e3 * (time.perf_counter() - t) / self.decode_tokens
        b = ids.shape[0]
        # analytic counts (equal on every rank) and peaks: the ranks' maximum; measured times and cache
        # sizes: their mean (with several ranks each measures its own first batch)
        module.log_dict(
            {
                "eff/prefill_tflops": plan_flops / 1e12,
                "eff/visual_tflops": visual / 1e12,
                "eff/flops_ratio": plan_flops / dense_flops if dense_flops else 1.0,
                "eff/tower_tflops": convert(vision["tower"], self.convention) / len(rows) / 1e12,
                "eff/projector_tflops": convert(vision["projector"], self.convention) / len(rows) / 1e12,
                **({"eff/deepstack_tflops": convert(vision["deepstack"], self.convention) / len(rows) / 1e12}
                   if "deepstack" in vision else {}),
                **(layer_kind_ratios(shape, model.plan, rows) if shape.linear is not None else {}),
                "eff/peak_mem_mb": peak_memory_mb(ids.device),
            },
            sync_dist=True,
            reduce_fx="max",
            batch_size=b,
        )
        module.log_dict(
            {
                "eff/prefill_ms": prefill_ms / b,  # per sample, batched prefill
                "eff/decode_ms_per_token": decode_ms,  # one step for the whole batch
                "eff/kv_cache_mb": state.nbytes / b / 2**20,  # per sample, after the decoded tokens
                # MoE: the busiest expert's share of the routed assignments over the balanced share (1 = balanced)
                **({"eff/expert_load_max": float(out.expert_load.max() * len(out.expert_load))} if out.expert_load is not None else {}),
            },
            sync_dist=True,
            batch_size=b,
        )


def layer_kind_ratios(shape: Shape, plan: Plan, rows: list) -> dict[str, float]:
    """A hybrid LLM's FLOPs ratio (plan over dense, total scope) in its linear-attention layers and in the rest:
    `eff/flops_ratio/linear_attention`, `eff/flops_ratio/full_attention` (models/flops.py `by_layer_kind`)."""
    planned, dense = {}, {}
    for n_v, n_text in rows:
        for totals, p in ((planned, plan), (dense, Plan.dense(shape.layers))):
            for kind, flops in by_layer_kind(plan_terms(shape, p, n_v, n_text)[0]).items():
                totals[kind] = totals.get(kind, 0) + flops
    return {f"eff/flops_ratio/{kind}": planned[kind] / dense[kind] for kind in dense if dense[kind]}


def n_visual(visual) -> int:
    return visual if isinstance(visual, int) else visual.n


def sample_visual_tokens(model, batch, prompts: bool = True) -> list[tuple]:
    """Per row (per sample of packed rows): its visual tokens for the FLOPs model (the family's layout of
    its image when it holds one image, else the count of its image tokens) and its text tokens (of the prompt)."""
    ids, mask = (batch.prompt_ids, batch.prompt_mask) if prompts else (batch.input_ids, batch.attention_mask)
    if not prompts and batch.sample_index is not None:  # one (ids, mask) row per packed sample, in order
        n = int(batch.sample_index.max()) + 1
        own = mask.bool()[:, None] & (batch.sample_index[:, None] == torch.arange(n, device=mask.device)[None, :, None])
        own = own.flatten(0, 1)
        keep = own.any(1)
        ids, mask = ids.repeat_interleave(n, 0)[keep], own[keep].long()
    config = model.config
    is_image = visual_mask(ids, mask, config.visual_token_ids)
    per_row = is_image.sum(1).tolist()
    sizes = batch.image_sizes.tolist() if batch.image_sizes is not None else None
    out, image = [], 0
    for r, count in enumerate(per_row):
        n_images = 0
        if count and config.model_family.variable_tokens and sizes is not None:
            total = 0
            while total < count and image + n_images < len(sizes):
                total += config.tokens_per_image(tuple(sizes[image + n_images]))
                n_images += 1
        visual = count
        if n_images == 1:
            visual = ImageTokens.from_places(config.model_family.image_places(config, tuple(sizes[image])))
        image += n_images
        out.append((visual, int(mask[r].sum()) - count))
    return out


class Throughput(L.Callback):
    """Training tokens per second (all ranks together), MFU on GPUs with a known peak, and at every
    evaluation during fit `perf/train_seconds`: the wall-clock spent training so far (data loading
    included, evaluations excluded, earlier attempts of a resumed run included), the x axis of
    time-to-accuracy curves (`python -m train time_to_accuracy`)."""

    def __init__(self):
        self._t = None
        self._peak = None
        self.train_seconds = 0.0  # before the current stretch of training
        self._stretch_start: float | None = None

    def state_dict(self) -> dict:
        return {"train_seconds": self._elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))

    def _elapsed(self) -> float:
        return self.train_seconds + (time.perf_counter() - self._stretch_start if self._stretch_start is not None else 0.0)

    def on_train_start(self, trainer, module):
        self._stretch_start = time.perf_counter()

    def on_validation_start(self, trainer, module):
        if trainer.state.fn == "fit" and self._stretch_start is not None:
            self.train_seconds = self._elapsed()
            self._stretch_start = None

    def on_validation_epoch_end(self, trainer, module):
        if trainer.state.fn == "fit":
            module.log("perf/train_seconds", self.train_seconds, sync_dist=True, reduce_fx="max")

    def on_validation_end(self, trainer, module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stretch_start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self.train_seconds, self._stretch_start = self._elapsed(), None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch.input_ids.is_cuda:
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch.input_ids.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._t
        tokens = int(batch.attention_mask.sum()) * trainer.world_size
        metrics = {"perf/tokens_per_s": tokens / seconds}
        if batch.input_ids.is_cuda:
            peak = self._device_peak()
            if peak:
                model = module.model
                shape = Shape.from_hf(model.text_config)
                length = batch.input_ids.shape[1]  # padded rows compute their padding; a packed sample its own tokens
                step_flops = 3 * sum(prefill_flops(shape, model.plan, n_v, n_t if batch.sample_index is not None else length - n_visual(n_v))
                                     for n_v, n_t in sample_visual_tokens(model, batch, prompts=False))  # forward + backward
                metrics["perf/mfu"] = step_flops / seconds / peak
        module.log_dict(metrics, batch_size=batch.input_ids.shape[0])

    def _device_peak(self) -> float | None:
        if self._peak is None:
            name = torch.cuda.get_device_name()
            self._peak = next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
        return self._peak or None
