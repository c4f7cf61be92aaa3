"""Gradient accumulation that weighs every supervised token the same, for tests/test_step_loss.py.

Plain SGD (lr 1, no clipping, fp32) turns each optimizer step's gradient into a weight difference,
so a run's gradients can be read off its weights and compared with the full-batch gradient of the
same weights. Micro-batches supervise very different numbers of tokens (1 to 39 per row), so a mean
per micro-batch would weigh them visibly wrong. Run as a script it is a 2-rank CPU job:

    python tests/step_loss_fit.py {ddp|deepspeed_zero2|deepspeed_zero3|fsdp} OUT_DIR [routed]

with `trainer.accumulate_grad_batches=4`, two optimizer steps over `batches(rank)`; rank 0 writes
OUT_DIR/weights.pt, the full weights before the first step and after each step. `routed`: under
`ROUTED` (both layers routed by one shared router with an auxiliary loss), where every other micro-batch
of rank 1 has a text-only row, so the ranks hold different numbers of visual tokens; the LLM and the
router train, the vision tower and the projector are frozen. (A micro-batch without any image would hang
ZeRO-3 on its own, routed or not: the other rank's tower gathers its parameters, this one's never runs.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.batch import Batch  # noqa: E402
from data.windows import WindowLoader, trainer_window  # noqa: E402
from models.methods import resolve_arch  # noqa: E402
from train.stage import StageConfig  # noqa: E402
from tests.helpers import image_batch, tiny_config  # noqa: E402
from tests.tiny_fit import CONFIG, SeededModule, make_module  # noqa: E402

LR, ACCUMULATE = 1.0, 4
SUFFIXES = [2, 40, 3, 25, 6, 2, 31, 10]  # text tokens after the image: supervised tokens per row + 1
ROUTED = resolve_arch({"methods": {"rules": [{"layers": "all", "set": {"route": {
    "keep": 0.5, "router": "shared", "router_input": "normed", "aux": 0.1}}}]}}, CONFIG["text_layers"], 4)
LLM_ONLY = StageConfig("llm", train_vision=False, train_projector=False, train_llm=True)


class SGDModule(SeededModule):
    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=LR)


def batches(rank: int = 0, n: int = 8, text_only: bool = False) -> list[Batch]:
    """`n` micro-batches of 2 rows each supervising the text after the image; rank 1's counts run backwards.
    `text_only`: the second row of rank 1's odd micro-batches holds no image (its image tokens become words)."""
    config = tiny_config(**CONFIG)
    suffixes = SUFFIXES if rank == 0 else SUFFIXES[::-1]
    out = []
    for i in range(n):
        ids, mask, pixels = image_batch(config, 2, suffix=suffixes[i % len(suffixes)], seed=1000 * rank + i)
        labels = ids.clone()
        labels[:, : 3 + config.num_image_tokens + 1] = -100
        if text_only and rank == 1 and i % 2:
            ids[1] = ids[1].masked_fill(ids[1] == config.image_token_id, 7)
            pixels = pixels[:1]
        out.append(Batch(ids, mask, labels, ids, mask, pixels, answers=[""] * 2, skills=["all"] * 2, keys=["", ""],
                         scored=[True, True]))
    return out


def window_loader(micro_batches: list[Batch], trainer: L.Trainer) -> WindowLoader:
    return WindowLoader(micro_batches, batch_size=None, collate_fn=lambda b: b, window=trainer_window(trainer))


def full_batch_gradient(model, micro_batches: list[Batch], per_token: bool = True) -> list[torch.Tensor]:
    """The gradient of Σ token losses / Σ supervised tokens (as the model counts them) over
    `micro_batches` (per_token=False: the mean over micro-batches of each one's mean, what
    accumulating per-micro-batch means gives)."""
    model.zero_grad()
    outs = [model(b.input_ids, b.attention_mask, labels=b.labels, pixel_values=b.pixel_values) for b in micro_batches]
    total = sum(out.n_loss_tokens for out in outs)
    aux = sum(out.route_aux_loss / len(outs) for out in outs if out.route_aux_loss is not None)  # routed plans: a mean per micro-batch
    (sum(out.loss_sum / total if per_token else out.loss / len(outs) for out in outs) + aux).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def step_gradients(weights: list[dict]) -> list[list[torch.Tensor]]:
    """Each step's applied gradient, read off the weights before and after it (SGD at LR)."""
    return [[(a[k] - b[k]) / LR for k in a] for a, b in zip(weights, weights[1:])]


class FullWeights(L.Callback):
    """The full (gathered) weights before training and after each optimizer step; every rank calls."""

    def __init__(self):
        self.weights: list[dict] = []

    def _record(self, module) -> None:
        model = module.unsharded_model()
        if model is not None:
            self.weights.append({k: v.detach().clone() for k, v in model.named_parameters()})

    def on_train_start(self, trainer, module):
        self._record(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch.window[1] == batch.window[2] - 1:  # the window's last micro-batch: its step has been applied
            self._record(module)


def main(strategy_name: str, out: Path, routed: bool = False) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from train.infra.strategies import deepspeed, fsdp

    strategy = {
        "ddp": lambda: DDPStrategy(process_group_backend="gloo"),
        "deepspeed_zero2": lambda: deepspeed(stage=2, logging_batch_size_per_gpu=2),
        "deepspeed_zero3": lambda: deepspeed(stage=3, logging_batch_size_per_gpu=2),
        "fsdp": fsdp,
    }[strategy_name]()
    record = FullWeights()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, accumulate_grad_batches=ACCUMULATE,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[record])

    class RankData(L.LightningDataModule):
        def train_dataloader(self):
            return window_loader(batches(self.trainer.global_rank, text_only=routed), self.trainer)

    module = make_module(cls=SGDModule, plan=ROUTED, stage=LLM_ONLY) if routed else make_module(cls=SGDModule)
    trainer.fit(module, datamodule=RankData())
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(record.weights, out / "weights.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), routed=sys.argv[3:] == ["routed"])
