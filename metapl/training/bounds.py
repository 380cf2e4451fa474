"""Range checks for the numeric fields of an example's configuration dataclass.

    check_bounds(cfg, {"steps": ">= 1", "lr": "> 0", "decay": "in [0, 1)"})

raises ValueError naming the first field out of range, e.g. ``steps must be >= 1, got -1``, so
a command line can print it as one line instead of failing deep inside training.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

__all__ = ["check_bounds", "within"]

_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def within(value: float, bound: str) -> bool:
    """Whether ``value`` satisfies ``bound``: ``">= 1"``, ``"> 0"``, ``"< 1"``, or an interval
    ``"in [0, 1)"`` (square brackets closed, round ones open)."""
    if bound.startswith("in "):
        interval = bound[3:].strip()
        low, high = (float(v) for v in interval[1:-1].split(","))
        above = value >= low if interval[0] == "[" else value > low
        below = value <= high if interval[-1] == "]" else value < high
        return above and below
    op, _, limit = bound.partition(" ")
    return _COMPARE[op](value, float(limit))


def check_bounds(config: Any, bounds: Mapping[str, str]) -> None:
    """ValueError for the first field of ``config`` (an object with these attributes) whose
    value is outside its bound (see ``within``)."""
    for name, bound in bounds.items():
        value = getattr(config, name)
        if not within(value, bound):
            raise ValueError(f"{name} must be {bound}, got {value}")
