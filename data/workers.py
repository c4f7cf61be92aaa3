"""How many dataloader worker processes to start: `data.num_workers` is a count or `auto`."""

from __future__ import annotations

import os

from models.config import ConfigError

MAX_AUTO_WORKERS = 4  # enough to keep image decoding ahead of a training step on the tested models


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as PyTorch's DataLoader counts them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_num_workers(value: int | str) -> int:
    """`auto`: up to MAX_AUTO_WORKERS, leaving one core to the training process (0 on one core: the
    main process loads); a count is used as given."""
    if value == "auto":
        return max(0, min(MAX_AUTO_WORKERS, usable_cores() - 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.num_workers must be a count >= 0 or 'auto', got {value!r}")
    return value
