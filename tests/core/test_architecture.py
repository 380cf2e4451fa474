"""The layers of docs/architecture.md, checked on the source: what each part of the package may
import. The core (meta-gradients, optimizers, tree and functional helpers, the MPL algorithm)
imports nothing of the application layer (metapl.training), of the collectives
(metapl.distributed) or of command-line and logging tools; nobody outside a module reaches into
its private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

PACKAGE = ROOT / "metapl"

CORE = ("metapl/__init__.py", "metapl/_tree.py", "metapl/optim.py", "metapl/functional.py",
        "metapl/finetune.py", "metapl/metagrad/", "metapl/mpl/",
        "metapl/vat.py")  # fmt: skip
DATA = ("metapl/data/", "metapl/models/")
APPLICATION_ONLY = ("metapl.training", "metapl.distributed", "argparse", "tyro", "wandb", "tqdm")
TOOLS_IN_DATA = ("metapl.training", "metapl.distributed", "tyro", "wandb")


def _module_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import statement in the file (``from a import b`` gives
    ``("a", ["b"])``, ``import a.b`` gives ``("a.b", [])``); relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CORE):
        return "core"
    if any(rel.startswith(p) for p in DATA):
        return "data"
    return "other"


def _violations() -> list[str]:
    problems = []
    for path in _module_files():
        layer = _layer(path)
        banned = {"core": APPLICATION_ONLY, "data": TOOLS_IN_DATA}.get(layer, ())
        for module, names in _imports(path):
            full = [module] + [f"{module}.{n}" for n in names]
            for name in full:
                if any(name == b or name.startswith(b + ".") for b in banned):
                    problems.append(f"{path.relative_to(ROOT)} ({layer}) imports {name}")
            if layer == "core" and any(
                name.startswith(("metapl.data", "metapl.models")) for name in full
            ):
                problems.append(f"{path.relative_to(ROOT)} (core) imports {module}")
    return problems


def test_the_core_imports_nothing_of_the_application():
    assert _violations() == []


def _private_imports(files: list[Path]) -> list[str]:
    """Imports of a private name (``_x``) of another metapl module, or of a private metapl
    module from outside the package that owns it (``metapl._tree`` is the core's)."""
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for module, names in _imports(path):
            if not module.startswith("metapl"):
                continue
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if _layer(path) == "core":  # the core's own helpers are the core's to use
                private = [n for n in private if n != "_tree"]
            if private:
                problems.append(f"{rel} imports {private} from {module}")
            touches_tree = module == "metapl._tree" or (module == "metapl" and "_tree" in names)
            if touches_tree and _layer(path) != "core":
                problems.append(f"{rel} imports metapl._tree (the core's own helpers)")
    return problems


def test_no_module_reaches_into_another_ones_private_names():
    files = _module_files() + sorted((ROOT / "examples").glob("*.py"))
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    assert _private_imports(files) == []


@pytest.mark.parametrize("module", ["metapl", "metapl.optim", "metapl.metagrad"])
def test_importing_the_core_loads_no_application_tool(module):
    code = (
        f"import sys, torch; before = set(sys.modules); import {module}; "
        "new = set(sys.modules) - before; "
        "print(sorted(m for m in new if m.split('.')[0] in ('wandb', 'tyro', 'tqdm', 'sympy') "
        "or m.startswith(('torch._dynamo', 'torch.distributed.nn', 'metapl.training', "
        "'metapl.distributed'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_layers_in_the_docs_are_the_ones_checked():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for part in ("metapl/metagrad/", "metapl/training/", "metapl/distributed.py", "tests/"):
        assert part in text
