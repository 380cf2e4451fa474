"""examples/ising_mpl.py end to end on a small fake Ising set in the real file format: every
row, a few steps, the JSON summary and its files; the seeded split; the augmentations keep
the lattice's energy (weak) or flip spins as asked (strong); one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from support import ROOT, load_script, wandb_log_has

from metapl.data.fake import write_fake_ising

SCRIPT = ROOT / "examples" / "ising_mpl.py"

SMALL = [
    "--steps",
    "3",
    "--eval-every",
    "2",
    "--log-every",
    "1",
    "--batch-u",
    "8",
    "--channels",
    "4",
]


def load_example():
    return load_script(SCRIPT, "example_ising_mpl")


@pytest.fixture(scope="module")
def ising_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ising")
    write_fake_ising(root, 60)
    return root


def energy(s: torch.Tensor) -> torch.Tensor:
    """Per lattice: minus the sum over nearest-neighbour bonds (periodic), spins [N, 1, L, L]."""
    return -(s * s.roll(1, 2)).sum((1, 2, 3)) - (s * s.roll(1, 3)).sum((1, 2, 3))


def test_every_row(isolated, ising_dir, capsys, monkeypatch):
    ising = load_example()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = isolated / "out"
    argv = ["--seeds", "0", "--json", "--data-dir", str(ising_dir), "--output-dir", str(out)]
    summary = ising.main([*argv, *SMALL])
    printed = json.loads(capsys.readouterr().out)  # stdout is exactly the JSON
    assert printed == summary
    assert list(printed) == [*ising.ROWS, "mpl_uda_minus_uda"]
    for row in ising.ROWS:
        s = printed[row]
        assert len(s["seeds"]) == 1 and 0.0 <= s["seeds"][0] <= 1.0 and s["std"] == 0.0
        assert s["val"] == [None] and s["seconds"][0] > 0
        assert ("teacher" in s) == (row != "supervised")
    record = json.loads((out / "summary.json").read_text())
    assert record["summary"] == printed and record["config"]["steps"] == 3
    assert record["config"]["labeled_per_class"] == 2 and record["config"]["spin_noise"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "seed0" / "mpl_uda" / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, lines) if "test/teacher" in r] == [2, 3]
    assert not any((isolated / "cwd").iterdir())  # nothing written to the working directory


def test_offline_wandb_and_table(isolated, ising_dir, capsys, monkeypatch):
    ising = load_example()
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = isolated / "out"
    argv = ["--rows", "supervised", "--seeds", "0", "1", "--data-dir", str(ising_dir)]
    ising.main([*argv, "--output-dir", str(out), *SMALL])
    table = capsys.readouterr().out
    assert "Ising phases, 4 labels, 3 steps, seeds [0, 1]" in table and "| supervised |" in table
    runs = sorted(out.rglob("offline-run-*"))
    assert len(runs) == 2  # one wandb run per row and seed
    assert all(wandb_log_has(run, b"final/test", b"ising/supervised") for run in runs)


def test_splits_depend_only_on_the_seed():
    ising = load_example()
    y = torch.arange(200) % 2
    x = torch.arange(200.0)[:, None, None, None].expand(200, 1, 16, 16)
    d = ising.Ising(labeled_per_class=3)
    a, b, c = (ising.load_data(d, x, y, seed) for seed in (4, 4, 5))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True) if u is not None)
    assert not torch.equal(a.x_l, c.x_l)
    assert a.y_l.bincount().tolist() == [3, 3] and a.y_test.bincount().tolist() == [30, 30]
    ids = [set(part[:, 0, 0, 0].tolist()) for part in (a.x_l, a.x_u, a.x_test)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert len(ids[0] | ids[1] | ids[2]) == 200


def test_augmentations_follow_the_physics(ising_dir):
    ising = load_example()
    from metapl.data import load_ising

    x, _, _ = load_ising(ising_dir)
    s = x.float() / 127.5 - 1
    weak = ising.weak(s, torch.Generator().manual_seed(0))
    assert torch.equal(energy(weak), energy(s))  # lattice symmetries keep every bond
    assert torch.equal(weak.sum((1, 2, 3)), s.sum((1, 2, 3)))
    assert not torch.equal(weak, s)
    assert torch.equal(weak, ising.weak(s, torch.Generator().manual_seed(0)))
    one = s[-1:].expand(64, 1, 16, 16)  # a random lattice: 16 * 16 * 8 views, drawn per image
    assert len({v.numpy().tobytes() for v in ising.weak(one, torch.Generator())}) >= 60
    flip_only = ising.Ising(spin_noise=0.0)
    strong = ising.strong(flip_only, s, torch.Generator().manual_seed(0))
    assert torch.equal(energy(strong), energy(s))  # s -> -s keeps the energy too
    sign = strong.sum((1, 2, 3)) / s.sum((1, 2, 3))
    assert set(sign[s.sum((1, 2, 3)) != 0].tolist()) == {-1.0, 1.0}
    noisy = ising.Ising(global_flip=False, spin_noise=0.1)
    gen = torch.Generator().manual_seed(0)
    flipped = ising.strong(noisy, s, gen) != ising.weak(s, torch.Generator().manual_seed(0))
    assert 0.05 < flipped.float().mean() < 0.15


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--spin-noise", "1.5"], "spin_noise must be in [0, 1), got 1.5"),
        (["--labeled-per-class", "0"], "labeled_per_class must be >= 1, got 0"),
        (["--labeled-per-class", "30"], "labeled_per_class must be below"),
        (["--data-dir", "nowhere"], "python -m metapl.data.fetch ising nowhere"),
        (["--bogus"], "Unrecognized options: --bogus"),
    ],
)
def test_bad_flag_is_a_one_line_error(isolated, ising_dir, capsys, argv, message):
    ising = load_example()
    with pytest.raises(SystemExit) as exit_info:
        ising.main(["--data-dir", str(ising_dir), *argv, "--output-dir", str(isolated / "out")])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and ": error: " in err and message in err, err
    assert not (isolated / "out").exists()
