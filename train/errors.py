"""Bad input ends with one paragraph and exit code 2, not a wall of traceback.

A `ConfigError` (models/config.py: a wrong key, type, range or plan), a path that does not exist
(checkpoint, shards, `model.pretrained`) and a command line Hydra cannot compose are the user's to fix,
and their messages already name the problem and the fix. `python -m train`, `python -m train evaluate`
and the tools print that message and exit 2; `HYDRA_FULL_ERROR=1` re-raises instead (full traceback).
Anything else is a bug or a failing environment and keeps its traceback (exit 1). In a sweep
(`-m`) the error is raised as usual, so the launcher records which point failed.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf.errors import InterpolationResolutionError

from models.config import ConfigError

EXIT_BAD_INPUT = 2
INPUT_ERRORS = (ConfigError, FileNotFoundError, ConfigCompositionException, MissingConfigException, OverrideParseException)
_job_started = False  # set when Hydra hands the composed config to the job (see train/__main__.py)


def mark_job_started() -> None:
    global _job_started
    _job_started = True


def job_started() -> bool:
    """False while Hydra is still composing: a failure then is the command line's or the config's."""
    return _job_started


def input_error(exc: BaseException | None) -> BaseException | None:
    """The input error `exc` is or was raised from (Hydra's instantiate wraps ours), else None. OmegaConf
    re-raises what a resolver raised (`${accumulation:...}`, `${required:...}`) without a cause, so an
    interpolation error is followed through the exception it was raised while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, INPUT_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or (exc.__context__ if isinstance(exc, InterpolationResolutionError) else None)
    return None


def full_errors_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report(exc: BaseException) -> None:
    """One paragraph on stderr, from one process (every rank of a multi-process job fails alike)."""
    if rank_zero_only.rank == 0:
        print(f"error: {exc}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)


@contextmanager
def exit_on_input_error(enabled: bool = True):
    """Turn an input error raised inside into the one-paragraph report and exit code 2."""
    try:
        yield
    except Exception as exc:
        found = input_error(exc)
        if not enabled or found is None or full_errors_requested():
            raise
        report(found)
        raise SystemExit(EXIT_BAD_INPUT) from None
