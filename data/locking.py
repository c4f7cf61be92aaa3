"""A file lock for caches that several processes may build at once (every rank of a job, several
jobs sharing one data_dir): one builds while holding the lock, the others wait and then reuse it."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Holds an exclusive `flock` on `<path>.lock`, created beside `path` (which need not exist).

    The kernel releases the lock when the block ends or the process dies, so a killed builder never
    leaves it held. The lock file itself stays: removing it would let two processes lock different
    files of the same name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
