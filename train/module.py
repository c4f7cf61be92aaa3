"""The LightningModule: one MLLM, stage-aware freezing, AdamW + warmup/cosine, generation-based eval."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, replace

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from data.batch import Batch
from data.chat import TEMPLATES
from data.validity import REASONS
from data.windows import supervised_tokens
from models import MLLM
from models.generation import greedy_generate
from models.plan import Plan

from .evaluation import CONTROLS, AccuracyTracker, EvalConfig, video_controls
from .infra.sharding import excludes_frozen_weights, full_state_dict, offloads_optimizer, prepare_model, shards_parameters
from .model_source import ModelSource
from .nonfinite import NonFiniteGuard
from .optim import OptimConfig, build_optimizer
from .peft import PeftConfig, apply_training_setup
from .stage import StageConfig


class MLLMModule(L.LightningModule):
    """Trains the MLLM that `model` describes under `plan`; evaluates it by greedy generation, whose
    answers `tokenizer` decodes (None: a module that is only trained).

    The model itself is built in `configure_model` (so sharded strategies can build it partitioned);
    the config objects that describe it are the module's hyperparameters, so every checkpoint
    carries what built it (`checkpoint["hyper_parameters"]`, plain values).
    """

    def __init__(
        self,
        model: ModelSource,
        plan: Plan,
        tokenizer,
        optim: OptimConfig,
        stage: StageConfig,
        peft: PeftConfig | None = None,
        evaluation: EvalConfig | None = None,
        nonfinite: NonFiniteGuard | None = None,
    ):
        super().__init__()
        self.source, self.plan, self.tokenizer = model, plan, tokenizer
        self.model: MLLM | None = None
        self.optim_cfg = optim
        self.stage = stage
        self.peft = peft or PeftConfig()  # none: the stage alone decides what trains
        self.evaluation = evaluation or EvalConfig()
        self.nonfinite = nonfinite or NonFiniteGuard()
        self.eos_ids = stop_ids(tokenizer, model.chat_template) if tokenizer is not None else []
        self.save_hyperparameters(
            {
                "model": asdict(model),
                "plan": plan.to_dict(),
                "optim": asdict(optim),
                "stage": asdict(stage),
                "peft": asdict(self.peft),
                "eval": asdict(self.evaluation),
                "nonfinite": {"max_in_row": self.nonfinite.max_in_row},
            }
        )
        self.last_val_step = -1  # global step of the last evaluation during fit
        self.best_step = -1  # global step of the evaluation that produced the best checkpoint
        self._best_path = ""
        self.tracker = AccuracyTracker()
        self._val_loss = [0.0, 0]
        self._step_loss: torch.Tensor | None = None  # train/loss of the optimizer step so far (training_step)
        self.skipped = Counter()  # samples skipped on this rank, by reason (data/validity.py REASONS)

    @property
    def skipped_samples(self) -> int:
        return sum(self.skipped.values())

    def _count_skips(self, batch: Batch) -> None:
        self.skipped.update(batch.skipped or ({"other": batch.n_skipped} if batch.n_skipped else {}))

    def build_model(self) -> MLLM:
        model = self.source.build(self.plan)
        apply_training_setup(model, self.stage, self.peft)
        return model

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()
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
        model = self.build_model()
        model.load_state_dict(state, strict=True)
        return model

    # --- training -----------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """The batch on the device, with its sizes read while it was still on the host (models/host_sizes.py):
        forward passes then read nothing back from the device. The loss's token count is checked here too."""
        model = getattr(self, "model", None)
        if not isinstance(batch, Batch) or model is None:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        images = (batch.pixel_values, batch.image_sizes)
        sizes = model.batch_sizes(batch.input_ids, batch.attention_mask, *images, batch.labels, batch.sample_index, batch.step_seconds)
        counted = supervised_tokens(batch.labels)  # what the accumulation window's count summed for this batch
        if sizes.supervised != counted:
            raise RuntimeError(f"the loss covers {sizes.supervised} tokens of this batch, data.windows.supervised_tokens "
                               f"counts {counted}: the accumulation window's normalisation would be wrong")
        prompt_sizes = model.batch_sizes(batch.prompt_ids, batch.prompt_mask, *images, step_seconds=batch.step_seconds)
        moved = super().transfer_batch_to_device(replace(batch, sizes=None, prompt_sizes=None), device, dataloader_idx)
        return replace(moved, sizes=sizes, prompt_sizes=prompt_sizes)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The loss of an optimizer step is its summed token cross-entropy over the supervised tokens of
        all its micro-batches on all ranks, so every token weighs the same however long its micro-batch
        (transformers' gradient-accumulation fix, torchtitan's global token count). Each micro-batch
        returns its token-loss sum over that count (`batch.window`, summed over the ranks before any
        backward), times what the strategy divides by afterwards (`loss_scale`). Logged `train/loss`:
        the step's mean cross-entropy per supervised token, over all its micro-batches and ranks.
        Routed plans add their routers' auxiliary loss, a mean over the step's micro-batches and ranks
        (`train/route_aux_loss`), and log per routed layer the fraction of visual tokens that entered it and
        their mean gate (`route/keep/<layer>`, `route/weight/<layer>`; models/routing.py)."""
        out = self.model(batch.input_ids, batch.attention_mask, labels=batch.labels, **batch.images, sample_index=batch.sample_index,
                         sizes=batch.sizes)
        self._count_skips(batch)
        bs = batch.size
        counted = supervised_tokens(batch.labels) if batch.sizes is None else batch.sizes.supervised  # (checked on the host)
        if out.n_loss_tokens != counted:
            raise RuntimeError(f"the loss covers {out.n_loss_tokens} tokens of this batch, data.windows.supervised_tokens "
                               f"counts {counted}: the accumulation window's normalisation would be wrong")
        tokens, index, length = batch.window or self._own_window(counted)
        tokens = max(self._over_ranks(tokens), 1)  # a step without supervised tokens: loss 0, no gradient
        objective = out.loss_sum / tokens
        if out.moe_aux_loss is not None:  # MoE LLM: the load-balancing loss, averaged over the window's micro-batches and ranks
            objective = objective + self.model.text_config.router_aux_loss_coef * out.moe_aux_loss / (length * self.trainer.world_size)
            self.log("train/moe_aux_loss", out.moe_aux_loss.detach(), batch_size=bs, sync_dist=True)
        if out.route_aux_loss is not None:  # routed plans: the routers' auxiliary loss, averaged the same way
            objective = objective + out.route_aux_loss / (length * self.trainer.world_size)
            self._log_routing(out, bs)
        loss = self.nonfinite.check(self, objective * loss_scale(self.trainer), bs)  # NaN on every rank if any is
        share = out.loss_sum.detach() / tokens if torch.isfinite(loss) else loss.detach()
        self._step_loss = share if index == 0 else self._step_loss + share
        if index == length - 1 and torch.isfinite(self._step_loss):
            self.log("train/loss", self._step_loss, prog_bar=True, batch_size=bs, sync_dist=True, reduce_fx="sum")
        self.log("data/skipped_samples", float(self.skipped_samples), batch_size=bs)
        for reason, n in self.skipped.items():  # this rank's counts (summed over ranks at each evaluation)
            self.log(f"data/skipped_samples/{reason}", float(n), batch_size=bs)
        padding = getattr(self.trainer.datamodule, "padding_fraction", None) if self._trainer is not None else None
        if padding is not None:  # padded / all training tokens so far (data/datamodule.py)
            self.log("data/padding_fraction", padding, batch_size=bs)
        if batch.sample_index is not None:  # packed rows (data/packing.py)
            self.log("data/samples_per_pack", batch.n_samples / bs, batch_size=bs)
        return loss

    def _log_routing(self, out, bs: int) -> None:
        self.log("train/route_aux_loss", out.route_aux_loss.detach(), batch_size=bs, sync_dist=True)
        for layer, stats in out.route_stats.items():
            self.log(f"route/keep/{layer}", stats.keep, batch_size=bs, sync_dist=True)
            self.log(f"route/weight/{layer}", stats.weight, batch_size=bs, sync_dist=True)

    def _own_window(self, tokens: int) -> tuple[int, int, int]:
        """A batch (of `tokens` supervised tokens) from a loader that does not tag windows (data/windows.py)
        is its own window, which is right only without accumulation."""
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError("with trainer.accumulate_grad_batches > 1 the training loader must tag each batch with its "
                             "accumulation window: data.windows.WindowLoader (MLLMDataModule's training loader is one)")
        return tokens, 0, 1

    def _over_ranks(self, count: int) -> int:
        if self.trainer.world_size == 1:
            return count
        total = self.trainer.strategy.reduce(torch.tensor(float(count), dtype=torch.float64, device=self.device), reduce_op="sum")
        return int(total)

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
        self._note_best_checkpoint()
        self.tracker.reset()
        self._val_loss = [0.0, 0]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.model(batch.input_ids, batch.attention_mask, labels=batch.labels, **batch.images, sizes=batch.sizes)
        self._count_skips(batch)  # bad evaluation samples count like training ones
        self._val_loss[0] += float(out.loss) * out.n_loss_tokens
        self._val_loss[1] += out.n_loss_tokens
        preds = self._generate(batch)
        preds_noimage = None
        if self.evaluation.noimage and batch.pixel_values is not None:
            preds_noimage = self._generate(batch.blank_images())
        controls = {}
        if self.evaluation.video_controls and batch.step_seconds is not None:  # the batch holds video
            for kind in CONTROLS:
                pixels = video_controls(self.model, batch.pixel_values, batch.image_sizes, batch.step_seconds, kind, seed=batch_idx)
                controls[kind] = self._generate(replace(batch, pixel_values=pixels))
        self.tracker.add(batch.skills, batch.answers, preds, preds_noimage, scored=batch.scored, controls=controls)

    def _generate(self, batch: Batch) -> list[str]:
        if self.tokenizer is None:
            raise ValueError("this MLLMModule has no tokenizer, so it cannot generate answers to evaluate")
        tokens = greedy_generate(
            self.model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.pixel_values,
            image_sizes=batch.image_sizes,
            step_seconds=batch.step_seconds,
            max_new_tokens=self.evaluation.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            sync_ranks=self._trainer is not None and self.trainer.world_size > 1,
            sizes=batch.prompt_sizes,
            compile=self.evaluation.compile_decode,
        )
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def on_validation_epoch_end(self) -> None:
        metrics = self.tracker.metrics("val")
        loss = torch.tensor(self._val_loss, dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")
        if loss[1] > 0:
            metrics["val/loss"] = float(loss[0] / loss[1])
        # gathered (or summed) above, so equal on every rank: synced with "max", which keeps them exact
        # (and tells Lightning they are reduced); skipped samples are counted per rank and summed
        self.log_dict({**metrics, **self._skip_metrics()}, sync_dist=True, reduce_fx="max")
        self.last_val_metrics = metrics
        if self.trainer.state.fn == "fit":
            self.last_val_step = self.global_step

    def _skip_metrics(self) -> dict[str, float]:
        """`data/skipped_samples` and, per reason met, `data/skipped_samples/<reason>`, summed over the
        ranks as one vector in REASONS order (so every rank logs the same keys)."""
        counts = torch.tensor([float(self.skipped.get(r, 0)) for r in REASONS], dtype=torch.float64, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        out = {"data/skipped_samples": float(counts.sum())}
        out.update({f"data/skipped_samples/{r}": float(n) for r, n in zip(REASONS, counts.tolist()) if n})
        return out

    def on_fit_end(self) -> None:
        self._note_best_checkpoint()

    def _note_best_checkpoint(self) -> None:
        """Remember at which evaluation the best checkpoint last changed: the checkpoint callback
        saves after each evaluation, so a new best path seen now belongs to the last evaluation."""
        callback = self._trainer.checkpoint_callback if self._trainer is not None else None
        best = getattr(callback, "best_model_path", "") or ""
        if best and best != self._best_path:
            self._best_path, self.best_step = best, self.last_val_step


def loss_scale(trainer: L.Trainer) -> int:
    """What the gradient of a returned training loss is divided by on its way to the optimizer:
    Lightning's automatic optimization divides every loss by accumulate_grad_batches, DeepSpeed's
    engine divides it again by its gradient_accumulation_steps (the same number, set by Lightning),
    and DDP, ZeRO and FSDP2 average gradients over the ranks. Exact under every strategy because the
    loss is scaled before backward, not the gradients after it (DeepSpeed keeps those in its own
    partitioned buffers)."""
    accumulate = trainer.accumulate_grad_batches
    return accumulate * trainer.world_size * (accumulate if isinstance(trainer.strategy, DeepSpeedStrategy) else 1)


def stop_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS and the template's stop marker."""
    ids = {tokenizer.eos_token_id}
    stop = TEMPLATES[template].stop.strip()
    if stop and stop in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids(stop))
    return sorted(i for i in ids if i is not None)
