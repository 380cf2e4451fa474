"""Image files checked before training: every file opened and its data verified up front, so a
damaged image is one line naming it before step 1, not a traceback hours into a run.

A folder whose files (names, sizes, modification times) have not changed since its last check
is not read again: the result is cached in ``$METAPL_CACHE`` (default ``~/.cache/metapl``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

__all__ = ["unreadable_images", "why_unreadable"]

PROGRESS_FROM = 2000  # files: a progress bar from this many on


def unreadable_images(paths: Sequence[Path], root: Path, threads: int = 8) -> list[Path]:
    """The files of ``paths`` (under ``root``) that PIL cannot open and verify, in order."""
    fingerprint = _fingerprint(paths, root)
    cache = _cache_file(root)
    cached = _read_cache(cache)
    if cached.get("fingerprint") == fingerprint:
        return [root / p for p in cached["unreadable"]]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(_readable, paths)
        results = tqdm(
            results,
            total=len(paths),
            desc=f"checking {root}",
            disable=len(paths) < PROGRESS_FROM,
            leave=False,
        )
        bad = [p for p, ok in zip(paths, results, strict=True) if not ok]
    unreadable = [str(p.relative_to(root)) for p in bad]
    _write_cache(cache, {"fingerprint": fingerprint, "unreadable": unreadable})
    return bad


def why_unreadable(path: Path) -> str:
    """PIL's reason for refusing ``path`` (one line)."""
    try:
        _open_and_verify(path)
    except Exception as e:  # noqa: BLE001 (any decoder error is the answer)
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return "readable"


def _readable(path: Path) -> bool:
    try:
        _open_and_verify(path)
    except Exception:  # noqa: BLE001 (PIL raises many types for damaged files)
        return False
    return True


def _open_and_verify(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        img.verify()  # the file's structure and checksums, without decoding the pixels


def _fingerprint(paths: Sequence[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cache_file(root: Path) -> Path:
    base = Path(os.environ.get("METAPL_CACHE", Path.home() / ".cache" / "metapl"))
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return base / "checked-images" / f"{key}.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, content: dict) -> None:
    """Best effort: a cache that cannot be written only means checking again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(content))
        os.replace(tmp, path)
    except OSError:
        pass
