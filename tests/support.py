"""What tests in every folder share: the repository's paths, loading a script by its path,
the tiny command line of the paper examples, reading wandb's offline logs, MNIST's IDX files."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"

# The smallest split and batches of examples/cifar_mpl.py (and ablations, faults): 2 labels and 2
# validation images per class, batches of 4 labeled and 8 unlabeled images
TINY_DATA = [
    "--labels-per-class",
    "2",
    "--val-per-class",
    "2",
    "--labeled-batch",
    "4",
    "--unlabeled-ratio",
    "2",
]
# ... with an MLP at small learning rates: the smallest run that still trains
TINY_PAPER = ["--model", "mlp", "--teacher-lr", "1e-3", "--student-lr", "1e-3", *TINY_DATA]


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


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as module ``example_<name>``."""
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


def wandb_log_has(run_dir: Path, *needles: bytes, timeout: float = 60.0) -> bool:
    """Whether the offline run's protobuf log contains every needle. wandb's service process
    writes it asynchronously and, on a loaded machine, after ``finish`` returns: poll."""
    deadline = time.monotonic() + timeout
    while True:
        (log,) = run_dir.glob("run-*.wandb")
        data = log.read_bytes()
        if all(n in data for n in needles) or time.monotonic() > deadline:
            return all(n in data for n in needles)
        time.sleep(0.5)


# MNIST's IDX files, written byte by byte (independent of metapl's writer).
NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray, type_byte: int = 0x08, dtype: str = ">u1") -> bytes:
    """The IDX encoding, written out by hand (independent of metapl's writer)."""
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    return bytes([0, 0, type_byte, array.ndim]) + dims + array.astype(dtype).tobytes()


def write_set(folder: Path, split: str, images, labels, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(NAMES[split], (images, labels), strict=True):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
