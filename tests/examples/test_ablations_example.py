"""examples/ablations.py: a grid of tiny runs, one wandb group, a summary table."""

import json

import pytest
from support import ROOT, TINY_PAPER, load_script

from metapl.data.fake import write_fake_cifar
from metapl.training import plot
from metapl.training.rundir import RunError

SCRIPT = ROOT / "examples" / "ablations.py"


def test_grid_runs_every_cell_and_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_fake_cifar(tmp_path / "data", n_train=100, n_test=20)
    ablations = load_script(SCRIPT, "ablations")
    out = tmp_path / "grid"
    argv = [
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(out),
        "--meta-grads",
        "none",
        "first_order",
        "--uda",
        "off",
        "on",
        "--seeds",
        "0",
        "1",
        "--wandb-project",
        "test",
        "--json",
        "--",
        *TINY_PAPER,
        "--steps",
        "2",
        "--finetune-steps",
        "0",
        "--log-every",
        "1",
    ]
    summary = ablations.main(argv)
    assert set(summary) == {
        "none/uda-off",
        "none/uda-on",
        "first_order/uda-off",
        "first_order/uda-on",
    }
    for cell in summary.values():
        assert len(cell["seeds"]) == 2 and 0 <= cell["mean"] <= 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    runs = list(out.glob("*/seed*/wandb/offline-run-*"))
    assert len(runs) == 8  # one offline wandb run per cell and seed, all under the grid folder
    assert (out / "none-uda-on" / "seed1" / "metrics.jsonl").exists()
    grid = plot.panels(plot.load_runs(sorted(out.glob("*/seed*"))))  # the grid, overlaid
    (accuracy,) = [p for p in grid if p.title == "accuracy"]
    assert {s.label.split(": ")[0] for s in accuracy.series} == {
        f"{m}-uda-{u}/seed{k}"
        for m in ("none", "first_order")
        for u in ("off", "on")
        for k in (0, 1)
    }
    assert ablations.table({"a": {"mean": 0.5, "std": 0.0, "seeds": [0.5]}}).endswith(
        "| a | 50.00 | 1 |"
    )  # one seed: no spread

    # The grid again: refused as it stands (its runs exist); with --resume, the same summary.
    with pytest.raises(RunError, match="already holds a run"):
        ablations.main(argv)
    assert ablations.main(["--resume", *argv]) == summary
