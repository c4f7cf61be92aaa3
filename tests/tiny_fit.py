"""A tiny real training job (the MLLMModule on a few-thousand-parameter model, in-memory batches whose
chosen steps carry NaN images, so their loss is NaN) for tests/test_nonfinite.py and
tests/test_preemption.py. Run as a script it is a 2-rank CPU job:

    python tests/tiny_fit.py {ddp|deepspeed_zero2} OUT_DIR   # rank 1's batch at step 2 is NaN

and each rank writes OUT_DIR/rank<r>.json: the guard's counts and a weight fingerprint per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataclasses import asdict  # noqa: E402

from data.batch import Batch  # noqa: E402
from models.plan import Plan  # noqa: E402
from tests.helpers import image_batch, tiny_config  # noqa: E402
from train.model_source import ModelSource  # noqa: E402
from train.module import MLLMModule  # noqa: E402
from train.nonfinite import NonFiniteGuard  # noqa: E402
from train.optim import OptimConfig  # noqa: E402
from train.stage import StageConfig  # noqa: E402

CONFIG = dict(text_layers=2)


class SeededModule(MLLMModule):
    """Every rank builds the same initial weights."""

    def build_model(self):
        torch.manual_seed(0)
        return super().build_model()


def make_module(max_in_row: int = 10, cls: type[MLLMModule] = SeededModule, plan: Plan | None = None,
                stage: StageConfig | None = None) -> MLLMModule:
    config = tiny_config(**CONFIG)
    return cls(
        ModelSource(name="tiny_fit", config=asdict(config)),
        plan or Plan.dense(config.hf_text_config().num_hidden_layers),
        tokenizer=None,
        optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
        stage=stage or StageConfig("scratch", True, True, True),
        nonfinite=NonFiniteGuard(max_in_row),
    )


def make_batches(n: int, poison: set[int] = frozenset(), seed: int = 0) -> list[Batch]:
    """`n` training batches; those at indices in `poison` carry NaN images (their loss is NaN)."""
    config = tiny_config(**CONFIG)
    batches = []
    for i in range(n):
        ids, mask, pixels = image_batch(config, 2, seed=seed + i)
        labels = ids.clone()
        labels[:, : 3 + config.num_image_tokens + 1] = -100  # supervise the text after the image
        if i in poison:
            pixels = torch.full_like(pixels, float("nan"))
        batches.append(Batch(ids, mask, labels, ids, mask, pixels, answers=[""] * 2, skills=["all"] * 2, keys=["", ""],
                             scored=[True, True]))
    return batches


def loader(batches: list[Batch]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


class WeightLog(L.Callback):
    """The trained weights after every step (`weights[i]`: after the batch at index i)."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten().clone() for p in module.model.parameters()]))


class RankData(L.LightningDataModule):
    """Rank 1's batch at index 2 is poisoned, rank 0's data is clean (the case where only one rank
    sees a NaN loss: both must skip, or the gradient all-reduce waits forever)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def train_dataloader(self):
        rank = self.trainer.global_rank
        return loader(make_batches(self.n, {2} if rank == 1 else set(), seed=100 * rank))


def main(strategy_name: str, out: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from train.infra.strategies import deepspeed

    if strategy_name == "deepspeed_zero2":
        strategy = deepspeed(stage=2, logging_batch_size_per_gpu=2)
    else:
        strategy = DDPStrategy(process_group_backend="gloo")
    log = WeightLog()
    module = make_module()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[log], gradient_clip_val=1.0)
    trainer.fit(module, datamodule=RankData(4))
    fingerprints = [[float(w.sum()), float(w.abs().sum())] for w in log.weights]
    record = dict(total=module.nonfinite.total, steps=trainer.global_step, weights=fingerprints,
                  unchanged=[bool(torch.equal(a, b)) for a, b in zip(log.weights, log.weights[1:])])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
