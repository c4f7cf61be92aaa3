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
