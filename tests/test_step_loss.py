"""The loss of an optimizer step weighs every supervised token the same: with gradient accumulation
and over ranks the applied gradient is the full-batch gradient (Σ token losses / Σ supervised
tokens of the step), not a mean of per-micro-batch means (train/module.py, data/windows.py)."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from data.windows import accumulation_windows, supervised_tokens
from tests.step_loss_fit import ACCUMULATE, LLM_ONLY, ROUTED, SGDModule, FullWeights, batches, full_batch_gradient, step_gradients, window_loader
from tests.tiny_fit import make_module

ROOT = Path(__file__).resolve().parents[1]
TOL = 2e-6  # fp32 gradients of O(1e-2..1) summed in another order


def max_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(got, want))


def assert_full_batch_gradients(weights: list[dict], windows: list[list], plan=None, stage=None) -> float:
    """Every step's gradient (read off `weights`) is the full-batch gradient of its window's micro-batches
    at the weights before it, and far from what per-micro-batch means would give; returns the max difference."""
    model = make_module(plan=plan, stage=stage).build_model().train()
    worst = 0.0
    for before, got, window in zip(weights[:-1], step_gradients(weights), windows, strict=True):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(before[name])
        diff = max_difference(got, full_batch_gradient(model, window))
        biased = max_difference(got, full_batch_gradient(model, window, per_token=False))
        assert diff <= TOL, diff
        assert biased > 100 * TOL, biased  # the micro-batches' token counts differ enough to tell the two apart
        worst = max(worst, diff)
    return worst


def test_windows_tag_each_batch_with_its_windows_supervised_tokens():
    micro = batches(n=7)
    counts = [supervised_tokens(b.labels) for b in micro]
    assert len(set(counts)) > 3
    tagged = [b.window for b in accumulation_windows(micro, size=4, done=1)]  # resumed after 1 of 4; the stream ends
    windows = [(0, 3), (3, 7)]
    assert tagged == [(sum(counts[a:b]), i, b - a) for a, b in windows for i in range(b - a)]


def test_accumulated_steps_apply_the_full_batch_gradient(tmp_path):
    """One process, 4 micro-batches per step; the epoch's last step has only 2 (Lightning steps at its end)."""
    micro = batches(n=6)
    record = FullWeights()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=ACCUMULATE, logger=False,
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[record])
    trainer.fit(make_module(cls=SGDModule), train_dataloaders=window_loader(micro, trainer))
    assert trainer.global_step == 2
    worst = assert_full_batch_gradients(record.weights, [micro[:4], micro[4:]])
    print(f"single process, accumulate {ACCUMULATE}: max |grad - full-batch grad| = {worst:.2g}")


class Windows(L.Callback):
    """(optimizer step, window tag, the batch's own supervised tokens) of every micro-batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch.window, supervised_tokens(batch.labels)))


class SaveAt(L.Callback):
    def __init__(self, batch_idx: int, path: Path):
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def test_a_run_resumed_mid_window_normalises_each_step_by_its_own_micro_batches(tmp_path):
    """A checkpoint saved after 6 micro-batches (a preemption mid-window): the resumed run's first step
    has the remaining 2, and every step's micro-batches carry the count of exactly those micro-batches."""
    def trainer(epochs: int, *callbacks) -> L.Trainer:
        return L.Trainer(accelerator="cpu", max_epochs=epochs, accumulate_grad_batches=ACCUMULATE, logger=False,
                         default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks))

    ckpt = tmp_path / "mid.ckpt"
    first = trainer(1, SaveAt(5, ckpt))
    first.fit(make_module(cls=SGDModule), train_dataloaders=window_loader(batches(n=8), first))
    windows = Windows()
    resumed = trainer(2, windows)
    resumed.fit(make_module(cls=SGDModule), train_dataloaders=window_loader(batches(n=8), resumed), ckpt_path=ckpt)
    steps = {}
    for step, window, own in windows.seen:
        steps.setdefault(step, []).append((window, own))
    assert [len(v) for v in steps.values()] == [2, 4, 4]  # the rest of the window, then epoch 2's two windows
    for micro in steps.values():  # each step is one window, and its count is that of its micro-batches
        tokens = sum(own for _, own in micro)
        assert [w for w, _ in micro] == [(tokens, i, len(micro)) for i in range(len(micro))]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_two_ranks_accumulating_apply_the_full_batch_gradient(tmp_path, strategy):
    """2 gloo ranks x 4 micro-batches per step, 2 steps: each step's gradient is the one of all 8 micro-batches."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "step_loss_fit.py"), strategy, str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    rank0, rank1 = batches(0), batches(1)
    windows = [rank0[s:s + ACCUMULATE] + rank1[s:s + ACCUMULATE] for s in (0, ACCUMULATE)]
    worst = assert_full_batch_gradients(weights, windows)
    print(f"{strategy}, 2 ranks, accumulate {ACCUMULATE}: max |grad - full-batch grad| = {worst:.2g}")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_two_ranks_with_routed_layers_equal_one_process(tmp_path, strategy):
    """A routed plan (one shared router called by both layers, an auxiliary loss) on 2 gloo ranks whose
    visual token counts differ (rank 1's odd micro-batches have a text-only row): no hang, and each step's
    gradient is the one process's full-batch gradient of all 8 micro-batches (routers included)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "step_loss_fit.py"), strategy, str(tmp_path), "routed"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert any(k.startswith("routers.") for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[-1][k]) for k in weights[0] if k.startswith("routers."))
    rank0, rank1 = batches(0, text_only=True), batches(1, text_only=True)
    windows = [rank0[s:s + ACCUMULATE] + rank1[s:s + ACCUMULATE] for s in (0, ACCUMULATE)]
    worst = assert_full_batch_gradients(weights, windows, plan=ROUTED, stage=LLM_ONLY)
    print(f"{strategy}, routed, 2 ranks, accumulate {ACCUMULATE}: max |grad - full-batch grad| = {worst:.2g}")
