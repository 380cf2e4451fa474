"""examples/imagenet_mpl.py end to end (2 steps, then a resume; the MLP by default, ResNet-50 in
the slow run) on a tiny fake ImageNet in the real layout: train/<class>/*.png and
val/<class>/*.png."""

import json
import shutil
import sys

import pytest
import torch
from support import ROOT, load_script

from metapl.data.fake import write_fake_imagefolder
from metapl.training.loop import load_checkpoint
from metapl.training.tracking import read_metrics

SCRIPT = ROOT / "examples" / "imagenet_mpl.py"


def tiny_mlp_argv(data, out, label_fraction=0.25, steps=2, finetune_steps=1, lr=1e-3) -> list[str]:
    """The smallest run on image folders: an MLP on 32x32 images, batches of 2 + 4."""
    argv = ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32"]
    argv += ["--model", "mlp", "--labeled-batch", "2", "--unlabeled-ratio", "2"]
    argv += ["--val-per-class", "1", "--steps", str(steps), "--finetune-steps", str(finetune_steps)]
    argv += ["--teacher-lr", str(lr), "--student-lr", str(lr)]
    if label_fraction is not None:
        argv += ["--label-fraction", str(label_fraction)]
    return argv


def _example():
    return load_script(SCRIPT, "imagenet_mpl")


@pytest.mark.parametrize(
    "model",
    ["mlp", pytest.param("resnet50", marks=pytest.mark.slow)],  # resnet50: 500 MB saves
)
def test_imagenet_example_runs_and_resumes(tmp_path, monkeypatch, capsys, model):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_fake_imagefolder(tmp_path / "data", num_classes=3, train_per_class=8, val_per_class=2)
    out = tmp_path / "run"
    argv = [
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(out),
        "--steps",
        "2",
        "--image-size",
        "32",
        "--labeled-batch",
        "2",
        "--unlabeled-ratio",
        "2",
        "--label-fraction",
        "0.25",
        "--val-per-class",
        "1",
        "--teacher-lr",
        "1e-3",
        "--student-lr",
        "1e-3",
        "--finetune-steps",
        "1",
        "--checkpoint-every",
        "1",
        "--meta-grad",
        "first_order",
        "--decode-threads",
        "2",
        "--json",
        "--model",
        model,
    ]
    example = _example()
    results = example.main(argv)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == pytest.approx(results)
    assert {"val/student_finetuned", "test/student_finetuned", "test/teacher"} <= results.keys()
    manifest = json.loads((out / "split.json").read_text())
    assert len(manifest["labeled"]) == 6  # 25% of 8 images in each of 3 classes
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert example.main([*argv, "--resume"]).keys() == results.keys()


def test_resnet50_gets_dropout_before_its_classifier():
    """What --model resnet50 builds (its training run is in the slow set)."""
    from metapl.training.recipe import build_network

    torch.manual_seed(0)
    net = build_network("resnet50", 5, dropout=0.3, image_size=32)
    assert isinstance(net.fc[0], torch.nn.Dropout) and net.fc[0].p == 0.3
    assert net.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_imagenet_example_rejects_a_folder_without_train_and_val(tmp_path):
    with pytest.raises(SystemExit):
        _example().main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")])


def test_val_images_keep_their_training_class_when_a_class_has_none(tmp_path):
    write_fake_imagefolder(tmp_path, num_classes=3, train_per_class=4, val_per_class=2)
    shutil.rmtree(tmp_path / "val" / "class_000")  # the first class: no validation images
    example = _example()
    exp = example.Experiment(
        data=example.Data(label_fraction=0.5, val_per_class=1, image_size=32, decode_threads=1),
        settings=example.Settings(data_dir=tmp_path, output_dir=tmp_path / "run"),
    )
    data, num_classes = example.ImageNet.load_data(exp, torch.device("cpu"))
    assert num_classes == 3
    assert data.test_y.tolist() == [1, 1, 2, 2]  # class_001 and class_002, not shifted to 0, 1


