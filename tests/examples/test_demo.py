"""`make demo` prints the tables the README shows (timings aside)."""

import os
import platform
import re
import subprocess
import sys

import pytest
from support import EXAMPLES, ROOT

# The demo pins x86-64 kernels (the Makefile's DEMO_ENV); the README's tables come from them.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 kernels"),
]
MAKEFILE = (ROOT / "Makefile").read_text().replace("\\\n", " ")


def _demo_command(target: str = "demo") -> list[list[str]]:
    """The Makefile's demo recipe: one argument list per script it runs."""
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", MAKEFILE, flags=re.M).group(1)
    return [line.split("$(BIN)/python", 1)[1].split() for line in recipe.splitlines()]


def _demo_env() -> dict[str, str]:
    """The Makefile's DEMO_ENV (the pinned CPU kernels) over this process's environment."""
    assignments = re.search(r"^DEMO_ENV := (.*)$", MAKEFILE, flags=re.M).group(1).split()
    return {**os.environ, **dict(a.split("=", 1) for a in assignments), "WANDB_MODE": "disabled"}


def _tables(text: str) -> list[list[list[str]]]:
    """Each markdown table as rows of stripped cells, its timing column ("s / run") dropped."""
    tables, rows = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                rows.append(cells)
        elif rows:
            timing = rows[0].index("s / run") if "s / run" in rows[0] else None
            tables.append([r[:timing] for r in rows] if timing is not None else rows)
            rows = []
    return tables


def test_the_demo_pins_the_cpu_kernels():
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=_demo_env()
    )
    assert run.stdout.strip() == "AVX2", run.stderr[-2000:]


def test_the_readme_shows_what_make_demo_prints(tmp_path):
    printed = ""
    for args in _demo_command():
        script, *flags = args
        flags = [str(tmp_path / f) if f.startswith("runs/") else f for f in flags]
        assert (EXAMPLES / script.removeprefix("examples/")).exists()
        run = subprocess.run(
            [sys.executable, str(ROOT / script), *flags],
            capture_output=True,
            text=True,
            env=_demo_env(),
            cwd=ROOT,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        printed += run.stdout
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### What `make demo` printed", 1)[1].split("\n## ", 1)[0]
    assert _tables(printed) and _tables(printed) == _tables(section)
