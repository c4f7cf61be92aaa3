"""Counting skipped samples by reason, with warnings that do not repeat themselves.

A bad sample in an infinite training stream comes round every epoch, and one in the evaluation set
every evaluation: logging each occurrence buries the log. `SkipLog` counts every skip (by reason,
data/validity.py) but warns about a sample only the first time this reader meets it, at most
`per_reason` samples per reason (then one line saying the rest are counted, not logged), and not at
all while `quiet` (an evaluation pass after the first: the same samples again, see data/pipeline.py).
"""

from __future__ import annotations

import logging
from collections import Counter

from .validity import reason_of

log = logging.getLogger(__name__)


class SkipLog:
    def __init__(self, what: str, per_reason: int = 5, logger: logging.Logger = log):
        self.what, self.per_reason, self.logger = what, per_reason, logger
        self.total: Counter = Counter()  # every skip so far, by reason
        self.pending: Counter = Counter()  # skips not handed on yet (take())
        self.quiet = False
        self._seen: set[str] = set()
        self._logged: Counter = Counter()

    def skip(self, where: str, error: BaseException, reason: str | None = None) -> str:
        """Count one skipped sample (`where`: its key and shard); returns the reason it counts under."""
        reason = reason or reason_of(error)
        self.total[reason] += 1
        self.pending[reason] += 1
        if self.quiet or where in self._seen:
            return reason
        self._seen.add(where)
        self._logged[reason] += 1
        if self._logged[reason] <= self.per_reason:
            detail = str(error) if reason != "other" else f"{type(error).__name__}: {error}"
            self.logger.warning("%s: skipping sample %s (%s): %s", self.what, where, reason, detail)
        if self._logged[reason] == self.per_reason:
            self.logger.warning("%s: further %s samples are counted (data/skipped_samples/%s), not logged", self.what, reason, reason)
        return reason

    def take(self) -> dict[str, int]:
        """The skips since the last take, by reason (what the next sample carries)."""
        out, self.pending = dict(self.pending), Counter()
        return out

    @property
    def n_total(self) -> int:
        return sum(self.total.values())

    def summary(self) -> str:
        """`no_conversations 2, corrupt_image 1`: all skips so far by reason, most frequent first."""
        return ", ".join(f"{r} {n}" for r, n in self.total.most_common())
