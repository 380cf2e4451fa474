"""metapl.training.recipe and metapl.training.cli: the paper examples' recipe, its command line
(every field a flag, the port's spellings as aliases) and the configuration a run records."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from metapl import UDA
from metapl.data import RandAugment
from metapl.training.cli import parse, record, restore
from metapl.training.recipe import (
    Recipe,
    Settings,
    build_mpl,
    build_randaugment,
    train_config,
)


@dataclass(frozen=True)
class Experiment:
    recipe: Recipe = field(default_factory=Recipe)
    settings: Settings = field(default_factory=Settings)


def _parse(*argv: str) -> Experiment:
    return parse(Experiment, ["--data-dir", ".", *argv])


def test_short_runs_keep_a_warm_up_and_a_student_wait():
    assert Recipe().scaled_to(3000).warmup_steps == 50
    r = Recipe().scaled_to(4)
    assert (r.steps, r.warmup_steps, r.student_wait_steps, r.uda_steps) == (4, 1, 1, 1)
    assert Recipe().scaled_to(600_000).warmup_steps == 10_000  # longer runs scale up too
    assert Recipe().scaled_to(300_000) == Recipe()
    assert Recipe(student_wait_steps=0).scaled_to(10).student_wait_steps == 0
    for steps in (1, 2, 3):  # as much as fits: the schedule needs warm-up + wait < steps
        r = Recipe().scaled_to(steps)
        assert r.warmup_steps + r.student_wait_steps < steps and r.warmup_steps == min(1, steps - 1)


def test_short_runs_scale_the_ema_horizon_and_the_finetuning_length():
    r = Recipe().scaled_to(30_000)  # a tenth: EMA horizon 200 -> 20 steps
    assert r.ema_decay == pytest.approx(0.95) and r.finetune_epochs == pytest.approx(62.5)
    assert Recipe().scaled_to(600).ema_decay == 0.0  # a horizon under one step: no EMA
    assert Recipe(ema_decay=0.0).scaled_to(30_000).ema_decay == 0.0
    assert Recipe(finetune_steps=5000).scaled_to(3000).finetune_steps == 50
    assert Recipe(finetune_steps=5000).scaled_to(3).finetune_steps == 1  # at least one
    assert Recipe(finetune_steps=0).scaled_to(3000).finetune_steps == 0
    assert "EMA decay 0.95, finetuning 62.5 epochs" in Recipe().scaled_to(30_000).schedule()


def test_every_recipe_field_is_a_flag():
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
    assert _parse(*argv).recipe == Recipe(**values)


def test_the_ports_command_translates_flag_for_flag():
    """kekmodel/MPL-pytorch's CIFAR-10-4K command, with our script's own flags for what has no
    alias (docs/reproducing.md has the table)."""
    port = (
        "--total-steps 300000 --randaugment-ops 2 --randaugment-magnitude 16 --batch-size 128 "
        "--teacher_lr 0.05 --student_lr 0.05 --weight-decay 5e-4 --ema 0.995 --nesterov --mu 7 "
        "--label-smoothing 0.15 --temperature 0.7 --threshold 0.6 --lambda-u 8 "
        "--warmup-steps 5000 --uda-steps 5000 --student-wait-steps 3000 "
        "--teacher-dropout 0.2 --student-dropout 0.2 --finetune-epochs 625 "
        "--finetune-batch-size 512 --finetune-lr 3e-5 --finetune-weight-decay 0 "
        "--finetune-momentum 0.9 --seed 5 --eval-step 1000"
    )
    exp = _parse(*port.split())
    assert exp.recipe == Recipe()  # the preset is that command
    assert (exp.settings.seed, exp.settings.eval_every) == (5, 1000)
    changed = _parse("--temperature", "0.5", "--lambda-u", "1", "--mu", "3", "--ema", "0").recipe
    assert (changed.uda_temperature, changed.uda_weight) == (0.5, 1.0)
    assert (changed.unlabeled_ratio, changed.ema_decay) == (3, 0.0)


def test_help_shows_every_field_default_and_choice(capsys):
    with pytest.raises(SystemExit):
        _parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--uda-mask-on {sharpened,unsharpened}" in text
    assert "(default: 0.995)" in text and "--ema FLOAT" in text
    for f in dataclasses.fields(Recipe) + dataclasses.fields(Settings):
        assert "--" + f.name.replace("_", "-") in text, f.name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--uda-threshold", "x"], "--uda-threshold: could not convert string to float"),
        (["--student-bn", "both"], "invalid choice 'both' for argument '--student-bn'"),
        (["--ema-decay", "1"], "ema_decay must be in [0, 1)"),
        (["--nope", "1"], "Unrecognized options: --nope"),
        (["--log-every", "0"], "log_every must be >= 1"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(*argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_a_configuration_round_trips_through_its_record():
    exp = _parse("--steps", "7", "--output-dir", "runs/x", "--student-bn", "unlabeled")
    flat = record(exp)
    assert flat["recipe.steps"] == 7 and flat["settings.output_dir"] == "runs/x"
    assert restore(Experiment, flat) == exp
    assert isinstance(restore(Experiment, flat).settings.output_dir, Path)
    with pytest.raises(ValueError, match="has no field 'args'"):
        restore(Experiment, {"args.steps": 3})


def test_finetune_steps_come_from_epochs_over_the_labeled_set():
    s = Settings()
    assert train_config(Recipe(), s, num_labeled=4000).finetune_steps == 5000  # 625 x 8
    assert train_config(Recipe(), s, num_labeled=20).finetune_steps == 625
    assert train_config(Recipe(finetune_steps=3), s, num_labeled=4000).finetune_steps == 3
    assert train_config(Recipe(finetune_epochs=0.5), s, 4000).finetune_steps == 4
    config = train_config(Recipe(labeled_batch=32), Settings(log_every=7, bf16=False), 100)
    assert (config.labeled_batch, config.log_every, config.bf16) == (32, 7, False)


def test_the_recipe_reaches_randaugment_and_mpl():
    """The presets' strong view is the MPL code's RandAugment; every MPL option comes from the
    recipe (ema_decay 0: no EMA student)."""
    assert build_randaugment(Recipe(), 32) == RandAugment.mpl(32, 16.0)
    uniform = build_randaugment(Recipe(randaugment="uniform", randaugment_ops=3), 32)
    assert uniform == RandAugment(3, 16.0, cutout=16)
    imagenet = build_randaugment(Recipe(randaugment_magnitude=17.0), 224, imagenet=True)
    assert (imagenet.magnitude, imagenet.cutout, imagenet.apply_prob) == (17.0, 0, (0.2, 0.8))
    assert imagenet.translate == 100 / 224 and imagenet.cutout_op == 40 / 224

    nets = [torch.nn.Linear(4, 3) for _ in range(2)]
    mpl = build_mpl(*nets, Recipe(), Settings(meta_grad="first_order"))
    c = mpl.config
    assert c.uda == UDA(8.0, 0.7, 0.6, 5000, "sharpened")
    assert (c.student_bn, c.log_prob_reduction, c.label_smoothing) == ("joint", "mean", 0.15)
    assert (c.ema_decay, c.h_baseline_decay, c.pseudo_labels) == (0.995, 0.99, "hard")
    assert c.meta_grad == "score_function"  # the paper's "first_order" is the score function
    recipe = Recipe(
        ema_decay=0.0,
        log_prob_reduction="sum",
        student_bn="unlabeled",
        uda_mask_on="unsharpened",
        pseudo_label_temperature=0.5,
    )
    mpl = build_mpl(*nets, recipe, Settings(uda=False))
    c = mpl.config
    assert c.uda is None and mpl.ema_student is None and c.meta_grad == "exact"
    assert (c.student_bn, c.temperature, c.pseudo_labels) == ("unlabeled", 0.5, "soft")
    recipe = Recipe(student_lr=0.2, warmup_steps=0, student_wait_steps=0)
    s = build_mpl(*nets, recipe, Settings(meta_grad="score_function"))
    assert float(s.config.student_optimizer.lr_at(s.state.student.opt)) == pytest.approx(0.2)
    assert s.config.pseudo_labels == "hard"
