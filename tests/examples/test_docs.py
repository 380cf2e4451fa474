"""Every ```python block of README.md and docs/*.md runs as written: a page's blocks in order,
in one namespace, in a scratch folder. (README.md and docs/own_data.md have tests of their own
that also check what the code leaves behind.)"""

import re
from pathlib import Path

import pytest
import torch
from support import ROOT

PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if "```python" in p.read_text())
OWN_TESTS = {"own_data.md"}  # tests/examples/test_own_data_doc.py


def blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.name not in OWN_TESTS], ids=lambda p: p.name
)
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scope = {}
        for block in blocks(page):
            exec(compile(block, str(page), "exec"), scope)
    finally:
        torch.set_num_threads(threads)


def test_every_page_with_code_is_run():
    assert {p.name for p in PAGES} >= {
        "meta_gradients.md",
        "maml.md",
        "examples_meta.md",
        "mpl.md",
        "own_data.md",
    }
