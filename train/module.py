"""The LightningModule: one MLLM, stage-aware freezing, AdamW + warmup/cosine, generation-based eval."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch

from models import MLLM
from models.generation import greedy_generate

from .evaluation import AccuracyTracker
from .nonfinite import NonFiniteGuard
from .optim import OptimConfig, build_optimizer
from .peft import PeftConfig, apply_training_setup
from .sharding import excludes_frozen_weights, full_state_dict, offloads_optimizer, prepare_model, shards_parameters
from .stage import StageConfig


class MLLMModule(L.LightningModule):
    """Trains `model_factory()` (built in `configure_model`, so sharded strategies can wrap it).

    `decode` turns generated ids into strings; `eos_ids` stop generation.
    """

    def __init__(
        self,
        model_factory: Callable[[], MLLM],
        optim: OptimConfig,
        stage: StageConfig,
        decode: Callable[[torch.Tensor], list[str]],
        eos_ids: list[int],
        pad_id: int,
        max_new_tokens: int = 8,
        eval_noimage: bool = True,
        peft: PeftConfig | None = None,
        nonfinite: NonFiniteGuard | None = None,
    ):
        super().__init__()
        self.model_factory = model_factory
        self.model: MLLM | None = None
        self.optim_cfg = optim
        self.stage = stage
        self.peft = peft or PeftConfig()  # none: the stage alone decides what trains
        self.decode = decode
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.max_new_tokens = max_new_tokens
        self.eval_noimage = eval_noimage
        self.last_val_step = -1  # global step of the last evaluation during fit
        self.tracker = AccuracyTracker()
        self._val_loss = [0.0, 0]
        self.skipped_samples = 0
        self.nonfinite = nonfinite or NonFiniteGuard()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.model_factory()
            apply_training_setup(self.model, self.stage, self.peft)
            if self._trainer is not None:
                prepare_model(self.model, self.trainer.strategy)  # ZeRO-3 layer gathering / FSDP2 units
                # DeepSpeed checkpoints leave frozen weights out (a LoRA checkpoint holds the adapter, not
                # the base model); on resume those come from the model as built, so they are not "missing"
                self.strict_loading = not excludes_frozen_weights(self.trainer.strategy)

    def unsharded_model(self) -> MLLM | None:
        """The trained model as a plain module on rank 0 (None on other ranks); every rank must call
        this. With sharded parameters (ZeRO-3, FSDP) it is rebuilt from the gathered full weights."""
        strategy = self.trainer.strategy
        if not shards_parameters(strategy):
            return self.model if self.trainer.is_global_zero else None
        state = full_state_dict(self.model, strategy)
        if state is None:
            return None
        model = self.model_factory()
        apply_training_setup(model, self.stage, self.peft)
        model.load_state_dict(state, strict=True)
        return model

    # --- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
        self.skipped_samples += int(batch["n_skipped"])
        bs = batch["input_ids"].shape[0]
        loss = self.nonfinite.check(self, out.loss, bs)  # NaN on every rank when any rank's loss is NaN/Inf
        if torch.isfinite(loss):
            self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("data/skipped_samples", float(self.skipped_samples), batch_size=bs)
        padding = getattr(self.trainer.datamodule, "padding_fraction", None) if self._trainer is not None else None
        if padding is not None:  # padded / all training tokens so far (data/datamodule.py)
            self.log("data/padding_fraction", padding, batch_size=bs)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.nonfinite.drop_gradients(self)  # a skipped (non-finite) step applies no update

    def configure_optimizers(self):
        total = self.trainer.max_steps
        if total is None or total < 0:
            raise ValueError("trainer.max_steps must be set (training is step-based over a streaming dataset)")
        opt, sched = build_optimizer(self.model, self.optim_cfg, total, cpu_offload=offloads_optimizer(self.trainer.strategy))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- evaluation --------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.tracker.reset()
        self._val_loss = [0.0, 0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
        self._val_loss[0] += float(out.loss) * out.n_loss_tokens
        self._val_loss[1] += out.n_loss_tokens
        preds = self._generate(batch, batch["pixel_values"])
        preds_noimage = None
        if self.eval_noimage and batch["pixel_values"] is not None:
            preds_noimage = self._generate(batch, torch.zeros_like(batch["pixel_values"]))
        self.tracker.add(batch["skills"], batch["answers"], preds, preds_noimage, scored=batch.get("scored"))

    def _generate(self, batch: dict, pixel_values) -> list[str]:
        tokens = greedy_generate(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            pixel_values,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            sync_ranks=self._trainer is not None and self.trainer.world_size > 1,
        )
        return self.decode(tokens)

    def on_validation_epoch_end(self) -> None:
        metrics = self.tracker.metrics("val")
        loss = torch.tensor(self._val_loss, dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")
        if loss[1] > 0:
            metrics["val/loss"] = float(loss[0] / loss[1])
        self.log_dict(metrics, sync_dist=False, rank_zero_only=False)
        self.last_val_metrics = metrics
        if self.trainer.state.fn == "fit":
            self.last_val_step = self.global_step
