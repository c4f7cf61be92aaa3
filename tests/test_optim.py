"""The warmup + cosine schedule and `optim.decay_steps` (train/optim.py)."""

import pytest
import torch

from models.config import ConfigError
from train.optim import OptimConfig, build_optimizer


def lrs(steps: int, **optim) -> list[float]:
    opt, sched = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(lr=1.0, warmup_ratio=0.1, **optim), steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_warms_up_and_decays_to_the_floor():
    run = lrs(100, min_lr_ratio=0.1)
    assert run[0] == pytest.approx(0.1) and run[9] == pytest.approx(1.0)  # 10 warmup steps
    assert run == sorted(run[:10]) + sorted(run[10:], reverse=True)
    assert run[-1] == pytest.approx(0.1, abs=1e-3)


def test_longer_decay_is_the_start_of_the_longer_run():
    stopped, full = lrs(80, decay_steps=130), lrs(130)
    assert stopped == pytest.approx(full[:80])
    assert stopped[-1] > 0.3  # ends with the learning rate still up


def test_decay_shorter_than_the_run_is_the_run_length():
    assert lrs(50, decay_steps=20) == pytest.approx(lrs(50))


def test_decay_steps_must_be_positive():
    with pytest.raises(ConfigError, match="optim.decay_steps must be >= 1"):
        OptimConfig(decay_steps=0)


def test_projector_lr_puts_the_projector_in_its_own_groups():
    """LLaVA-1.5's LoRA recipe trains the projector at 2e-5 beside adapters at 2e-4 (`mm_projector_lr`)."""
    from tests.helpers import tiny_model

    model = tiny_model()
    opt, sched = build_optimizer(model, OptimConfig(lr=2e-4, warmup_ratio=0.0, projector_lr=2e-5), 10)
    projector = {id(p) for p in model.multi_modal_projector.parameters()}
    by_lr = {}
    for group in opt.param_groups:
        by_lr.setdefault(group["initial_lr"], set()).update(id(p) for p in group["params"])
    assert by_lr[2e-5] == projector and not by_lr[2e-4] & projector
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    opt.step()
    sched.step()
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([2e-5 * 0.975528258, 2e-4 * 0.975528258])  # one cosine step of 10
    plain, _ = build_optimizer(model, OptimConfig(lr=2e-4), 10)
    assert len(plain.param_groups) == 2 and {g["initial_lr"] for g in plain.param_groups} == {2e-4}
