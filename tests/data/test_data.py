import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from metapl.data import (
    NORMALIZATION,
    ImageFolderDataset,
    labeled_fraction_split,
    labeled_unlabeled_split,
    load_cifar,
    load_manifest,
    load_svhn,
    normalize,
    save_manifest,
)
from metapl.data.fake import write_fake_cifar, write_fake_imagefolder, write_fake_svhn

# ---------------------------------------------------------------- splits


def test_split_takes_exactly_n_per_class_and_is_seeded():
    targets = np.repeat(np.arange(4), [10, 7, 9, 5])
    split = labeled_unlabeled_split(targets, labels_per_class=5, seed=3)
    assert np.bincount(targets[split.labeled], minlength=4).tolist() == [5, 5, 5, 5]
    assert len(np.unique(split.labeled)) == 20
    assert split.labeled.dtype == np.int64
    np.testing.assert_array_equal(split.unlabeled, np.arange(len(targets)))
    again = labeled_unlabeled_split(torch.from_numpy(targets), 5, seed=3)
    np.testing.assert_array_equal(again.labeled, split.labeled)
    other = labeled_unlabeled_split(targets, 5, seed=4)
    assert not np.array_equal(other.labeled, split.labeled)


def test_split_can_exclude_labeled_from_unlabeled():
    targets = np.arange(30) % 3
    split = labeled_unlabeled_split(targets, 4, seed=0, unlabeled_includes_labeled=False)
    assert len(np.intersect1d(split.labeled, split.unlabeled)) == 0
    np.testing.assert_array_equal(
        np.sort(np.concatenate([split.labeled, split.unlabeled])), np.arange(30)
    )


def test_split_errors_name_the_short_class():
    targets = np.array([0, 0, 0, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="class 1 has 1 examples"):
        labeled_unlabeled_split(targets, 2, seed=0)
    with pytest.raises(ValueError, match="class 3 has 0"):
        labeled_unlabeled_split(targets, 1, seed=0, num_classes=4)


def test_fraction_split_is_stratified():
    targets = np.repeat(np.arange(3), [100, 40, 7])
    split = labeled_fraction_split(targets, 0.1, seed=0)
    assert np.bincount(targets[split.labeled]).tolist() == [10, 4, 1]
    assert len(split.unlabeled) == len(targets)


def test_manifest_round_trip_is_atomic(tmp_path):
    split = labeled_unlabeled_split(np.arange(50) % 5, 2, seed=1)
    path = tmp_path / "sub" / "split.json"
    path.parent.mkdir()
    path.write_text("old contents")
    save_manifest(split, path, {"dataset": "cifar10", "seed": 1})
    loaded, meta = load_manifest(path)
    np.testing.assert_array_equal(loaded.labeled, split.labeled)
    np.testing.assert_array_equal(loaded.unlabeled, split.unlabeled)
    assert meta == {"dataset": "cifar10", "seed": 1}
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp file left
    assert json.loads(path.read_text())["labeled"] == split.labeled.tolist()


# ---------------------------------------------------------------- CIFAR


def pattern(n: int, offset: int) -> np.ndarray:
    """[n, 3, 32, 32] uint8 whose value encodes (sample, channel, row, col)."""
    i, c, y, x = np.meshgrid(
        np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij"
    )
    return ((offset + 31 * i + 7 * c + 3 * y + x) % 256).astype(np.uint8)


def write_batch(path, images: np.ndarray, labels: list[int], key: bytes) -> None:
    # The real layout: each row holds the 1024 red, then green, then blue values, row-major.
    rows = np.stack([np.concatenate([im[c].ravel() for c in range(3)]) for im in images])
    with open(path, "wb") as f:
        pickle.dump({b"data": rows, key: labels, b"batch_label": b"x"}, f)


def test_cifar10_reads_channel_planes_row_major(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for b in range(5):
        images = pattern(2, offset=10 * b)
        write_batch(folder / f"data_batch_{b + 1}", images, [b, 9 - b], b"labels")
        expected.append(images)
    write_batch(folder / "test_batch", pattern(3, offset=99), [1, 2, 3], b"labels")

    images, targets = load_cifar(tmp_path, "cifar10", train=True)
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 32, 32)
    assert targets.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), np.concatenate(expected))
    assert targets.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    assert int(images[1, 2, 5, 7]) == (31 * 1 + 7 * 2 + 3 * 5 + 7) % 256
    test_images, test_targets = load_cifar(tmp_path, "cifar10", train=False)
    np.testing.assert_array_equal(test_images.numpy(), pattern(3, offset=99))
    assert test_targets.tolist() == [1, 2, 3]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 4), ("test", 2)):
        images = pattern(n, offset=n)
        rows = images.reshape(n, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"data": rows,
                    b"fine_labels": [99 - i for i in range(n)],
                    b"coarse_labels": [0] * n,
                },
                f,
            )
    images, targets = load_cifar(tmp_path, "cifar100", train=True)
    np.testing.assert_array_equal(images.numpy(), pattern(4, offset=4))
    assert targets.tolist() == [99, 98, 97, 96]


