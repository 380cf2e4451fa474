"""benchmarks/compare.py: metapl's smallest cell here (fast), every peer's smallest cells in the
benchmark environment of `make bench-env` (slow), each checked against metapl's gradient."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from support import BENCHMARKS, ROOT, load_script

QUICK = ["--quick", "--repeats", "1", "--min-repeats", "1", "--block", "1", "--warmup", "0"]


def _outputs(tmp_path) -> list[str]:
    return ["--out", str(tmp_path), "--figure", str(tmp_path / "compare.png")]


def test_metapl_smallest_cell_is_timed_and_reported(tmp_path, capsys):
    compare = load_script(BENCHMARKS / "compare.py", "compare")
    cells = compare.main([*QUICK, "--rows", "maml-1", "--peers", "metapl", *_outputs(tmp_path)])
    assert [(c.row, c.peer) for c in cells] == [("maml-1", "metapl")]
    assert cells[0].median_s > 0 and cells[0].peak_bytes > 0 and cells[0].calls == 1
    record = json.loads((tmp_path / "compare.json").read_text())
    assert record["cells"][0]["median_s"] == cells[0].median_s and record["machine"]["torch"]
    table = (tmp_path / "compare.md").read_text()
    assert "| MAML sinusoid, 1 task, K=5 | metapl |" in table and "| 1.00 |" in table
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "- cpu:" in capsys.readouterr().out
    again = tmp_path / "again"  # --replot: the same table from the JSON, nothing measured
    compare.main(["--replot", str(tmp_path / "compare.json"), *_outputs(again)])
    assert (again / "compare.md").read_text() == table and (again / "compare.png").exists()


def test_ratios_are_to_the_fastest_and_the_least_memory_of_each_row():
    """... and no memory ratio in a row whose least peak is under a MiB (allocator noise)."""
    compare = load_script(BENCHMARKS / "compare.py", "compare")
    mib = 2**20
    cells = [
        compare.Cell("a", "metapl", median_s=2.0, min_s=1.5, peak_bytes=2 * mib),
        compare.Cell("a", "higher", median_s=1.0, min_s=0.5, peak_bytes=8 * mib),
        compare.Cell("a", "betty", note="cannot"),
        compare.Cell("b", "metapl", median_s=3.0, min_s=2.5, peak_bytes=mib // 2),
    ]
    r = compare.ratios(cells)
    assert r[("a", "metapl")] == (2.0, 1.0) and r[("a", "higher")] == (1.0, 4.0)
    assert r[("b", "metapl")][0] == 1.0 and math.isnan(r[("b", "metapl")][1])
    assert ("a", "betty") not in r
    table = compare.markdown(cells, {"a": "row a", "b": "row b"})
    assert "| row b | metapl | 3000.0 | 1.00 | 2500.0 | 0.5 | – |" in table
    assert "- row a / betty: cannot" in table


def _bench_python() -> str:
    """The benchmark environment's interpreter, built by `make bench-env` when missing."""
    python = ROOT / ".bench-venv" / "bin" / "python"
    if not (ROOT / ".bench-venv" / ".installed").exists():
        out = subprocess.run(
            ["make", "bench-env", f"PYTHON={sys.executable}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no message"])[-1]
            pytest.skip(f"`make bench-env` failed, so the peers cannot run: {last}")
    return str(python)


@pytest.mark.slow
def test_every_peer_gives_metapls_gradient_on_the_smallest_cells(tmp_path):
    out = subprocess.run(
        [_bench_python(), str(BENCHMARKS / "compare.py"), *QUICK, *_outputs(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cells = json.loads((tmp_path / "compare.json").read_text())["cells"]
    measured = {(c["row"], c["peer"]) for c in cells if c["median_s"] is not None}
    for peer in ("higher", "torchopt"):
        assert {row for row, p in measured if p == peer} >= {"maml-1", "mwn", "mpl", "gpt-adam"}
    assert ("imaml", "betty") in measured and ("imaml", "torchopt") in measured
    assert ("lr-400", "metapl forward") in measured and ("gpt-sgd", "metapl forward") in measured
    # every measured peer passed the gradient check (a failed check leaves the cell untimed)
    assert all(c["note"] == "" for c in cells if c["median_s"] is not None)
    differs = [c for c in cells if "gradient differs" in c["note"]]
    assert differs == []
    learn2learn = [c["note"] for c in cells if c["peer"] == "learn2learn"]
    assert learn2learn and all("import learn2learn" in note for note in learn2learn)
