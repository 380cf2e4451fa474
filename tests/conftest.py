"""Fixtures shared by the test folders (core/, data/, training/, examples/). The helpers
beside this file (reference.py, support.py) are importable from every folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metapl.data.fake import write_fake_cifar  # noqa: E402 (after the path)


@pytest.fixture(autouse=True, scope="session")
def image_check_cache(tmp_path_factory):
    """metapl.data.check's cache in a folder of the test session, not the user's home (and
    inherited by the scripts the tests run)."""
    import os

    os.environ["METAPL_CACHE"] = str(tmp_path_factory.mktemp("metapl-cache"))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty working directory, and every wandb directory inside tmp_path (no API key, no
    output from wandb)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A fake CIFAR-10 in its real on-disk format (100 training and 20 test images), one per
    test module; read only."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, n_train=100, n_test=20)
    return root
