"""python -m metapl.training.plot: learning curves from metrics.jsonl files written here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from metapl.training import plot
from metapl.training.tracking import Tracker

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, scale: float) -> dict[int, dict[str, float]]:
    """A run as train() logs it: step metrics, evaluations, a final test point."""
    tracker = Tracker(folder, config={"scale": scale})
    logged = {}
    for step in (2, 4, 6):
        m = {
            "teacher/loss": scale / step,
            "student/loss_l": 2 * scale / step,
            "mpl/h": scale * (step - 4),
            "mpl/h_baseline": 0.1 * step,
            "mpl/grad_rms_logits": scale * step,
            "teacher/lr": 0.1 / step,
            "student/lr": 0.2 / step,
            "images_per_s": 100.0 * step,
        }
        tracker.log(m, step=step)
        logged[step] = m
        if step % 4 == 2:
            tracker.log({"val/teacher": 0.1 * step, "val/student": scale * 0.05 * step}, step=step)
    tracker.log({"test/student": 0.5 * scale, "teacher/loss": float("nan")}, step=6)
    tracker.finish()
    return logged


def series(panel_list, title) -> dict[str, tuple[list, list]]:
    (panel,) = [p for p in panel_list if p.title == title]
    return {s.label: (s.steps, s.values) for s in panel.series}


def test_panels_hold_every_runs_curves(tmp_path):
    a, b = write_run(tmp_path / "grid" / "exact", 1.0), write_run(tmp_path / "grid" / "none", 2.0)
    runs = plot.load_runs([tmp_path / "grid" / "exact", tmp_path / "grid" / "none"])
    panel_list = plot.panels(runs)
    assert [p.title for p in panel_list] == [
        "accuracy",
        "student/loss_l",
        "teacher/loss",
        "h (MPL: change of the student's labeled loss)",
        "meta-gradient norm (teacher logits)",
        "learning rate",
        "images_per_s",
    ]
    for run, logged in (("exact", a), ("none", b)):
        scale = 1.0 if run == "exact" else 2.0
        assert series(panel_list, "accuracy")[f"{run}: val/student"] == (
            [2, 6],
            [scale * 0.05 * 2, scale * 0.05 * 6],
        )
        assert series(panel_list, "accuracy")[f"{run}: test/student"] == ([6], [0.5 * scale])
        # the NaN logged with the test point is left out of the curve
        assert series(panel_list, "teacher/loss")[run] == (
            [2, 4, 6],
            [logged[s]["teacher/loss"] for s in (2, 4, 6)],
        )
        h = series(panel_list, "h (MPL: change of the student's labeled loss)")
        assert h[f"{run}: mpl/h"] == ([2, 4, 6], [-2 * scale, 0.0, 2 * scale])
        lr = series(panel_list, "learning rate")
        assert lr[f"{run}: student/lr"][1] == [logged[s]["student/lr"] for s in (2, 4, 6)]


def test_the_figure_draws_the_panels_data_with_legends(tmp_path):
    write_run(tmp_path / "a", 1.0)
    write_run(tmp_path / "b", 2.0)
    panel_list = plot.panels(plot.load_runs([tmp_path / "a", tmp_path / "b"]))
    fig = plot.figure(panel_list)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(panel_list)
    for ax, panel in zip(axes, panel_list, strict=True):
        assert ax.get_title() == panel.title
        lines = {
            line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()
        }
        assert lines == {s.label: (s.steps, s.values) for s in panel.series}
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == [s.label for s in panel.series]


def test_command_writes_one_figure_or_one_png_per_panel(tmp_path):
    write_run(tmp_path / "grid" / "x" / "seed0", 1.0)
    write_run(tmp_path / "grid" / "y" / "seed0", 2.0)
    runs = [str(tmp_path / "grid" / c / "seed0") for c in "xy"]
    (default,) = plot.main(runs)
    assert default == tmp_path / "grid" / "curves.png"  # the runs' common parent
    assert default.read_bytes()[:8] == PNG
    written = plot.main([*runs, "--output", str(tmp_path / "panels")])
    assert [p.name for p in written] == [
        "accuracy.png",
        "student_loss_l.png",
        "teacher_loss.png",
        "h.png",
        "meta_grad_norm.png",
        "lr.png",
        "images_per_s.png",
    ]
    assert all(p.read_bytes()[:8] == PNG for p in written)
    (some,) = plot.main([*runs, "--panels", "h", "accuracy", "--output", str(tmp_path / "s.png")])
    assert some.read_bytes()[:8] == PNG
    (one,) = plot.main([runs[0]])
    assert one == tmp_path / "grid" / "x" / "seed0" / "curves.png" and one.stat().st_size > 0


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "error: no metrics file at "),
        (lambda d: (d / "metrics.jsonl").write_text('{"config": {}}\n'), "has no logged steps"),
        (
            lambda d: (d / "metrics.jsonl").write_text('{"step": 1, "a": 1}\nnot json\n{}\n'),
            "line 2, is not JSON",
        ),
        (lambda d: (d / "metrics.jsonl").write_text("[1, 2]\n"), "not a metapl metrics record"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    run.mkdir()
    setup(run)
    assert plot.cli([str(run)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


def test_an_unknown_panel_is_one_line_error(tmp_path, capsys):
    write_run(tmp_path, 1.0)
    assert plot.cli([str(tmp_path), "--panels", "accuracy", "loss"]) == 1
    out, err = capsys.readouterr()
    assert (
        out == ""
        and err.count("\n") == 1
        and "no panel loss in these runs; they have accuracy, student_loss_l, teacher_loss, h,"
        in err
    ), err


def test_the_module_runs_as_a_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "metapl.training.plot", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: no metrics file at ") and proc.stderr.count("\n") == 1


def test_a_line_cut_short_by_a_kill_is_ignored(tmp_path):
    write_run(tmp_path, 1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "teacher/lo')
    runs = plot.load_runs([tmp_path])
    assert max(r["step"] for r in runs[tmp_path.name]) == 6
