"""Image folders checked before training (metapl.data.check, ImageFolderDataset.check_images):
a damaged file is one error naming it, or skipped; an empty class folder is refused; a folder
checked once is not read again until it changes."""

import os

import pytest

from metapl.data import ImageFolderDataset
from metapl.data import check as check_module
from metapl.data.fake import write_fake_imagefolder


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPL_CACHE", str(tmp_path / "cache"))
    write_fake_imagefolder(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2)
    return tmp_path / "data"


def _damage(path):
    path.write_bytes(path.read_bytes()[:60])  # a PNG cut short in its image data


def test_a_damaged_image_is_one_error_naming_it(folder):
    bad = folder / "train" / "class_001" / "img_0002.png"
    _damage(bad)
    dataset = ImageFolderDataset(folder / "train", size=16)
    with pytest.raises(ValueError) as e:
        dataset.check_images()
    message = str(e.value)
    assert message.startswith(f"cannot read image {bad}: ")
    assert message.endswith("replace or remove it, or skip damaged images (--skip-bad-images)")
    assert "\n" not in message


def test_skipping_drops_the_damaged_images_and_keeps_the_classes(folder):
    bad = [folder / "train" / "class_000" / f"img_000{i}.png" for i in (1, 3)]
    for path in bad:
        _damage(path)
    dataset = ImageFolderDataset(folder / "train", size=16)
    assert dataset.check_images(skip_bad=True) == bad
    assert len(dataset) == 10 and dataset.targets.tolist() == [0, 0] + [1] * 4 + [2] * 4
    assert all(path not in bad for path, _ in dataset.samples)
    dataset[0]  # the remaining images decode


def test_a_class_left_without_images_is_refused(folder):
    empty = folder / "train" / "class_003"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"class folder {empty} holds no readable images"):
        ImageFolderDataset(folder / "train", size=16)
    empty.joinpath("notes.txt").unlink()
    empty.rmdir()
    for path in (folder / "train" / "class_002").iterdir():
        _damage(path)
    dataset = ImageFolderDataset(folder / "train", size=16)
    with pytest.raises(ValueError, match="class_002 holds no readable images"):
        dataset.check_images(skip_bad=True)


def test_a_folder_is_read_again_only_when_it_changes(folder, monkeypatch):
    opened = []
    real = check_module._readable
    monkeypatch.setattr(check_module, "_readable", lambda p: opened.append(p) or real(p))
    dataset = ImageFolderDataset(folder / "train", size=16)
    assert dataset.check_images() == [] and len(opened) == 12
    assert ImageFolderDataset(folder / "train", size=16).check_images() == []
    assert len(opened) == 12  # cached: nothing opened
    bad = folder / "train" / "class_002" / "img_0000.png"
    _damage(bad)  # another size: the folder changed
    with pytest.raises(ValueError, match=str(bad)):
        ImageFolderDataset(folder / "train", size=16).check_images()
    assert len(opened) == 24
    with pytest.raises(ValueError, match=str(bad)):  # a damaged file is remembered too
        ImageFolderDataset(folder / "train", size=16).check_images()
    assert len(opened) == 24
    os.utime(bad, ns=(0, 0))  # touched: read again
    with pytest.raises(ValueError, match=str(bad)):
        ImageFolderDataset(folder / "train", size=16).check_images()
    assert len(opened) == 36
