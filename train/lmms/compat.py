"""lmms-eval 0.7.3 with filelock 4, without downgrading filelock.

`lmms_eval.evaluator.simple_evaluate` patches filelock's singleton metaclass so that nested
`datasets.load_dataset` calls share one lock per path (its `_enable_reentrant_filelocks`). It
imports `filelock._api`, the module that held `FileLockMeta` / `BaseFileLock` in filelock 3;
filelock 4 keeps the same classes in `filelock._core`. Registering `filelock._api` as an alias of
those lets lmms-eval's patch run unchanged instead of failing with ModuleNotFoundError.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def alias_filelock_api() -> None:
    """Make `import filelock._api` work on filelock 4 (no-op where it exists)."""
    if "filelock._api" in sys.modules or importlib.util.find_spec("filelock._api") is not None:
        return
    try:
        from filelock._core import _lock, _settings, _singleton
    except ImportError as e:
        raise ImportError("lmms-eval 0.7.3 imports filelock._api (filelock 3); this filelock has neither it nor filelock 4's "
                          "_core layout. Install filelock<4 in this environment.") from e

    api = types.ModuleType("filelock._api")
    api.__doc__ = "filelock 3's module layout over filelock 4's classes (see train/lmms/compat.py)"
    api.FileLockMeta = _singleton.FileLockMeta
    api.BaseFileLock = _lock.BaseFileLock
    api._UNSET_FILE_MODE = _settings.UNSET_FILE_MODE
    sys.modules["filelock._api"] = api
