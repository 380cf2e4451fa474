"""python -m metapl.training.plot: learning curves from metrics.jsonl files written here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_hex
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
        (
            lambda d: (d / "metrics.jsonl").write_text(
                '{"step": 1, "a": 1}\n{"step": 2, "a": 1}\n'
            ),
            "nothing to draw: every curve of these runs is constant",
        ),
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


def write_records(folder: Path, records: dict[int, dict[str, float]]) -> Path:
    """A run logging ``{step: metrics}``, in step order."""
    tracker = Tracker(folder, config={})
    for step, metrics in sorted(records.items()):
        tracker.log(metrics, step=step)
    tracker.finish()
    return folder


def drawn_colors(fig) -> dict[str, set]:
    """``{run: colours}`` of every line and marker in ``fig``."""
    colors: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            run = line.get_label().partition(": ")[0]
            colors.setdefault(run, set()).add(to_hex(line.get_color()))
            if line.get_marker() not in (None, "None", ""):
                colors[run].add(to_hex(line.get_markerfacecolor()))
                colors[run].add(to_hex(line.get_markeredgecolor()))
    return colors


def test_legends_cover_no_title_nor_other_panel(tmp_path):
    for k in range(6):  # 18 accuracy curves: a legend taller than its panel
        write_run(tmp_path / f"run{k}", 1.0 + k)
    fig = plot.figure(plot.panels(plot.load_runs(sorted(tmp_path.iterdir()))))
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    for ax in axes:
        legend = ax.get_legend().get_window_extent()
        for other in axes:
            assert not legend.overlaps(other.title.get_window_extent()), other.get_title()
            if other is not ax:
                assert not legend.overlaps(other.get_window_extent()), other.get_title()
        assert fig.bbox.contains(legend.x1 - 1, legend.y0 + 1)  # inside the figure


def test_each_run_keeps_one_colour_in_every_panel_and_file(tmp_path, monkeypatch):
    paths = [tmp_path / f"run{k:02}" for k in range(12)]
    for k, path in enumerate(paths):
        write_run(path, 1.0 + k)
    # only this run logs uda_weight: alone in that panel's file, it keeps its colour there
    extra = {2: {"teacher/loss": 1.0, "uda_weight": 0.0}, 4: {"uda_weight": 1.0}}
    paths.append(write_records(tmp_path / "extra", extra))
    colors = drawn_colors(plot.figure(plot.panels(plot.load_runs(paths))))
    assert len(colors) == 13 and all(len(c) == 1 for c in colors.values()), colors
    assert len(set.union(*colors.values())) == 13  # no two runs share a colour
    original, per_file = plot.figure, {}

    def recording(group, *args):
        fig = original(group, *args)
        per_file[group[0].name] = drawn_colors(fig)
        return fig

    monkeypatch.setattr(plot, "figure", recording)
    plot.main([*map(str, paths), "--output", str(tmp_path / "panels")])
    assert per_file["uda_weight"] == {"extra": colors["extra"]}
    for drawn in per_file.values():
        assert drawn == {run: colors[run] for run in drawn}


def test_finetuning_has_its_own_axis_from_the_end_of_training(tmp_path):
    runs = []
    for name, steps in (("long", 6), ("short", 4)):
        records = {
            s: {"teacher/loss": 1.0 / s, "val/student": 0.1 * s} for s in (2, 4, 6)[: steps // 2]
        }
        for k in (1, 2, 3, 4):  # finetuning, logged at the steps after the training's
            records[steps + k] = {"finetune/loss": 1.0 / k}
        records[steps + 4].update({"test/student": 0.9, "val/student_before_finetune": 0.5})
        runs.append(write_records(tmp_path / name, records))
    panel_list = plot.panels(plot.load_runs(runs))
    assert "finetune/loss" not in [p.title for p in panel_list]
    assert series(panel_list, "finetuning") == {
        "long": ([1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25]),
        "short": ([1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25]),
    }
    accuracy = series(panel_list, "accuracy")  # the final test point ends the training axis
    assert accuracy["long: test/student"] == ([6], [0.9])
    assert accuracy["short: test/student"] == ([4], [0.9])
    assert accuracy["short: val/student_before_finetune"] == ([4], [0.5])
    fig = plot.figure(panel_list)
    (ax,) = [ax for ax in fig.axes if ax.get_title() == "finetuning"]
    assert ax.get_xlabel() == "finetuning step"
    assert min(min(line.get_xdata()) for line in ax.get_lines()) == 1
    for ax in fig.axes:
        if ax.get_visible() and ax.get_title() != "finetuning":
            assert max(max(line.get_xdata()) for line in ax.get_lines()) <= 6


def test_constant_curves_and_emptied_panels_are_left_out(tmp_path):
    flat = {
        s: {"teacher/loss": 1.0 / s, "uda_weight": 1.0, "mpl/h": 0.1 * s, "mpl/h_baseline": 0.3}
        for s in (2, 4, 6)
    }
    flat[4]["mpl/h_baseline"] = 0.1 + 0.2  # 0.30000000000000004: equal up to rounding
    flat[6]["test/student"] = 0.7  # one point: kept
    varying = {s: {"teacher/loss": 2.0 / s, "mpl/h_baseline": 0.1 * s} for s in (2, 4, 6)}
    runs = [write_records(tmp_path / "flat", flat), write_records(tmp_path / "varying", varying)]
    panel_list = plot.panels(plot.load_runs(runs))
    assert [p.title for p in panel_list] == [
        "accuracy",
        "teacher/loss",
        "h (MPL: change of the student's labeled loss)",
    ]
    assert series(panel_list, "accuracy") == {"flat": ([6], [0.7])}
    assert list(series(panel_list, "h (MPL: change of the student's labeled loss)")) == [
        "flat: mpl/h",
        "varying: mpl/h_baseline",
    ]


def test_a_log_panel_under_a_decade_has_plain_tick_labels(tmp_path):
    records = {
        s: {"teacher/loss": 1.1 + 0.02 * s, "student/loss_l": 10.0 / s**3} for s in (1, 2, 4)
    }
    fig = plot.figure(plot.panels(plot.load_runs([write_records(tmp_path / "run", records)])))
    fig.canvas.draw()
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert axes["student/loss_l"].get_yscale() == "log"  # 64x: a log scale still
    labels = [
        t.get_text() for t in axes["teacher/loss"].get_yticklabels(which="both") if t.get_text()
    ]
    assert labels and not any("x10" in t or "times" in t or "10^" in t for t in labels), labels
    assert all(float(t.replace("\u2212", "-").strip("$")) > 0 for t in labels), labels
