"""Learning curves of one or more runs from their ``metrics.jsonl``.

    python -m metapl.training.plot RUN_DIR [RUN_DIR ...] [--output FILE_OR_DIR]

One panel per quantity: accuracies (``val/*``, ``test/*``), each loss term (every metric whose
name holds ``loss``), MPL's ``h`` (``mpl/h``, ``mpl/h_baseline``), the meta-gradient norm
(``mpl/grad_rms_logits``: the root mean square over the examples of the MPL term's
per-example gradient with respect to the teacher's logits), the
learning rates (``*/lr``), the finetuning (``finetune/*``), then one panel for each other
metric. The finetuning, logged at the steps after the training's, has its own axis counted
from the end of the training; values logged after the training (the final test accuracies)
are drawn at its last step. Several runs are overlaid, each in one colour in every panel,
labelled by their folders (e.g. every cell and seed of ``examples/ablations.py``'s grid), the
legend beside each panel. Constant curves (two or more points, all equal) other than
accuracies are left out, and so are panels left without data. Losses and learning rates
spanning a decade or more have a log scale.

``--panels NAME...`` keeps only those panels, by file name (``accuracy``, ``teacher_loss``,
``h``, ``meta_grad_norm``, ``lr``, ``finetune``, ...). ``--output`` ending in ``.png``: one
figure with every panel. Any other path: a folder with one PNG per panel. Default:
``curves.png`` in the run folder (in the runs' common parent folder for several runs). Needs
matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metapl.training.tracking import read_metrics

__all__ = ["Panel", "Series", "cli", "figure", "load_runs", "main", "panels", "save"]


@dataclass
class Series:
    label: str  # "run" or "run: metric"
    steps: list[int]
    values: list[float]


@dataclass
class Panel:
    title: str
    name: str  # file name stem when each panel is its own PNG
    series: list[Series] = field(default_factory=list)
    xlabel: str = "step"
    log: bool = False  # log scale when the values are positive and span a decade or more


FINETUNE = "finetune/"


def _is_loss(key: str) -> bool:
    return "loss" in key.split("/")[-1]


# (title, file name, does a metric belong here?) in drawing order; a loss panel per loss term.
GROUPS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("accuracy", "accuracy", lambda k: k.startswith(("val/", "test/"))),
    (
        "h (MPL: change of the student's labeled loss)",
        "h",
        lambda k: k in ("mpl/h", "mpl/h_baseline"),
    ),
    (
        "meta-gradient norm (teacher logits)",
        "meta_grad_norm",
        lambda k: k == "mpl/grad_rms_logits",
    ),
    ("learning rate", "lr", lambda k: k.split("/")[-1] == "lr"),
    ("finetuning", "finetune", lambda k: k.startswith(FINETUNE)),
]


def load_runs(paths: Sequence[str | os.PathLike]) -> dict[str, list[dict[str, float]]]:
    """``{label: records}`` for run folders (or ``metrics.jsonl`` files); labels are the paths
    relative to the runs' common parent folder. ValueError for a run without records."""
    files = [Path(p) / "metrics.jsonl" if Path(p).is_dir() else Path(p) for p in paths]
    folders = [f.parent.resolve() for f in files]
    parent = _common_parent(folders)
    runs = {}
    for path, folder in zip(paths, folders, strict=True):
        _, records = read_metrics(path)
        if not records:
            raise ValueError(f"{path} has no logged steps yet")
        label = str(folder.relative_to(parent)) if len(folders) > 1 else folder.name
        runs[label] = records
    return runs


def _common_parent(folders: list[Path]) -> Path:
    parent = Path(os.path.commonpath(folders))
    return parent.parent if len(folders) > 1 and parent in folders else parent


def panels(runs: dict[str, list[dict[str, float]]]) -> list[Panel]:
    """The panels and the curves each holds, from ``load_runs``'s records. A curve is one
    metric of one run, its label ``run`` (or ``run: metric`` where a panel has several metrics),
    its points the steps that logged a finite value of it: ``finetune/*`` metrics at their
    finetuning step (the step less the run's training steps), other metrics at most at the
    last training step. Constant curves (but accuracies) and panels left without curves are
    left out."""
    keys = sorted({k for records in runs.values() for r in records for k in r} - {"step"})
    groups = [(title, name, [k for k in keys if belongs(k)]) for title, name, belongs in GROUPS]
    grouped = {k for _, _, members in groups for k in members}
    single = [(key, re.sub(r"\W+", "_", key), [key]) for key in keys if key not in grouped]
    losses = [g for g in single if _is_loss(g[0])]
    groups = groups[:1] + losses + groups[1:] + [g for g in single if g not in losses]
    trained = {run: _training_steps(records) for run, records in runs.items()}
    out = []
    for title, name, members in groups:
        finetuning = name == "finetune"
        panel = Panel(
            title,
            name,
            xlabel="finetuning step" if finetuning else "step",
            log=name == "lr" or all(_is_loss(k) for k in members),
        )
        for run, records in runs.items():
            end = trained[run]
            for key in members:
                points = [
                    (r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])
                ]
                # a flat accuracy still compares runs (one stuck at chance); other flat curves
                # tell nothing
                flat = name != "accuracy" and _constant([v for _, v in points])
                if points and not flat:
                    label = run if len(members) == 1 else f"{run}: {key}"
                    steps = [s - end if finetuning else min(s, end) for s, _ in points]
                    panel.series.append(Series(label, steps, [v for _, v in points]))
        if panel.series:
            out.append(panel)
    return out


