"""metapl.training.bounds: the range checks behind the examples' one-line errors."""

import math
from dataclasses import dataclass

import pytest

from metapl.training.bounds import check_bounds, within


@pytest.mark.parametrize(
    ("value", "bound", "inside"),
    [
        (1, ">= 1", True),
        (0, ">= 1", False),
        (0.0, "> 0", False),
        (1e-9, "> 0", True),
        (0.0, "in [0, 1)", True),
        (1.0, "in [0, 1)", False),
        (1.0, "in [0, 1]", True),
        (0.0, "in (0, 1)", False),
        (0.5, "in (0, 1)", True),
        (2, "< 2", False),
        (2, "<= 2", True),
        (math.nan, "> 0", False),
        (math.nan, "in [0, 1]", False),
    ],
)
def test_within(value, bound, inside):
    assert within(value, bound) is inside


def test_check_bounds_names_the_first_field_out_of_range():
    @dataclass
    class Cfg:
        steps: int = 0
        lr: float = -1.0

    with pytest.raises(ValueError, match=r"^steps must be >= 1, got 0$"):
        check_bounds(Cfg(), {"steps": ">= 1", "lr": "> 0"})
    check_bounds(Cfg(steps=3, lr=0.1), {"steps": ">= 1", "lr": "> 0"})
