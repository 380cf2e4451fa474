"""docs/own_data.md's code runs as written and leaves the run folder it describes."""

import re

from support import ROOT

from metapl.training.tracking import read_metrics

PAGE = ROOT / "docs" / "own_data.md"


def test_own_data_page_runs(tmp_path, monkeypatch, capsys):
    (block,) = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, str(PAGE), "exec"), scope)
    results = scope["results"]
    assert {"val/student_ema", "val/teacher", "test/student_ema", "test/teacher"} == results.keys()
    assert results["test/student_ema"] > 0.5  # 10 classes: far above chance (61% measured)
    out = tmp_path / "runs" / "own_data"
    assert {"checkpoint.pt", "final.pt", "results.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    config, records = read_metrics(out)
    assert config["steps"] == 100 and config["labeled_batch"] == 25
    assert [r["step"] for r in records if "val/teacher" in r] == [25, 50, 75, 100, 100]
    assert capsys.readouterr().err.count("val top-1: teacher") == 4