def test_cifar_missing_files_say_where_to_put_what(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as err:
        load_cifar(tmp_path, "cifar10")
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(err.value)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(tmp_path, "cifar100", train=False)
    with pytest.raises(ValueError, match="cifar10"):
        load_cifar(tmp_path, "cifar1000")


def test_download_goes_through_torchvision_when_it_imports(tmp_path, monkeypatch):
    import metapl.data.datasets as datasets

    calls = []

    class FakeTorchvision:
        @staticmethod
        def CIFAR10(root, train, download):  # writes what torchvision's download unpacks
            calls.append((root, train, download))
            write_fake_cifar(root, n_train=10, n_test=5)

        @staticmethod
        def SVHN(root, split, download):
            calls.append((root, split, download))
            write_fake_svhn(root, n_train=4, n_test=3)

    monkeypatch.setattr(datasets, "_torchvision_datasets", lambda: None)
    with pytest.raises(FileNotFoundError, match="download=True needs torchvision"):
        load_cifar(tmp_path, download=True)
    monkeypatch.setattr(datasets, "_torchvision_datasets", lambda: FakeTorchvision)
    assert load_cifar(tmp_path, train=False, download=True)[0].shape == (5, 3, 32, 32)
    assert load_svhn(tmp_path, "test", download=True)[0].shape == (3, 3, 32, 32)
    assert calls == [(str(tmp_path), False, True), (str(tmp_path), "test", True)]


def test_fake_cifar_round_trips(tmp_path):
    for name, k in (("cifar10", 10), ("cifar100", 100)):
        written = write_fake_cifar(tmp_path, n_train=203, n_test=50, num_classes=k, name=name)
        for train, split in ((True, "train"), (False, "test")):
            images, targets = load_cifar(tmp_path, name, train=train)
            np.testing.assert_array_equal(images.numpy(), written[split][0])
            np.testing.assert_array_equal(targets.numpy(), written[split][1])
    assert np.bincount(written["train"][1]).min() == 2  # balanced: 203 over 100 classes


# ---------------------------------------------------------------- SVHN


def test_svhn_reads_hwcn_and_maps_10_to_0(tmp_path):
    images = pattern(4, offset=5)
    x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))  # the real [32, 32, 3, N] layout
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    loaded, targets = load_svhn(tmp_path, "test")
    assert loaded.dtype == torch.uint8 and loaded.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(loaded.numpy(), images)
    assert targets.dtype == torch.int64 and targets.tolist() == [0, 1, 9, 0]


def test_fake_svhn_round_trips_and_missing_files_raise(tmp_path):
    written = write_fake_svhn(tmp_path, n_train=30, n_test=20)
    for split in ("train", "test"):
        images, targets = load_svhn(tmp_path, split)
        np.testing.assert_array_equal(images.numpy(), written[split][0])
        np.testing.assert_array_equal(targets.numpy(), written[split][1])
    with pytest.raises(FileNotFoundError, match="housenumbers/extra_32x32.mat"):
        load_svhn(tmp_path, "extra")
    written = write_fake_svhn(tmp_path, n_train=30, n_test=20, n_extra=7, seed=1)
    images, targets = load_svhn(tmp_path, "extra")
    np.testing.assert_array_equal(images.numpy(), written["extra"][0])
    np.testing.assert_array_equal(targets.numpy(), written["extra"][1])
    assert images.shape == (7, 3, 32, 32)
    (tmp_path / "extra_32x32.mat").write_bytes(b"MATLAB 5.0 truncated")
    with pytest.raises(ValueError, match="cannot read .*extra_32x32.mat: .*not an SVHN .mat"):
        load_svhn(tmp_path, "extra")


def test_an_unreadable_cifar_batch_is_named(tmp_path):
    write_fake_cifar(tmp_path, n_train=10, n_test=5)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=f"cannot read {bad}: .* not a CIFAR python batch"):
        load_cifar(tmp_path)
    with open(bad, "wb") as f:
        pickle.dump({b"data": 1}, f)
    with pytest.raises(ValueError, match="data_batch_3: .*labels"):
        load_cifar(tmp_path)


# ---------------------------------------------------------------- ImageFolder


def test_imagefolder_center_crops_exact_pixels(tmp_path):
    written = write_fake_imagefolder(
        tmp_path, num_classes=3, train_per_class=2, image_size=(48, 64)
    )
    ds = ImageFolderDataset(tmp_path / "train", size=48, resize=48)  # no resampling: exact
    assert ds.classes == ["class_000", "class_001", "class_002"]
    assert len(ds) == 6 and ds.targets.tolist() == [0, 0, 1, 1, 2, 2]
    for i, (path, image, target) in enumerate(written["train"]):
        item, label = ds[i]
        assert ds.samples[i] == (path, target) and label == target
        assert item.dtype == torch.uint8 and item.shape == (3, 48, 48)
        h, w = image.shape[1:]
        top, left = (h - 48) // 2, (w - 48) // 2
        np.testing.assert_array_equal(item.numpy(), image[:, top : top + 48, left : left + 48])


def test_imagefolder_resizes_jpegs_and_batches(tmp_path):
    write_fake_imagefolder(tmp_path, num_classes=2, val_per_class=3, ext="JPEG")
    (tmp_path / "val" / "class_000" / "notes.txt").write_text("not an image")
    Image.new("L", (20, 30), 77).save(tmp_path / "val" / "class_001" / "gray.jpg")
    ds = ImageFolderDataset(tmp_path / "val", size=16)
    assert ds.resize == 18 and len(ds) == 7
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=7)))
    assert images.shape == (7, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="<class>"):
        ImageFolderDataset(tmp_path / "nowhere", size=8)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", size=8)
    with pytest.raises(ValueError, match="resize"):
        ImageFolderDataset(tmp_path / "empty", size=8, resize=4)


# ---------------------------------------------------------------- normalization


@pytest.mark.parametrize("dataset", sorted(NORMALIZATION))
def test_normalize_uses_the_dataset_stats(dataset):
    mean, std = NORMALIZATION[dataset]
    x = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)
    out = normalize(x, dataset)
    expected = (200 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[1, :, 3, 2], expected)
    torch.testing.assert_close(normalize(x.float() / 255, dataset), out)
