"""benchmarks/wrn_step.py prints a table on the CPU without NaN (peak memory: n/a, with why)."""

import pytest
from support import ROOT, load_script

PATH = ROOT / "benchmarks" / "wrn_step.py"


@pytest.mark.slow
def test_cpu_table_says_what_it_cannot_measure(capsys):
    bench = load_script(PATH, "wrn_step")
    bench.main(
        [
            "--device",
            "cpu",
            "--labeled-batch",
            "2",
            "--unlabeled-ratio",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-compile",
        ]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if " | eager | " in line]
    assert len(rows) == 3 and all(row.split(" | ")[5] == "n/a" for row in rows)
    assert "nan" not in out.lower() and "peak resident memory of this process" in out
    assert 0 < bench._peak_rss_gib() < 64
