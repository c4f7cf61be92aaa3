"""`model.compile=true`: compiled decoder layers give the eager model's logits, loss gradients and
greedy tokens (inductor on CPU). FastV: dense layers before and after a token selection, so the
compiled layer meets two visual token counts (a recompile with dynamic shapes); p-MoD: each routed
layer meets its own count, with the router's gate as an input."""

import pytest
import torch

from models.compile import compile_decoder_layers
from models.generation import greedy_generate
from tests.helpers import image_batch
from tests.test_plans import plan_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fastv", "pmod"])  # pmod: routers outside the compiled layers, a kept width per layer
def test_compiled_layers_match_eager(name):
    torch._dynamo.reset()
    eager = plan_model(name, {}, layers=4)
    compiled = compile_decoder_layers(plan_model(name, {}, layers=4))
    assert [k for k, _ in compiled.named_parameters()] == [k for k, _ in eager.named_parameters()]  # names unchanged
    ids, mask, pixels = image_batch(eager.config, batch=2, pad_left=[0, 2])
    with torch.no_grad():
        want, got = (m(ids, mask, pixels).logits for m in (eager, compiled))
    valid = mask.bool()
    text = valid & (ids != eager.config.image_token_id)  # pruned visual positions have no logits (NaN)
    assert (got - want)[text].abs().max().item() <= 1e-4
    assert torch.equal(*(greedy_generate(m, ids, mask, pixels, max_new_tokens=3, eos_token_id=[-1]) for m in (eager, compiled)))
    labels = ids.masked_fill(~valid, -100)
    labels[:, : 5 + eager.config.num_image_tokens + 1] = -100
    for m in (eager, compiled):
        m.train()
        m(ids, mask, pixels, labels=labels).loss.backward()
    for (name_, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3), name_


@pytest.mark.slow
def test_the_job_trains_with_model_compile(tmp_path):
    """`python -m train model.compile=true` takes the config path (ModelSource.build compiles the layers)
    and trains, evaluates and exports like the eager job."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", "run_name=compiled", "model.compile=true",
           "trainer.max_steps=2", "trainer.val_check_interval=2", "data.source.n_train=16", "data.source.n_val=8",
           "data.num_workers=0", "data.batch_size=4", "eval.noimage=false",
           "model.config.text.num_hidden_layers=2", "model.config.vision.num_hidden_layers=2"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "compiled").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 2 and "val/acc" in summary["metrics"]
    assert (run / "export" / "config.json").exists()
