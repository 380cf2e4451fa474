"""metapl.training.recipe: the examples' shared command-line plumbing."""

import argparse
import dataclasses
from dataclasses import dataclass

import pytest
import torch

from metapl import UDA
from metapl.data import RandAugment
from metapl.training.recipe import (
    Recipe,
    add_common_args,
    build_mpl,
    build_randaugment,
    recipe_from_args,
    set_fields,
    train_config,
)


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
    [
        ("nope=1", "KEY one of"),
        ("lr", "KEY one of"),
        ("steps=2.5", "expected a int"),
        ("flip=0", "expected a bool"),
        ("hidden=64", "expected a tuple"),
    ],
)
def test_set_fields_rejects_unknown_keys_and_wrong_types(item, match):
    with pytest.raises(ValueError, match=match):
        set_fields(_Config(), [item])


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_common_args(p, {"a": Recipe(), "b": Recipe(teacher_lr=0.1)})
    return p.parse_args(["--data-dir", ".", *argv])


def test_steps_shrink_the_schedule():
    recipe = recipe_from_args(Recipe(), _args("--steps", "3000", "--labeled-batch", "32"))
    assert (recipe.steps, recipe.labeled_batch) == (3000, 32)
    assert (recipe.warmup_steps, recipe.student_wait_steps, recipe.uda_steps) == (50, 30, 50)


def test_short_runs_keep_a_warm_up_and_a_student_wait():
    recipe = recipe_from_args(Recipe(), _args("--steps", "4"))
    assert recipe.steps == 4
    assert (recipe.warmup_steps, recipe.student_wait_steps, recipe.uda_steps) == (1, 1, 1)
    assert Recipe().scaled_to(600_000).warmup_steps == 10_000  # longer runs scale up too
    assert Recipe().scaled_to(300_000) == Recipe()
    assert Recipe(student_wait_steps=0).scaled_to(10).student_wait_steps == 0
    for steps in (1, 2, 3):  # as much as fits: the schedule needs warm-up + wait < steps
        r = Recipe().scaled_to(steps)
        assert r.warmup_steps + r.student_wait_steps < steps and r.warmup_steps == min(1, steps - 1)


def test_every_recipe_field_is_a_flag_and_named_flags_win_over_set():
    values = {
        "steps": 7,
        "labeled_batch": 3,
        "unlabeled_ratio": 2,
        "teacher_lr": 0.3,
        "student_lr": 0.4,
        "momentum": 0.5,
        "nesterov": False,
        "weight_decay": 0.01,
        "warmup_steps": 2,
        "student_wait_steps": 1,
        "teacher_dropout": 0.1,
        "student_dropout": 0.3,
        "ema_decay": 0.9,
        "label_smoothing": 0.05,
        "pseudo_label_temperature": 0.5,
        "uda_weight": 2.0,
        "uda_temperature": 0.4,
        "uda_threshold": 0.8,
        "uda_steps": 3,
        "uda_mask_on": "unsharpened",
        "h_baseline_decay": 0.5,
        "log_prob_reduction": "sum",
        "student_bn": "unlabeled",
        "randaugment": "uniform",
        "randaugment_ops": 3,
        "randaugment_magnitude": 9.0,
        "finetune_epochs": 2.0,
        "finetune_steps": 11,
        "finetune_batch": 64,
        "finetune_lr": 0.01,
        "finetune_weight_decay": 0.001,
        "finetune_momentum": 0.5,
        "finetune_label_smoothing": 0.0,
        "finetune_augment": "weak",
    }
    assert set(values) == {f.name for f in dataclasses.fields(Recipe)}
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        argv += [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    assert recipe_from_args(Recipe(), _args(*argv)) == Recipe(**values)
    both = _args("--set", "uda_weight=3", "--set", "teacher_lr=0.2", "--teacher-lr", "0.7")
    recipe = recipe_from_args(Recipe(), both)
    assert (recipe.uda_weight, recipe.teacher_lr) == (3.0, 0.7)
    assert recipe_from_args(Recipe(), _args("--lr", "0.2")).student_lr == 0.2


def test_the_ports_command_translates_flag_for_flag():
    """kekmodel/MPL-pytorch's CIFAR-10-4K command, with our script's own flags for what has no
    alias (docs/reproducing.md has the table)."""
    port = (
        "--total-steps 300000 --randaug 2 16 --batch-size 128 --teacher_lr 0.05 "
        "--student_lr 0.05 --weight-decay 5e-4 --ema 0.995 --nesterov --mu 7 "
        "--label-smoothing 0.15 --temperature 0.7 --threshold 0.6 --lambda-u 8 "
        "--warmup-steps 5000 --uda-steps 5000 --student-wait-steps 3000 "
        "--teacher-dropout 0.2 --student-dropout 0.2 --finetune-epochs 625 "
        "--finetune-batch-size 512 --finetune-lr 3e-5 --finetune-weight-decay 0 "
        "--finetune-momentum 0.9 --seed 5 --eval-step 1000"
    )
    args = _args(*port.split())
    assert recipe_from_args(Recipe(), args) == Recipe()  # the preset is that command
    assert (args.seed, args.eval_every) == (5, 1000)
    changed = recipe_from_args(
        Recipe(), _args("--temperature", "0.5", "--lambda-u", "1", "--mu", "3", "--ema", "0")
    )
    assert (changed.uda_temperature, changed.uda_weight) == (0.5, 1.0)
    assert (changed.unlabeled_ratio, changed.ema_decay) == (3, 0.0)


def test_help_shows_every_default_and_choice(capsys):
    p = argparse.ArgumentParser()
    add_common_args(p, {"a": Recipe(), "b": Recipe(teacher_lr=0.1)})
    p.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "--uda-mask-on {sharpened,unsharpened}" in text
    assert "(default: a 0.05, b 0.1)" in text  # the presets differ
    assert "(default: 0.995)" in text and "--ema EMA_DECAY" in text
    for f in dataclasses.fields(Recipe):
        assert "--" + f.name.replace("_", "-") in text


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--uda-threshold", "x"], None),
        (["--set", "student_bn=both"], "--student-bn must be one"),
        (["--ema-decay", "1"], "--ema-decay must be in"),
        (["--set", "nope=1"], "KEY one of"),
    ],
)
def test_bad_values_name_their_flag(argv, match):
    if match is None:  # argparse's own type check
        with pytest.raises(SystemExit):
            _args(*argv)
        return
    with pytest.raises(ValueError, match=match):
        recipe_from_args(Recipe(), _args(*argv))


