"""bf16 against fp32 on CPU, with documented tolerances.

Inference (`bench.dtype=bf16`: weights and activations in bf16): last-token logits of every plan
without token selection stay within 0.02 of fp32 (logits of magnitude ~0.5 here; bf16 keeps 8
mantissa bits, ~0.4% per rounding). Plans that select tokens can keep a different set when two
scores tie within bf16 rounding, so their logits are not compared elementwise.
Training (`trainer.precision=bf16-mixed`: fp32 weights, bf16 autocast): the losses of the first
steps on the same batches stay within 2% of fp32 and decrease the same way."""

import copy
from dataclasses import asdict

import lightning as L
import pytest
import torch

from models.plan import Plan
from tests.helpers import image_batch
from tests.test_plans import VARIANTS, ids, plan_model
from tests.test_train import LossRecorder, small_task_data, small_task_model_config
from train.model_source import ModelSource
from train.module import MLLMModule
from train.optim import OptimConfig
from train.stage import StageConfig

NO_SELECTION = [v for v in VARIANTS if v[0] not in ("fastv", "pdrop", "visipruner", "cls_knee", "dominant", "random")]


@pytest.mark.parametrize("variant", NO_SELECTION, ids=ids)
def test_bf16_inference_matches_fp32(variant):
    fp32 = plan_model(*variant)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    input_ids, mask, pixels = image_batch(fp32.config, batch=3, pad_left=[0, 2, 5], suffix=7)
    with torch.no_grad():
        want = fp32(input_ids, mask, pixels, logits="last").logits
        got = bf16(input_ids, mask, pixels, logits="last").logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() <= 0.02


def fit_losses(synthetic_dir, task_tokenizer, precision: str, steps: int = 6) -> list[float]:
    root, _ = synthetic_dir
    config = small_task_model_config()
    dm = small_task_data(root, task_tokenizer, config, batch_size=8, shuffle_buffer=50)
    torch.manual_seed(0)
    module = MLLMModule(
        ModelSource(name="small", config=asdict(config)), Plan.dense(config.hf_text_config().num_hidden_layers), task_tokenizer,
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0), stage=StageConfig("scratch", True, True, True),
    )
    rec = LossRecorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False, callbacks=[rec],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert next(module.model.parameters()).dtype == torch.float32  # mixed precision keeps fp32 weights
    return rec.losses


def test_bf16_mixed_training_follows_fp32(synthetic_dir, task_tokenizer):
    fp32 = fit_losses(synthetic_dir, task_tokenizer, "32-true")
    bf16 = fit_losses(synthetic_dir, task_tokenizer, "bf16-mixed")
    print("fp32", fp32, "bf16-mixed", bf16)
    assert len(bf16) == len(fp32) == 6 and bf16 != fp32  # autocast really ran in bf16
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.02 * a, (fp32, bf16)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]
