"""The error budget: a job whose rows are mostly rejected stops early instead of "succeeding" with no images.

A file whose class column is called `class_label` rejects every row; without a
budget the job writes an errors dataset and exits 0. `RejectCounter` counts rows
and rejections with their reasons; once `check_rows` rows are read, more than
`max_fraction` rejected stops the job (exit 3) with the most common reasons. A job
whose every row is rejected stops however few rows it has.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

EXIT_BAD_ROWS = 3


class TooManyBadRows(RuntimeError):
    """Too many prompt rows were rejected; the message gives the count and the most common reasons."""
    exit_code = EXIT_BAD_ROWS


@dataclass
class RejectCounter:
    max_fraction: float
    check_rows: int
    rows: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)

    def add(self, rows: int, errors: list[dict]) -> None:
        self.rows += rows
        self.rejected += len(errors)
        self.reasons.update(reason_kind(e["reason"]) for e in errors)

    @property
    def all_rejected(self) -> bool:
        return self.rows > 0 and self.rejected == self.rows

    @property
    def exceeded(self) -> bool:
        return self.rows >= self.check_rows and self.rejected > self.max_fraction * self.rows

    def message(self, where: str) -> str:
        common = "; ".join(f"{reason} ({n})" for reason, n in self.reasons.most_common(3))
        limit = "every row" if self.all_rejected and not self.exceeded else f"more than max_error_fraction " \
                                                                             f"{self.max_fraction:g}"
        return f"{self.rejected} of {self.rows} rows rejected in {where} ({limit}); most common: {common}"


def reason_kind(reason: str) -> str:
    """The reason without its explanation: 'missing class: this class-conditional...' -> 'missing class'."""
    head = reason.split(":", 1)[0]
    hint = reason[reason.find(" (the row's columns"):] if "(the row's columns" in reason else ""
    return (head + hint)[:240]
