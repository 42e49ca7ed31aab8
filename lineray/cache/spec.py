"""Cache policy configuration, validated against the image grid before any tensor exists."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from fractions import Fraction

from pydantic import field_validator
from pydantic.dataclasses import dataclass

from lineray.validation import STRICT, from_data

POLICIES = ("full", "linear", "window", "heavy_hitter")


class CacheConfigError(ValueError):
    """A cache setting that cannot work for this model or grid."""


def parse_fraction(text: str | float | int) -> float:
    """'1/6' -> 0.1666..., '0.25' -> 0.25."""
    if isinstance(text, bool) or not isinstance(text, (str, float, int)):
        raise CacheConfigError(f"rho must be a number or a fraction like 1/6, got {text!r}")
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError) as e:
        raise CacheConfigError(f"rho must be a number or a fraction like 1/6, got {text!r}") from e


def show_fraction(x: float) -> str:
    """How a user wrote it: 0.25 -> '0.25', 7/6 -> '7/6' (not 1.16667)."""
    short = f"{x:g}"
    if float(short) == x:
        return short
    frac = Fraction(x).limit_denominator(1000)
    return f"{frac.numerator}/{frac.denominator}" if float(frac) == x else f"{x:.6g}"


@dataclass(frozen=True, config=STRICT)
class CacheSpec:
    """What the user asks for: `cache: {policy: linear, rho: 1/6}`, or `CacheSpec("linear", rho="1/6")`.

    The visual budget B is a whole number of grid lines, given either as `lines`
    or as `rho` (a fraction of the image tokens, rounded to the nearest line).
    Condition tokens are always kept and never count towards B. The settings are
    checked against a grid by `plan`.
    """
    policy: str = "full"
    rho: float | None = None  # a number or a fraction written as text ("1/6")
    lines: int | None = None
    recent_lines: int | None = None  # R: newest lines always kept (default: 1 linear, B/2 heavy_hitter, B window)
    anchor_lines: int = 0  # first visual lines kept forever, counted in B
    head_aggregate: bool = False  # one selection for all (local) heads of a row instead of one per head
    pool: int = 1  # odd size of the 2D neighbourhood the scores are summed over (1 = none)
    cfg_shared: bool = False  # unconditional CFG rows keep what their conditional row keeps
    # linear: the share of a token's score carried over at each line end. 0 (LineAR as published): only the
    # attention of the line just written counts; 1: all attention since the token was written (H2O's score
    # with LineAR's layout); in between, older lines' attention fades geometrically.
    score_decay: float = 0.0

    @field_validator("rho", mode="before")
    @classmethod
    def _rho_fraction(cls, value):
        return None if value is None else parse_fraction(value)

    @classmethod
    def from_dict(cls, d: dict | None) -> "CacheSpec":
        """From YAML-style data: {"policy": "linear", "rho": "1/6"}."""
        return from_data(cls, d, CacheConfigError, "cache")

    def plan(self, grid_h: int, grid_w: int, image_tokens: int | None = None) -> "CachePlan":
        """Check the settings against an h x w grid and resolve the budget."""
        if self.policy not in POLICIES:
            raise CacheConfigError(f"unknown cache policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if image_tokens is not None and grid_h * grid_w != image_tokens:
            raise CacheConfigError(f"grid {grid_h}x{grid_w} does not match the model's {image_tokens} image tokens")
        if self.policy == "full":
            return CachePlan(self, grid_h, grid_w, budget_lines=grid_h, recent_lines=grid_h, scoring=None)
        if self.rho is not None and self.lines is not None:
            raise CacheConfigError("give the cache budget as rho or as lines, not both")
        if self.lines is not None:
            if self.lines < 1:
                raise CacheConfigError(f"cache lines must be >= 1, got {self.lines}")
            lines = self.lines
        elif self.rho is not None:
            if not 0.0 < self.rho <= 1.0:
                raise CacheConfigError(f"rho must be in (0, 1], got {show_fraction(self.rho)}")
            lines = max(1, math.floor(self.rho * grid_h + 0.5))
        else:
            raise CacheConfigError(f"cache policy {self.policy!r} needs a budget: rho (e.g. 1/6) or lines")
        lines = min(lines, grid_h)
        default_recent = {"linear": 1, "heavy_hitter": max(1, lines // 2), "window": lines - self.anchor_lines}
        recent = self.recent_lines if self.recent_lines is not None else default_recent[self.policy]
        if self.policy == "window" and self.recent_lines is not None and recent + self.anchor_lines != lines:
            raise CacheConfigError("window keeps anchors + the last lines only: recent_lines + anchor_lines must equal the budget")
        if recent < 1:
            raise CacheConfigError(f"recent_lines must be >= 1 (the next line attends to the one above), got {recent}")
        if self.anchor_lines < 0:
            raise CacheConfigError(f"anchor_lines must be >= 0, got {self.anchor_lines}")
        if lines < grid_h and recent + self.anchor_lines > lines:
            raise CacheConfigError(
                f"cache budget of {lines} line(s) is smaller than the protected lines "
                f"({recent} recent + {self.anchor_lines} anchor)")
        if self.pool < 1 or self.pool % 2 == 0:
            raise CacheConfigError(f"pool must be an odd size >= 1, got {self.pool}")
        if not 0.0 <= self.score_decay <= 1.0:
            raise CacheConfigError(f"score_decay must be in [0, 1], got {self.score_decay:g}")
        if self.score_decay and self.policy != "linear":
            raise CacheConfigError(f"score_decay applies to the linear policy (its per-line score), not {self.policy!r}")
        scoring = {"linear": "line", "heavy_hitter": "cumulative", "window": None}[self.policy]
        return CachePlan(self, grid_h, grid_w, budget_lines=lines, recent_lines=recent, scoring=scoring)

    @property
    def label(self) -> str:
        """The policy's name in tables: 'linear', or 'linear decay 0.5' for a non-default score_decay."""
        return self.policy if not self.score_decay else f"{self.policy} decay {self.score_decay:g}"

    def with_overrides(self, **kw) -> "CacheSpec":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """A validated spec bound to a grid: everything the cache needs to size itself."""
    spec: CacheSpec
    grid_h: int
    grid_w: int
    budget_lines: int
    recent_lines: int
    scoring: str | None  # None, "line" (reset every line: LineAR) or "cumulative" (H2O)

    @property
    def image_tokens(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def budget(self) -> int:
        return self.budget_lines * self.grid_w

    @property
    def evicts(self) -> bool:
        return self.budget_lines < self.grid_h

    @property
    def visual_capacity(self) -> int:
        """Visual slots per (row, head): the budget plus the line being generated."""
        return min(self.image_tokens, self.budget + self.grid_w)

    def describe(self) -> str:
        if not self.evicts:
            return self.spec.policy if self.spec.policy == "full" else f"{self.spec.policy} (budget covers the image)"
        return f"{self.spec.label} {self.budget_lines}/{self.grid_h} lines ({self.budget} tokens)"
