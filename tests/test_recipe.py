"""metapl.recipe: the examples' shared command-line plumbing."""

import argparse
from dataclasses import dataclass

import pytest

from metapl.recipe import Recipe, override, set_fields


@dataclass(frozen=True)
class _Config:
    lr: float = 0.1
    steps: int = 10
    hidden: tuple = (64, 64)
    flip: bool = True
    name: str = "moons"


def test_set_fields_parses_each_field_as_its_type():
    cfg = set_fields(_Config(), ["lr=1", "steps=20", "hidden=(8, 8, 8)", "flip=False", "name=x=y"])
    assert cfg == _Config(lr=1.0, steps=20, hidden=(8, 8, 8), flip=False, name="x=y")
    assert isinstance(cfg.lr, float)


@pytest.mark.parametrize(
    ("item", "match"),
    [("nope=1", "KEY one of"), ("lr", "KEY one of"), ("steps=2.5", "expected a int"),
     ("flip=0", "expected a bool"), ("hidden=64", "expected a tuple")],
)  # fmt: skip
def test_set_fields_rejects_unknown_keys_and_wrong_types(item, match):
    with pytest.raises(ValueError, match=match):
        set_fields(_Config(), [item])


def test_override_shrinks_the_schedule_with_the_steps():
    args = argparse.Namespace(lr=None, labeled_batch=32, unlabeled_ratio=None,
                              finetune_steps=None, steps=3000)  # fmt: skip
    recipe = override(Recipe(), args)
    assert (recipe.steps, recipe.labeled_batch) == (3000, 32)
    assert (recipe.warmup_steps, recipe.student_wait_steps, recipe.uda_steps) == (50, 30, 50)


def test_short_runs_keep_a_warm_up_and_a_student_wait():
    args = argparse.Namespace(lr=None, labeled_batch=None, unlabeled_ratio=None,
                              finetune_steps=None, steps=4)  # fmt: skip
    recipe = override(Recipe(), args)
    assert recipe.steps == 4
    assert (recipe.warmup_steps, recipe.student_wait_steps, recipe.uda_steps) == (1, 1, 1)
    assert Recipe().scaled_to(600_000).warmup_steps == 10_000  # longer runs scale up too
    assert Recipe().scaled_to(300_000) == Recipe()
    assert Recipe(student_wait_steps=0).scaled_to(10).student_wait_steps == 0
    for steps in (1, 2, 3):  # as much as fits: the schedule needs warm-up + wait < steps
        r = Recipe().scaled_to(steps)
        assert r.warmup_steps + r.student_wait_steps < steps and r.warmup_steps == min(1, steps - 1)
