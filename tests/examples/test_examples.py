"""The examples run end to end on a tiny budget, print the promised JSON and write their outputs
(the figure; wandb files only under the output directory)."""

from __future__ import annotations

import json

import pytest
import torch
from support import load_example, wandb_log_has

from metapl.training.tracking import read_metrics


def test_two_moons(isolated, capsys):
    two_moons = load_example("two_moons")
    out = isolated / "out"
    accs = two_moons.main(["--steps", "5", "--seed", "0", "--json", "--output-dir", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == accs
    assert list(printed) == ["supervised", "pseudo_label", "mpl", "uda", "mpl_uda"]
    assert all(0.0 <= acc <= 1.0 for acc in printed.values())
    figure = out / "two_moons_seed0.png"
    assert figure.stat().st_size > 10_000
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any((isolated / "cwd").iterdir())


def check_summary(summary: dict, rows: list[str], n_seeds: int) -> None:
    assert [row for row in summary if row != "mpl_uda_minus_uda"] == rows
    for row in rows:
        assert {"mean", "std", "seeds", "val", "seconds"} <= set(summary[row])
        assert len(summary[row]["seeds"]) == len(summary[row]["seconds"]) == n_seeds
        assert all(0.0 <= a <= 1.0 for a in summary[row]["seeds"])
        assert 0.0 <= summary[row]["mean"] <= 1.0 and summary[row]["std"] >= 0.0


def test_digits_mpl_offline_wandb(isolated, capsys, monkeypatch):
    digits = load_example("digits_mpl")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = isolated / "out"
    argv = [
        "--steps",
        "3",
        "--seeds",
        "0",
        "--json",
        "--output-dir",
        str(out),
        "--log-every",
        "2",
        "--eval-every",
        "2",
    ]
    summary = digits.main(argv)
    printed = json.loads(capsys.readouterr().out)  # stdout is exactly the JSON
    assert printed == summary
    check_summary(printed, list(digits.ROWS), n_seeds=1)
    assert json.loads((out / "summary.json").read_text())["summary"] == summary
    assert (out / "curves.png").stat().st_size > 0
    runs = sorted(out.rglob("offline-run-*"))
    assert len(runs) == len(digits.ROWS)  # one wandb run per row and seed
    for run in runs:  # offline runs keep history and summary in one protobuf log
        assert wandb_log_has(run, b"final/test", b"test/")
    for row in digits.ROWS:  # and each run's metrics.jsonl, with its config first
        config, records = read_metrics(out / "seed0" / row)
        assert config["row"] == row and config["steps"] == 3
        assert [r["step"] for r in records] == [2, 2, 3, 3]
        reported = "test/model" if row == "supervised" else "test/student"
        assert reported in records[1] and reported in records[3]
    assert not any((isolated / "cwd").iterdir())  # nothing written to the working directory


def test_digits_mpl_knobs_reach_metapl_mpl(isolated, monkeypatch, capsys):
    digits = load_example("digits_mpl")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    seen = {}

    def spy(*args, **kwargs):
        seen[kwargs["meta_grad"]] = kwargs
        return real(*args, **kwargs)

    real = digits.metapl.MPL
    monkeypatch.setattr(digits.metapl, "MPL", spy)
    digits.main(
        [
            "--steps",
            "2",
            "--seeds",
            "0",
            "--rows",
            "uda",
            "mpl_uda",
            "--json",
            "--output-dir",
            str(isolated / "out"),
            "--lookahead-steps",
            "3",
            "--mpl-weight",
            "2.0",
        ]
    )
    assert (seen["exact"]["lookahead_steps"], seen["exact"]["mpl_weight"]) == (3, 2.0)
    assert seen[None]["lookahead_steps"] == 3 and "mpl_weight" not in seen[None]
    with pytest.raises(SystemExit):
        digits.main(["--mpl-weight", "-1", "--output-dir", str(isolated / "out")])
    assert "mpl_weight must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("mpl_labels", ["held_out", "resampled"])
def test_digits_mpl_labels_for_the_mpl_signal(isolated, monkeypatch, capsys, mpl_labels):
    """mpl_labels=held_out: the teacher's batch holds one half of each class's labels, the MPL
    signal's batch the other half; resampled: every label in both, other weak views; rows
    without an MPL term keep every label and no MPL batch."""
    digits = load_example("digits_mpl")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    seen = {}
    real_step = digits.metapl.MPL.step

    def step(self, x_l, y_l, x_u, x_u_strong=None, **kwargs):
        seen.setdefault(self.meta_grad, (y_l.bincount(minlength=10), kwargs["mpl_batch"]))
        return real_step(self, x_l, y_l, x_u, x_u_strong, **kwargs)

    monkeypatch.setattr(digits.metapl.MPL, "step", step)
    digits.main(
        [
            "--steps",
            "2",
            "--seeds",
            "0",
            "--rows",
            "uda",
            "mpl_uda",
            "--json",
            "--labeled-per-class",
            "3",
            "--output-dir",
            str(isolated / "out"),
            "--mpl-labels",
            mpl_labels,
        ]
    )
    own, mpl_batch = seen["exact"]
    if mpl_labels == "held_out":
        assert own.tolist() == [2] * 10 and mpl_batch[1].bincount().tolist() == [1] * 10
    else:
        assert own.tolist() == mpl_batch[1].bincount().tolist() == [3] * 10
    all_labels, none = seen[None]
    assert all_labels.tolist() == [3] * 10 and none is None
    with pytest.raises(SystemExit):
        digits.main(
            [
                "--labeled-per-class",
                "1",
                "--mpl-labels",
                "held_out",
                "--output-dir",
                str(isolated / "out"),
            ]
        )
    assert "at least 2 labels per class" in capsys.readouterr().err


def test_digits_mpl_disabled_wandb(isolated, capsys, monkeypatch):
    digits = load_example("digits_mpl")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = isolated / "out"
    rows = ["supervised", "mpl_uda_first_order"]
    summary = digits.main(
        ["--steps", "2", "--seeds", "0", "1", "--rows", *rows, "--json", "--output-dir", str(out)]
    )
    check_summary(json.loads(capsys.readouterr().out), rows, n_seeds=2)
    assert summary[rows[0]]["std"] >= 0.0
    digits.main(["--steps", "2", "--seeds", "0", "--rows", *rows, "--output-dir", str(out)])
    assert "±" not in capsys.readouterr().out  # one seed: no spread
    assert not (out / "wandb").exists()
    assert not any((isolated / "cwd").iterdir())


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("two_moons", ["--steps", "-1"], "steps must be >= 1, got -1"),
        ("two_moons", ["--steps", "0"], "steps must be >= 1, got 0"),
        ("two_moons", ["--seed", "-3"], "seed must be in [0, 2**32), got -3"),
        ("two_moons", ["--lr-student", "0.0"], "lr_student must be > 0, got 0.0"),
        ("two_moons", ["--batch-u", "0"], "batch_u must be >= 1, got 0"),
        ("two_moons", ["--labeled-per-class", "1000"], "must be below n_per_class (1000)"),
        ("two_moons", ["--uda-threshold", "1.5"], "uda_threshold must be in [0, 1], got 1.5"),
        ("two_moons", ["--meta-grad", "second"], "invalid choice 'second' for argument '--meta-gr"),
        ("two_moons", ["--steps", "x"], "--steps: invalid literal for int()"),
        ("two_moons", ["--preset", "big"], "--preset must be one of ['default', 'small']"),
        ("digits_mpl", ["--steps", "0"], "steps must be >= 1, got 0"),
        ("digits_mpl", ["--seeds", "0", "-1"], "seeds must be distinct and in [0, 2**32)"),
        ("digits_mpl", ["--labeled-per-class", "0"], "labeled_per_class must be >= 1, got 0"),
        ("digits_mpl", ["--labeled-per-class", "500"], "labeled_per_class must be below 122"),
        ("digits_mpl", ["--ema-decay", "1.0"], "ema_decay must be in [0, 1), got 1.0"),
        ("digits_mpl", ["--log-every", "0"], "log_every must be >= 1, got 0"),
        ("digits_mpl", ["--lr-teacher", "-0.5"], "lr_teacher must be > 0, got -0.5"),
        ("digits_mpl", ["--bogus"], "Unrecognized options: --bogus"),
    ],
)
def test_invalid_numbers_are_one_line_errors(isolated, capsys, script, argv, message):
    example = load_example(script)
    with pytest.raises(SystemExit) as exit_info:
        example.main([*argv, "--output-dir", str(isolated / "out")])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and ": error: " in err and message in err, err
    assert not (isolated / "out").exists() and not any((isolated / "cwd").iterdir())


def test_split_labels_halves_each_class():
    split_labels = load_example("_digits").split_labels
    y = torch.tensor([3, 0, 3, 0, 3, 1, 1, 0, 3])  # class 3: 4 labels, 0: 3, 1: 2
    own, held = split_labels(y)
    assert sorted(own.tolist() + held.tolist()) == list(range(len(y)))  # a partition
    assert y[own].bincount(minlength=4).tolist() == [2, 1, 0, 2]  # ceil(n_c / 2)
    assert y[held].bincount(minlength=4).tolist() == [1, 1, 0, 2]
    with pytest.raises(ValueError, match="class 2 has 1: use more labels per class"):
        split_labels(torch.tensor([0, 0, 2]))
