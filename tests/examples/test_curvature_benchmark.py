"""benchmarks/curvature.py: every forward row agrees with reverse before it is timed, and each
table has its six rows (three per curvature)."""

import pytest
from support import ROOT, load_script


@pytest.mark.slow
def test_quick_tables(capsys):
    bench = load_script(ROOT / "benchmarks" / "curvature.py", "curvature")
    bench.main(["--quick", "--steps", "2", "--warmup", "0"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| reverse", "| forward"))]
    assert len(rows) == 6 + 2  # the transformer's six, the MPL step's two
    assert "| forward, checkpoint=True |" in out and "| reverse, compile=True |" in out
    assert "nan" not in out.lower()