def _training_steps(records: list[dict[str, float]]) -> int:
    """The run's training steps: the last step logged before its finetuning (``finetune/*``
    metrics, logged at the steps after the training's), the last step logged without one."""
    finetune = [r["step"] for r in records if any(k.startswith(FINETUNE) for k in r)]
    first = min(finetune, default=math.inf)
    return max((r["step"] for r in records if r["step"] < first), default=0)


def _constant(values: list[float]) -> bool:
    """Two or more values, all equal up to float rounding: a curve that tells nothing."""
    return len(values) > 1 and all(math.isclose(v, values[0], abs_tol=1e-12) for v in values)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(panel_list: Sequence[Panel], runs: Sequence[str] | None = None):
    """A matplotlib Figure with one axes per panel (3 columns), each with a legend beside it.
    ``runs``: every run in colour order, so that each keeps its colour in figures of other
    panels (default: the runs of these panels)."""
    plt = _pyplot()
    runs = _runs(panel_list) if runs is None else runs
    colors = _colors(plt, runs)
    cols = min(3, len(panel_list))
    rows = math.ceil(len(panel_list) / cols)
    # each grid column as wide as a plot and the widest legend in it
    legends = [_legend_width(p) for p in panel_list]
    width = sum(4.0 + max(legends[c::cols]) for c in range(cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(width, 3.0 * rows), squeeze=False, layout="constrained"
    )
    for ax, panel in zip(axes.flat, panel_list, strict=False):
        _draw(ax, panel, colors)
    for ax in list(axes.flat)[len(panel_list) :]:
        ax.set_visible(False)
    return fig


def _runs(panel_list: Sequence[Panel]) -> list[str]:
    """The panels' runs, in the order they first come."""
    return list(dict.fromkeys(s.label.partition(": ")[0] for p in panel_list for s in p.series))


def _colors(plt, runs: Sequence[str]) -> dict[str, tuple]:
    """A distinct colour per run: tab10, tab20 beyond 10 runs, a rainbow beyond 20."""
    n = len(runs)
    if n <= 20:
        cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
        return {run: cmap(i) for i, run in enumerate(runs)}
    cmap = plt.get_cmap("turbo")
    return {run: cmap(i / (n - 1)) for i, run in enumerate(runs)}


LEGEND_ROWS = 14  # entries per legend column: as tall as a panel at font size 6


def _legend_columns(panel: Panel) -> int:
    return math.ceil(len(panel.series) / LEGEND_ROWS)


def _legend_width(panel: Panel) -> float:
    """The width of the panel's legend in inches (about 0.04 per character at font size 6)."""
    return _legend_columns(panel) * (0.4 + 0.04 * max(len(s.label) for s in panel.series))


def _draw(ax, panel: Panel, colors: dict) -> None:
    styles = ["-", "--", ":", "-."]
    metrics = list(dict.fromkeys(s.label.partition(": ")[2] for s in panel.series))
    for s in panel.series:
        run, _, metric = s.label.partition(": ")
        single = len(s.steps) == 1  # e.g. the final test accuracy
        ax.plot(
            s.steps,
            s.values,
            styles[metrics.index(metric) % 4],
            color=colors[run],
            marker="o" if single else None,
            markersize=4,
            label=s.label,
        )
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(panel.xlabel, fontsize=8)
    ax.tick_params(which="both", labelsize=7)
    low = min(min(s.values) for s in panel.series)
    high = max(max(s.values) for s in panel.series)
    if panel.log and low > 0 and high >= 10 * low:  # under a decade: plain linear ticks
        ax.set_yscale("log")
    # beside the axes: a legend inside could cover the curves, and the title when it is taller
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=_legend_columns(panel))


def save(
    panel_list: Sequence[Panel], output: str | os.PathLike, runs: Sequence[str] | None = None
) -> list[Path]:
    """Write the panels: one figure at ``output`` if it ends in ``.png``, else one PNG per
    panel in the folder ``output``, each run in the same colour in all. ``runs``: as for
    ``figure``. Returns the files written."""
    plt = _pyplot()
    output = Path(output)
    runs = _runs(panel_list) if runs is None else runs
    if output.suffix.lower() == ".png":
        jobs = [(output, list(panel_list))]
    else:
        jobs = [(output / f"{p.name}.png", [p]) for p in panel_list]
    for path, group in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = figure(group, runs)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return [path for path, _ in jobs]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m metapl.training.plot",
        description="Learning curves of one or more runs from their metrics.jsonl.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run folders holding metrics.jsonl (or the files themselves)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="a .png file (one figure), or a folder (one PNG per panel); "
        "default: curves.png in the run folder or the runs' common parent",
    )
    parser.add_argument(
        "--panels",
        nargs="+",
        metavar="NAME",
        help="only these panels, by file name: accuracy, teacher_loss, h, "
        "meta_grad_norm, lr, finetune, ... (default: all)",
    )
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    panel_list = panels(runs)
    if not panel_list:
        raise ValueError("nothing to draw: every curve of these runs is constant")
    if args.panels:
        names = [p.name for p in panel_list]
        unknown = [n for n in args.panels if n not in names]
        if unknown:
            raise ValueError(
                f"no panel {', '.join(unknown)} in these runs; they have {', '.join(names)}"
            )
        panel_list = [p for name in args.panels for p in panel_list if p.name == name]
    output = args.output
    if output is None:
        folders = [(p if p.is_dir() else p.parent).resolve() for p in args.runs]
        output = _common_parent(folders) / "curves.png"
    written = save(panel_list, output, list(runs))
    print("\n".join(map(str, written)))
    return written


def cli(argv: list[str] | None = None) -> int:
    """``main`` as a command: bad input prints one ``error:`` line and returns 1."""
    try:
        main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