def test_any_model_on_image_folders_then_evaluate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_fake_imagefolder(tmp_path / "data", num_classes=4, train_per_class=8, val_per_class=2)
    out = tmp_path / "run"
    common = [
        "--data-dir",
        str(tmp_path / "data"),
        "--image-size",
        "16",
        "--model",
        "mlp",
        "--decode-threads",
        "1",
        "--json",
    ]
    example = _example()
    results = example.main(
        [
            *common,
            "--output-dir",
            str(out),
            "--steps",
            "2",
            "--labeled-batch",
            "2",
            "--unlabeled-ratio",
            "2",
            "--label-fraction",
            "0.25",
            "--val-per-class",
            "1",
            "--finetune-steps",
            "1",
            "--randaugment-ops",
            "1",
            "--randaugment-magnitude",
            "5",
        ]
    )
    assert torch.load(out / "final.pt", weights_only=False)["final"]["net.3.bias"].shape == (4,)
    capsys.readouterr()
    assert example.cli(example.main, ["--evaluate", str(out / "final.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["test/student_finetuned"] == results["test/student_finetuned"]


def test_without_pillow_the_error_is_one_line(tmp_path, monkeypatch, capsys):
    write_fake_imagefolder(tmp_path, num_classes=2, train_per_class=2, val_per_class=1)
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    example = _example()
    code = example.cli(
        example.main,
        ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--steps", "1"],
    )
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: reading image folders needs Pillow")
    assert len(err.strip().splitlines()) == 1


def test_help_shows_the_imagenet_recipe(capsys):
    with pytest.raises(SystemExit):
        _example().main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model {wrn28-2,wrn28-8,resnet50,mlp}" in text and "(default: resnet50)" in text
    assert "RandAugment M (default: 17.0)" in text and "--ema-decay FLOAT" in text


def test_a_short_run_scales_the_preset_and_honours_every_finetuning_flag(
    tmp_path, monkeypatch, capsys
):
    """The new user's run (issue 20): --steps 3 of the preset's 300,000 shortens every phase
    and says so; --finetune-epochs beside the preset's finetune_steps is honoured; both
    finetuning lengths at once are refused in one line."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_fake_imagefolder(tmp_path / "data", num_classes=3, train_per_class=8, val_per_class=2)
    base = [
        "--data-dir",
        str(tmp_path / "data"),
        "--image-size",
        "32",
        "--model",
        "mlp",
        "--labeled-batch",
        "2",
        "--unlabeled-ratio",
        "2",
        "--label-fraction",
        "0.25",
        "--val-per-class",
        "1",
        "--teacher-lr",
        "1e-3",
        "--student-lr",
        "1e-3",
        "--steps",
        "3",
    ]
    example = _example()
    example.main([*base, "--output-dir", str(tmp_path / "a")])
    note = capsys.readouterr().err
    assert (
        "--steps 3 (the preset's 300000) scales its schedule: warm-up 1, student wait 1, UDA "
        "ramp 1, no EMA, finetuning 1 steps" in note
    )
    assert _finetune_steps(tmp_path / "a", steps=3) == 1  # the preset's 5,000 of 300,000
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["recipe.ema_decay"] == 0.0  # a horizon of 0.01 steps: no EMA

    example.main([*base, "--output-dir", str(tmp_path / "b"), "--finetune-epochs", "2"])
    assert _finetune_steps(tmp_path / "b", steps=3) == 2  # 2 epochs of 6 images, batch 256

    with pytest.raises(SystemExit) as e:
        example.main(
            [*base, "--output-dir", str(tmp_path / "c"), "--finetune-epochs", "2"]
            + ["--finetune-steps", "4"]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "error: --finetune-steps and --finetune-epochs both set the finetuning length: give one "
        "(--finetune-steps 0: no finetuning)"
    )
    assert not (tmp_path / "c").exists()


def _finetune_steps(run, steps: int) -> int:
    """How many finetuning steps a run took: its results are logged at steps + finetuning."""
    _, records = read_metrics(run)
    return max(r["step"] for r in records) - steps


def test_damaged_images_are_found_before_training(tmp_path, monkeypatch, capsys):
    """A damaged image in val/ (the test split, used only at the end) or train/ stops the
    run before step 1 with one line naming it; --skip-bad-images trains without them."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = tmp_path / "data"
    write_fake_imagefolder(data, num_classes=3, train_per_class=8, val_per_class=2)
    bad = data / "val" / "class_001" / "img_0001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "run"
    argv = tiny_mlp_argv(data, out)
    example = _example()
    assert example.cli(example.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot read image {bad}: ")
    assert not out.exists() or not list(out.iterdir())  # nothing trained, nothing left

    assert example.cli(example.main, [*argv, "--skip-bad-images"]) == 0
    assert f"skipped 1 damaged image(s): {bad}" in capsys.readouterr().err
    assert (out / "final.pt").exists()


def test_final_pt_describes_itself_and_predict_reads_images_with_it(tmp_path, monkeypatch, capsys):
    """final.pt holds the model, class names, input size and normalization; predict needs no
    other flag, and its answers on val/ give the accuracy the run reported."""
    from metapl.training import predict

    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = tmp_path / "data"
    written = write_fake_imagefolder(data, num_classes=3, train_per_class=8, val_per_class=4)
    out = tmp_path / "run"
    argv = tiny_mlp_argv(data, out, label_fraction=0.5, steps=6, finetune_steps=2, lr=1e-2)
    argv.append("--json")
    results = _example().main(argv)
    about = torch.load(out / "final.pt", weights_only=False)["about"]
    assert about == {
        "model": "mlp",
        "classes": ["class_000", "class_001", "class_002"],
        "image_size": 32,
        "resize": 37,
        "normalization": "imagenet",
    }
    capsys.readouterr()
    images = [path for path, _, _ in written["val"]]
    assert predict.main([str(out), *map(str, images), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert all(r["class"] in about["classes"] and 0 < r["confidence"] <= 1 for r in rows)
    truth = [f"class_{c:03d}" for _, _, c in written["val"]]
    accuracy = sum(r["class"] == t for r, t in zip(rows, truth, strict=True)) / len(rows)
    assert accuracy == results["test/student_finetuned"]

    old = torch.load(out / "final.pt", weights_only=False)
    del old["about"]
    torch.save(old, tmp_path / "old.pt")
    assert predict.main([str(tmp_path / "old.pt"), str(images[0])]) == 1
    assert "does not say how to read an image" in capsys.readouterr().err
    assert predict.main([str(out), str(tmp_path / "nothing.png")]) == 1
    assert capsys.readouterr().err.strip().endswith(f"error: no image file {tmp_path}/nothing.png")


def test_an_unlabeled_folder_beside_the_labeled_classes(tmp_path, monkeypatch, capsys):
    """--unlabeled-dir: images at any depth, no classes; train/ is then all labeled (but the
    validation images), and the unlabeled pool is train/ plus the folder."""
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = tmp_path / "data"
    write_fake_imagefolder(data, num_classes=3, train_per_class=8, val_per_class=2)
    extra = tmp_path / "unlabeled"
    for i, sub in enumerate(["", "a", "a/b", "c"]):
        (extra / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 36), (60 * i, 10, 200)).save(extra / sub / f"u{i}.png")
    example = _example()
    exp = example.Experiment(
        data=example.Data(val_per_class=1, image_size=32, decode_threads=1, unlabeled_dir=extra),
        settings=example.Settings(data_dir=data, output_dir=tmp_path / "split"),
    )
    loaded, _ = example.ImageNet.load_data(exp, torch.device("cpu"))
    assert len(loaded.labeled_y) == 21 and len(loaded.val_y) == 3  # 24 images, 1 per class held
    assert len(loaded.unlabeled_x) == 21 + 4  # train/ but the validation images, then the folder
    folder = loaded.unlabeled_x[torch.arange(21, 25)]  # sorted paths: a/b/u2, a/u1, c/u3, u0
    assert folder[:, 0].float().mean(dim=(1, 2)).tolist() == [120, 60, 180, 0]

    out = tmp_path / "run"
    argv = [*tiny_mlp_argv(data, out, label_fraction=None), "--json"]
    argv += ["--unlabeled-dir", str(extra)]  # last: replaced below
    assert {"test/student_finetuned", "val/student_finetuned"} <= example.main(argv).keys()
    assert json.loads((out / "split.json").read_text())["meta"]["label_fraction"] == 1.0
    Image.new("RGB", (8, 8)).save(extra / "c" / "u3.png")  # the unlabeled folder changed
    assert example.cli(example.main, [*argv, "--resume"]) == 1
    assert "1 of another size (unlabeled-dir/c/u3.png)" in capsys.readouterr().err
    missing = [*argv[:-1], str(tmp_path / "none")]
    missing[missing.index("--output-dir") + 1] = str(tmp_path / "run2")
    with pytest.raises(SystemExit) as e:
        example.main(missing)
    assert e.value.code == 2
    assert (
        capsys.readouterr().err.strip().endswith(f"--unlabeled-dir {tmp_path}/none is not a folder")
    )


def test_a_changed_training_folder_is_refused_on_resume(tmp_path, monkeypatch, capsys):
    """split.json keeps the training images' paths and sizes: an image removed or replaced
    before --resume is one line naming it, not an IndexError or other images trained on."""
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = tmp_path / "data"
    write_fake_imagefolder(data, num_classes=3, train_per_class=8, val_per_class=2)
    out = tmp_path / "run"
    argv = [*tiny_mlp_argv(data, out), "--json"]
    example = _example()
    assert example.cli(example.main, argv) == 0
    manifest = json.loads((out / "split.json").read_text())
    files, val = manifest["meta"]["files"], set(manifest["meta"]["val"])
    assert len(files) == 24 and files[0][0] == "class_000/img_0000.png"
    assert len(val) == 3 and not val & (set(manifest["labeled"]) | set(manifest["unlabeled"]))
    assert len(manifest["unlabeled"]) == 21  # what trained as unlabeled: all but validation
    capsys.readouterr()

    Image.new("RGB", (10, 10)).save(data / "train" / "class_002" / "img_0005.png")
    assert example.cli(example.main, [*argv, "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of another size (class_002/img_0005.png)" in err[0]
    (data / "train" / "class_001" / "img_0003.png").unlink()
    assert example.cli(example.main, [*argv, "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the training images changed since")
    assert "1 gone (class_001/img_0003.png); 1 of another size (class_002/img_0005.png)" in err