def test_finetune_steps_come_from_epochs_over_the_labeled_set():
    args = _args()
    assert train_config(Recipe(), args, num_labeled=4000).finetune_steps == 5000  # 625 x 8
    assert train_config(Recipe(), args, num_labeled=20).finetune_steps == 625
    assert train_config(Recipe(finetune_steps=3), args, num_labeled=4000).finetune_steps == 3
    assert train_config(Recipe(finetune_epochs=0.5), args, 4000).finetune_steps == 4


def test_the_recipe_reaches_randaugment_and_mpl():
    """The presets' strong view is the MPL code's RandAugment; every MPL option comes from the
    recipe (ema_decay 0: no EMA student)."""
    assert build_randaugment(Recipe(), 32) == RandAugment.mpl(32, 16.0)
    uniform = build_randaugment(Recipe(randaugment="uniform", randaugment_ops=3), 32)
    assert uniform == RandAugment(3, 16.0, cutout=16)
    imagenet = build_randaugment(Recipe(randaugment_magnitude=17.0), 224, imagenet=True)
    assert (imagenet.magnitude, imagenet.cutout, imagenet.apply_prob) == (17.0, 0, (0.2, 0.8))
    assert imagenet.translate == 100 / 224 and imagenet.cutout_op == 40 / 224

    args = _args("--meta-grad", "first_order")
    nets = [torch.nn.Linear(4, 3) for _ in range(2)]
    mpl = build_mpl(*nets, Recipe(), args)
    assert mpl.uda == UDA(8.0, 0.7, 0.6, 5000, "sharpened")
    assert (mpl.student_bn, mpl.log_prob_reduction, mpl.label_smoothing) == ("joint", "mean", 0.15)
    assert (mpl.ema_decay, mpl.h_baseline_decay, mpl.pseudo_labels) == (0.995, 0.99, "hard")
    recipe = Recipe(
        ema_decay=0.0,
        log_prob_reduction="sum",
        student_bn="unlabeled",
        uda_mask_on="unsharpened",
        pseudo_label_temperature=0.5,
    )
    mpl = build_mpl(*nets, recipe, _args("--no-uda"))
    assert mpl.uda is None and mpl.ema_student is None and mpl.meta_grad == "exact"
    assert (mpl.student_bn, mpl.temperature) == ("unlabeled", 0.5)
    s = build_mpl(*nets, Recipe(student_lr=0.2, warmup_steps=0, student_wait_steps=0), args)
    assert float(s.student_optimizer.lr_at(s.student_state)) == pytest.approx(0.2)
