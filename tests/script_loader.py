"""Import an example or benchmark script by its path, as the tests need it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """The script at ``path`` imported as module ``name`` and registered in ``sys.modules``
    (a dataclass looks its module up there). Its folder joins ``sys.path``, as when the script
    runs, so that it finds its family's helpers (``examples/_digits.py``)."""
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
