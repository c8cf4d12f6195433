"""Errors and skip accounting for dataset loading: nothing is dropped silently."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Bad input in a dataset file. The message starts with ``file[:line]:`` and names the cause."""

    def __init__(self, path: str, cause: str, line: int | None = None):
        self.path, self.cause, self.line = str(path), cause, line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {cause}")


@dataclass
class SkipLog:
    """Counts skipped items by reason; with ``strict`` the first problem raises instead.

    Loaders call :meth:`problem` for every bad item. In strict mode (the default for loaders) this
    raises :class:`DatasetError`; otherwise the item is skipped, counted and logged once per reason.
    """

    strict: bool = True
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def problem(self, reason: str, path: str, detail: str = "", line: int | None = None) -> None:
        err = DatasetError(path, f"{reason}{': ' + detail if detail else ''}", line)
        if self.strict:
            raise err
        self.counts[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = str(err)
            logger.warning("skipping (%s) e.g. %s", reason, err)

    def note(self, reason: str, n: int = 1) -> None:
        """Count an expected, documented drop (e.g. zero-area boxes) without raising."""
        self.counts[reason] += n

    def merge(self, other: "SkipLog") -> None:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    def summary(self) -> str:
        if not self.counts:
            return "no skips"
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
