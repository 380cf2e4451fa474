"""examples/mnist_mpl.py end to end on small fake MNIST IDX files: every row, a few steps, the
JSON summary, the learning curves, the split manifest and offline wandb runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from support import ROOT, load_script, wandb_log_has

import metapl
from metapl.data import load_manifest
from metapl.data.fake import write_fake_mnist

SCRIPT = ROOT / "examples" / "mnist_mpl.py"

SMALL = [
    "--steps",
    "3",
    "--eval-every",
    "2",
    "--log-every",
    "1",
    "--batch-l",
    "8",
    "--batch-u",
    "8",
    "--val-per-class",
    "2",
    "--channels",
    "4",
]


def load_example():
    return load_script(SCRIPT, "example_mnist_mpl")


@pytest.fixture
def mnist_dir(tmp_path):
    root = tmp_path / "mnist"
    write_fake_mnist(root / "MNIST" / "raw", n_train=160, n_test=30, gz=True)
    return root


def test_every_row(isolated, mnist_dir, capsys, monkeypatch):
    mnist = load_example()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = isolated / "out"
    argv = [
        "--seeds",
        "0",
        "--json",
        "--data-dir",
        str(mnist_dir),
        "--output-dir",
        str(out),
        *SMALL,
    ]
    summary = mnist.main(argv)
    printed = json.loads(capsys.readouterr().out)  # stdout is exactly the JSON
    assert printed == summary
    assert list(printed) == [*mnist.ROWS, "mpl_uda_minus_uda"]
    for row in mnist.ROWS:
        s = printed[row]
        assert len(s["seeds"]) == 1 and 0.0 <= s["seeds"][0] <= 1.0 and s["std"] == 0.0
        assert 0.0 <= s["val"][0] <= 1.0 and s["seconds"][0] > 0
        assert ("teacher" in s) == (row != "supervised")
    diff = printed["mpl_uda"]["seeds"][0] - printed["uda"]["seeds"][0]
    assert printed["mpl_uda_minus_uda"] == [pytest.approx(diff, abs=1e-4)]

    preset = out / "10-labels"
    assert (preset / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((preset / "summary.json").read_text())
    assert record["summary"] == printed and record["config"]["steps"] == 3
    split, meta = load_manifest(preset / "seed0" / "split.json")
    assert len(split.labeled) == 100 and len(meta["val"]) == 20
    assert not np.intersect1d(split.unlabeled, meta["val"]).size
    records = [
        json.loads(line)
        for line in (preset / "seed0" / "mpl_uda" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if "val/teacher" in r] == [2, 3]
    assert not any((isolated / "cwd").iterdir())  # nothing written to the working directory


def test_offline_wandb_run_per_row_and_seed(isolated, mnist_dir, monkeypatch):
    mnist = load_example()
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = isolated / "out"
    mnist.main(
        [
            "--seeds",
            "0",
            "--rows",
            "supervised",
            "mpl_uda",
            "--data-dir",
            str(mnist_dir),
            "--output-dir",
            str(out),
            "--json",
            *SMALL,
        ]
    )
    runs = sorted((out / "10-labels" / "seed0").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2
    for run in runs:  # offline runs keep history and summary in one protobuf log
        assert wandb_log_has(run, b"final/test", b"val/", b"10-labels/")
    assert not any((isolated / "cwd").iterdir())


def test_one_label_preset_table(isolated, mnist_dir, capsys, monkeypatch):
    mnist = load_example()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = isolated / "out"
    summary = mnist.main(
        [
            "--preset",
            "1-label",
            "--seeds",
            "0",
            "1",
            "--rows",
            "supervised",
            "mpl_first_order",
            "--data-dir",
            str(mnist_dir),
            "--output-dir",
            str(out),
            *SMALL,
        ]
    )
    table = capsys.readouterr().out
    assert "MNIST 1-label (10 labels)" in table and "| mpl_first_order |" in table
    assert "mpl_uda_minus_uda" not in summary and len(summary["supervised"]["seeds"]) == 2
    assert len(load_manifest(out / "1-label" / "seed1" / "split.json")[0].labeled) == 10


def test_mpl_knobs_reach_metapl_mpl(isolated, mnist_dir, monkeypatch):
    """--lookahead-steps / --mpl-weight / --log-prob-reduction / --student-bn / --student-view /
    --vat-epsilon go to metapl.MPL (mpl_weight only where there is an MPL term: the uda row has
    none; VAT only with UDA)."""
    mnist = load_example()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    seen = {}

    def spy(*args, **kwargs):
        seen[kwargs["meta_grad"], kwargs["uda"] is not None] = kwargs
        return real(*args, **kwargs)

    real = mnist.metapl.MPL
    monkeypatch.setattr(mnist.metapl, "MPL", spy)
    knobs = [
        "--lookahead-steps",
        "2",
        "--mpl-weight",
        "0.5",
        "--log-prob-reduction",
        "sum",
        "--student-bn",
        "joint",
        "--student-view",
        "strong",
        "--vat-epsilon",
        "1.5",
    ]
    mnist.main(
        [
            "--seeds",
            "0",
            "--rows",
            "uda",
            "mpl_first_order",
            "mpl_uda_first_order",
            "--data-dir",
            str(mnist_dir),
            "--output-dir",
            str(isolated / "out"),
            "--json",
            *SMALL,
            *knobs,
        ]
    )
    fo, uda = seen["first_order", True], seen[None, True]
    assert (fo["lookahead_steps"], fo["mpl_weight"]) == (2, 0.5)
    assert (fo["log_prob_reduction"], fo["student_bn"]) == ("sum", "joint")
    assert uda["lookahead_steps"] == 2 and "mpl_weight" not in uda
    assert fo["student_view"] == "strong" and fo["vat"] == uda["vat"] == metapl.VAT(1.0, 1.5)
    assert seen["first_order", False]["vat"] is None


def test_held_out_labels_feed_the_mpl_signal_only(isolated, mnist_dir, monkeypatch):
    """mpl_labels=held_out: the teacher draws from one half of each class's labels, the MPL
    signal from the other (disjoint images); rows without an MPL term draw from all."""
    mnist = load_example()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    seen = {}
    real_step = mnist.metapl.MPL.step

    def step(self, x_l, y_l, x_u, x_u_strong=None, **kwargs):
        seen.setdefault(self.meta_grad, []).append((x_l, kwargs["mpl_batch"]))
        return real_step(self, x_l, y_l, x_u, x_u_strong, **kwargs)

    monkeypatch.setattr(mnist.metapl.MPL, "step", step)
    monkeypatch.setattr(mnist, "weak", lambda x, gen: x.float() / 255)  # images as stored
    mnist.main(
        [
            "--seeds",
            "0",
            "--rows",
            "uda",
            "mpl_uda",
            "--data-dir",
            str(mnist_dir),
            "--output-dir",
            str(isolated / "out"),
            "--json",
            *SMALL,
            "--labels-per-class",
            "2",
            "--mpl-labels",
            "held_out",
        ]
    )
    assert all(m is None for _, m in seen[None])
    own = {x.numpy().tobytes() for x_l, _ in seen["exact"] for x in x_l}
    held = {x.numpy().tobytes() for _, (x_m, _) in seen["exact"] for x in x_m}
    assert own and held and not own & held
    assert len(own) <= 10 and len(held) <= 10  # one image per class in each half


@pytest.mark.parametrize(
    ("knob", "match"),
    [
        (["--lookahead-steps", "0"], "lookahead_steps must be >= 1"),
        (["--student-bn", "both"], "invalid choice 'both' for argument '--student-bn'"),
        (["--mpl-weight", "-1"], "mpl_weight must be >= 0"),
        (["--student-view", "clean"], "invalid choice 'clean' for argument '--student-view'"),
        (["--vat-epsilon", "0"], "vat_epsilon must be > 0"),
    ],
)
def test_bad_mpl_knob_is_a_one_line_error(isolated, capsys, knob, match):
    with pytest.raises(SystemExit) as exit_info:
        load_example().main([*knob, "--output-dir", str(isolated / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert match in err and "Traceback" not in err


def test_missing_data_names_the_fix(isolated, capsys):
    mnist = load_example()
    with pytest.raises(SystemExit):
        mnist.main(
            [
                "--data-dir",
                str(isolated / "nowhere"),
                "--output-dir",
                str(isolated / "out"),
                "--seeds",
                "0",
            ]
        )
    err = capsys.readouterr().err
    assert "make mnist" in err and err.count("\n") == 1


@pytest.mark.slow  # three fresh Python processes, each importing torch and wandb
def test_jobs_match_sequential_runs(isolated, mnist_dir, monkeypatch):
    """--jobs 2 runs in spawned workers (the script as a command) and gets exactly the
    sequential accuracies: each run seeds its own networks and generators."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    common = [
        "--seeds",
        "0",
        "1",
        "--rows",
        "supervised",
        "mpl_first_order",
        "--data-dir",
        str(mnist_dir),
        "--json",
        *SMALL,
    ]
    sequential = load_example().main([*common, "--output-dir", str(isolated / "a")])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *common, "--jobs", "2", "--output-dir", str(isolated / "b")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    parallel = json.loads(done.stdout)
    for row in ("supervised", "mpl_first_order"):
        assert parallel[row]["seeds"] == sequential[row]["seeds"]
        assert parallel[row]["val"] == sequential[row]["val"]
