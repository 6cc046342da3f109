"""Allowed ranges of numeric settings: one table checks a `TrainConfig` and parses the CLI's options.

``Range(1)`` is an integer >= 1; ``Range(0.0, 1.0, low_open=True, integer=False)`` a number in
(0, 1]. NaN is never in range; infinity only where ``high`` is None and ``finite`` is False.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """``low <= x <= high`` (strict where ``*_open``), None for no bound; integers unless ``integer=False``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = True
    finite: bool = True

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return kind

    def contains(self, x: float) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
            return False
        if self.integer and not isinstance(x, int):
            return False
        if math.isinf(x) and (self.finite or self.high is not None):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))

    def check(self, name: str, x: float) -> None:
        """Raise ``ValueError`` naming ``name`` unless ``x`` is in range."""
        if not self.contains(x):
            raise ValueError(f"{name} must be {self.describe()}, got {x!r}")

    def parser(self) -> Callable[[str], float]:
        """An argparse ``type=``: the option's text parsed and range-checked, or a one-line error."""

        def parse(text: str) -> float:
            try:
                x: float = int(text) if self.integer else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
            if not self.contains(x):
                raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text}")
            return x

        parse.__name__ = "integer" if self.integer else "number"
        return parse
