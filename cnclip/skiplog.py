"""Counting what was skipped: bad lines, images and records are counted per reason, never dropped silently."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("cnclip.data")


@dataclass
class SkipLog:
    """Counts of skipped items per reason, with the first few locations of each for the log."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
            shown.append(message)
            log.warning("skipped %s", message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}
