"""benchmarks/mpl_vs_uda.py: the paired study's bookkeeping on a few steps of digits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import mpl_vs_uda  # noqa: E402


def test_study_table_resume_and_docs(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.md"
    other = f"{mpl_vs_uda.begin('OTHER')}\nother kernels' table\n{mpl_vs_uda.END}\n"
    here = f"{mpl_vs_uda.begin(mpl_vs_uda.cpu_kernels())}\nold table\n{mpl_vs_uda.END}\n"
    doc.write_text(f"before\n{other}{here}after\n")
    argv = ["--cells", "digits-2", "--arms", "uda", "paired", "--seeds", "0", "1"]
    argv += ["--steps", "3", "--jobs", "1", "--output-dir", str(tmp_path / "out")]
    results = mpl_vs_uda.main([*argv, "--write-docs", str(doc)])
    cell = results["digits-2"]
    assert set(cell) == {"uda", "paired"} and cell["uda"]["seeds"] == [0, 1]
    assert cell["uda"]["kernels"] == cell["paired"]["kernels"] == mpl_vs_uda.cpu_kernels()
    diffs = [
        100 * (a - b) for a, b in zip(cell["paired"]["test"], cell["uda"]["test"], strict=True)
    ]
    row = next(line for line in capsys.readouterr().out.splitlines() if "mpl_dropout" in line)
    assert ", ".join(f"{d:+.2f}" for d in diffs) in row
    text = doc.read_text()
    assert text.startswith(f"before\n{other}") and text.endswith(f"{mpl_vs_uda.END}\nafter\n")
    assert "old table" not in text and row in text
    assert f"on torch's {mpl_vs_uda.cpu_kernels()} CPU kernels." in text
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results

    def no_training(*args):
        raise AssertionError("a finished arm trained again")

    monkeypatch.setattr(mpl_vs_uda, "train", no_training)
    assert mpl_vs_uda.main(argv) == results  # the rerun reuses every arm


@pytest.mark.parametrize("recorded", [{"kernels": "AVX2"}, {}])
def test_runs_on_other_kernels_are_not_paired(tmp_path, monkeypatch, recorded):
    monkeypatch.setattr(mpl_vs_uda, "cpu_kernels", lambda: "AVX512")
    (tmp_path / "results.json").write_text(
        json.dumps({"digits-2": {"uda": {"seeds": [0], "test": [0.9], "seconds": 1, **recorded}}})
    )

    def no_training(*args):
        raise AssertionError("trained beside runs on other kernels")

    monkeypatch.setattr(mpl_vs_uda, "train", no_training)
    argv = ["--cells", "digits-2", "--arms", "uda", "paired", "--seeds", "0"]
    with pytest.raises(SystemExit, match=r"on (AVX2|unrecorded) CPU kernels .* are AVX512: pass"):
        mpl_vs_uda.main([*argv, "--output-dir", str(tmp_path)])


def test_a_doc_without_this_kernels_table_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(mpl_vs_uda, "cpu_kernels", lambda: "AVX2")
    doc = tmp_path / "doc.md"
    doc.write_text(f"{mpl_vs_uda.begin('AVX512')}\ntable\n{mpl_vs_uda.END}\n")
    with pytest.raises(SystemExit, match="no table for AVX2 kernels"):
        mpl_vs_uda.write_docs(doc, ["| row |"], 60.0)

    def no_training(*args):
        raise AssertionError("trained for a doc it cannot write")

    monkeypatch.setattr(mpl_vs_uda, "train", no_training)
    argv = ["--cells", "digits-2", "--seeds", "0", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="no table for AVX2 kernels"):
        mpl_vs_uda.main([*argv, "--write-docs", str(doc)])
    assert doc.read_text() == f"{mpl_vs_uda.begin('AVX512')}\ntable\n{mpl_vs_uda.END}\n"


def test_interval_and_verdict():
    mean, std, low, high = mpl_vs_uda.interval([2.0, 3.0, 4.0])
    assert (mean, std) == (3.0, 1.0)
    assert high - mean == pytest.approx(4.302653 / 3**0.5, rel=1e-6)  # t(0.975, 2 dof)
    assert mpl_vs_uda.verdict(low, high) == "**better**"
    assert mpl_vs_uda.verdict(-3.0, -0.1) == "**worse**"
    assert mpl_vs_uda.verdict(-1.0, 1.0) == "within noise"
