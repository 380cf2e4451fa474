"""examples/cifar_mpl.py end to end on tiny fake datasets in the real on-disk formats."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from support import ROOT, TINY_DATA, TINY_PAPER, load_script

from metapl.data.fake import write_fake_cifar, write_fake_svhn
from metapl.training.loop import load_checkpoint

SCRIPT = ROOT / "examples" / "cifar_mpl.py"
TINY = [
    *TINY_PAPER,
    "--eval-every",
    "5",
    "--log-every",
    "5",
    "--finetune-steps",
    "2",
]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        check=check,
        timeout=300,
    )


@pytest.mark.parametrize(
    "preset", ["cifar10-4k", pytest.param("svhn-1k", marks=pytest.mark.slow)]
)  # the presets share every code path but their numbers: one in the fast set
def test_runs_and_resumes(tmp_path, cifar_dir, preset):
    data = cifar_dir
    if preset == "svhn-1k":
        data = tmp_path / "svhn"
        write_fake_svhn(data, n_train=100, n_test=20, n_extra=30)
    out = tmp_path / "run"
    common = [
        "--preset",
        preset,
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        *TINY,
        "--json",
        "--checkpoint-every",
        "2",
    ]
    first = _run(*common, "--steps", "4")
    results = json.loads(first.stdout.strip().splitlines()[-1])
    # 4 steps of the preset's 300,000: no EMA; then finetuning
    names = {"val/student_raw", "val/student_finetuned", "test/student_finetuned", "test/teacher"}
    assert names <= results.keys()
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert json.loads((out / "split.json").read_text())["meta"]["preset"] == preset
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    resumed = _run(*common, "--steps", "4", "--resume")  # the run in --output-dir
    again = _run("--resume", str(out))  # its saved configuration: no flag typed again
    assert json.loads(again.stdout.strip().splitlines()[-1]) == json.loads(
        resumed.stdout.strip().splitlines()[-1]
    )
    assert json.loads(resumed.stdout.strip().splitlines()[-1]).keys() == results.keys()


@pytest.mark.slow  # the fast set kills faulty_run.py and SIGTERMs this script (test_faults)
def test_sigkill_then_resume_is_bit_identical(tmp_path, cifar_dir):
    steps = ["--steps", "200", "--checkpoint-every", "10", "--meta-grad", "first_order"]

    def args(out):
        return ["--data-dir", str(cifar_dir), "--output-dir", str(out), *TINY, *steps]

    _run(*args(tmp_path / "whole"))

    killed = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    step_at_kill = load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 0 < step_at_kill < 200
    _run("--resume", str(killed))

    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    resumed = load_checkpoint(killed / "checkpoint.pt")
    assert resumed["step"] == whole["step"] == 200
    _assert_bitwise_equal(resumed["mpl"], whole["mpl"])


def _assert_bitwise_equal(a, b, path="mpl"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    else:
        assert a == b, path


def test_bad_paths_and_flags_fail_fast(tmp_path, cifar_dir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    missing = _cli_or_exit(
        ["--data-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")], capsys
    )
    assert missing[0] == 2 and "is not a folder" in missing[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--data-dir", str(empty), "--output-dir", str(tmp_path / "o"), *TINY, "--steps", "2"]
    code, err = _cli_or_exit(argv, capsys)
    assert code == 1 and "cifar-10-batches-py" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not list((tmp_path / "o").glob("*"))
    code, err = _cli_or_exit(["--resume", str(tmp_path / "o2")], capsys)
    assert code != 0 and "no run to resume" in err
    argv = ["--data-dir", str(cifar_dir), "--output-dir", str(tmp_path / "o3"), "--steps", "0"]
    code, err = _cli_or_exit(argv, capsys)
    assert code == 2 and "steps must be >= 1" in err
    assert len(err.strip().splitlines()) == 1


def test_default_wideresnet_runs(tmp_path, cifar_dir):
    out = tmp_path / "wrn"
    args = [
        "--data-dir",
        str(cifar_dir),
        "--output-dir",
        str(out),
        *TINY_DATA,
        "--steps",
        "2",
        "--finetune-steps",
        "0",
        "--json",
    ]
    results = json.loads(_run(*args).stdout.strip().splitlines()[-1])
    names = {"val/student_raw", "val/teacher", "test/student_raw", "test/teacher"}
    assert names == results.keys()  # no EMA in 2 steps, no finetuning
    assert load_checkpoint(out / "checkpoint.pt")["config"]["steps"] == 2


@pytest.mark.slow  # the launcher end to end; test_distributed's two processes stay in the fast set
def test_torchrun_two_processes(tmp_path, cifar_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        "--data-dir",
        str(cifar_dir),
        "--output-dir",
        str(out),
        *TINY,
        "--steps",
        "3",
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    results = json.loads(done.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    assert {"val/student_finetuned", "test/student_finetuned"} <= results.keys()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3


# ------------------------------------------------------------------ in process: modes, classes


def _example():
    module = load_script(SCRIPT, "cifar_mpl")
    module.parse_experiment = load_script(SCRIPT.parent / "_paper.py", "_paper").parse_experiment
    return module


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    example = _example()
    code = example.cli(example.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def _cli_or_exit(argv: list[str], capsys) -> tuple[int, str]:
    """The exit status and stderr of the script's command line, argparse's exits included."""
    try:
        code, _, err = _cli(argv, capsys)
    except SystemExit as e:
        code, err = e.code, capsys.readouterr().err
    return code, err


def test_modes_evaluate_finetune_only_and_resume_a_named_run(tmp_path, monkeypatch, capsys):
    """Twelve classes in the CIFAR format; then --evaluate of final.pt and checkpoint.pt,
    --finetune-only of the checkpoint, and --resume RUN_DIR without --output-dir."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = tmp_path / "data"
    write_fake_cifar(data, n_train=120, n_test=24, num_classes=12)
    out = tmp_path / "run"
    # an EMA given: 3 steps of the preset's 300,000 would scale it away
    base = ["--data-dir", str(data), *TINY, "--steps", "3", "--ema", "0.5", "--json"]
    code, printed, _ = _cli([*base, "--output-dir", str(out)], capsys)
    assert code == 0
    results = json.loads(printed.strip().splitlines()[-1])
    final = torch.load(out / "final.pt", weights_only=False)
    assert final["final"]["net.3.bias"].shape == (12,)  # classes from the data

    code, printed, _ = _cli(["--evaluate", str(out / "final.pt"), "--json"], capsys)
    evaluated = json.loads(printed.strip().splitlines()[-1])
    assert code == 0 and set(evaluated) == {
        "test/student_finetuned",
        "test/student_ema",
        "test/student_raw",
        "test/teacher",
    }
    assert evaluated["test/student_finetuned"] == results["test/student_finetuned"]
    assert evaluated["test/teacher"] == results["test/teacher"]
    code, printed, _ = _cli(["--evaluate", str(out / "checkpoint.pt"), "--no-json"], capsys)
    assert code == 0 and "| test/student_ema |" in printed and "finetuned" not in printed
    code, printed, _ = _cli(["--evaluate", str(out), "--json"], capsys)  # the run's folder
    assert code == 0 and json.loads(printed.strip().splitlines()[-1]) == evaluated

    ft = tmp_path / "ft"
    code, printed, _ = _cli(
        [
            *base,
            "--finetune-only",
            str(out / "checkpoint.pt"),
            "--output-dir",
            str(ft),
            "--finetune-steps",
            "3",
        ],
        capsys,
    )
    assert code == 0
    assert json.loads((ft / "split.json").read_text()) == json.loads(
        (out / "split.json").read_text()
    )  # the trained run's split
    saved = torch.load(ft / "final.pt", weights_only=False)
    assert saved["config"]["finetune_steps"] == 3 and "ema_student" in saved
    assert json.loads(printed.strip().splitlines()[-1]).keys() == {
        "val/student_ema",
        "val/student_finetuned",
        "test/student_finetuned",
    }

    code, _, err = _cli([*base, "--resume", str(out)], capsys)
    assert code == 0, err
    code, _, err = _cli(["--resume", str(out), "--log-every", "1"], capsys)  # may change
    assert code == 0, err
    with pytest.raises(SystemExit) as exit_info:
        _cli(["--resume", str(out), "--uda-threshold", "0.5"], capsys)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--uda-threshold is 0.5 but the run" in err
    assert len(err.strip().splitlines()) == 1


def test_svhn_extra_joins_the_unlabeled_images_only(tmp_path):
    write_fake_svhn(tmp_path / "svhn", n_train=100, n_test=20, n_extra=30)
    example = _example()
    argv = [
        "--preset",
        "svhn-1k",
        "--data-dir",
        str(tmp_path / "svhn"),
        "--output-dir",
        str(tmp_path / "o"),
        "--labels-per-class",
        "2",
        "--val-per-class",
        "2",
    ]
    for extra, n_unlabeled in ((True, 80 + 30), (False, 80)):
        exp, _ = example.parse_experiment(
            example.Experiment,
            [*argv, "--svhn-extra" if extra else "--no-svhn-extra"],
            example.PRESETS,
            "",
        )
        data, classes = example.Cifar.load_data(exp, torch.device("cpu"))
        (tmp_path / "o" / "split.json").unlink()
        assert classes == 10 and len(data.labeled_y) == 20 and len(data.val_y) == 20
        assert len(data.unlabeled_x) == n_unlabeled


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--model", "vgg"], 2, "invalid choice 'vgg' for argument '--model'"),
        (
            ["--labels-per-class", "9"],
            1,
            "error: --labels-per-class 9 and --val-per-class 2 need 11",
        ),
        (["--num-labeled", "25"], 1, "--num-labeled 25 is not a positive multiple of the 10"),
        (["--evaluate", "nope.pt"], 2, "--evaluate nope.pt: no such file or run folder"),
        (["--resume", "a", "--evaluate", "b"], 2, "cannot be combined"),
        (["--svhn-extra"], 2, "svhn_extra is for SVHN, not cifar10"),
    ],
)
def test_command_line_errors_are_one_line(tmp_path, capsys, extra, code, message):
    data = tmp_path / "data"
    write_fake_cifar(data, n_train=100, n_test=20)  # 10 images per class
    tiny = TINY
    if "--num-labeled" in extra:  # instead of --labels-per-class
        at = TINY.index("--labels-per-class")
        tiny = TINY[:at] + TINY[at + 2 :]
    argv = [
        "--data-dir",
        str(data),
        "--output-dir",
        str(tmp_path / "o"),
        *tiny,
        "--steps",
        "2",
        *extra,
    ]
    got, err = _cli_or_exit(argv, capsys)
    assert got == code and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_unreadable_batch_file_is_named_in_one_line(tmp_path, capsys):
    write_fake_cifar(tmp_path, n_train=100, n_test=20)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(b"\x80\x04garbage")
    code, _, err = _cli(
        ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), *TINY, "--steps", "2"],
        capsys,
    )
    assert code == 1 and err.startswith(f"error: cannot read {bad}:")
    assert len(err.strip().splitlines()) == 1


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_fake_cifar(tmp_path, n_train=100, n_test=20)
    out = tmp_path / "o"
    base = ["--data-dir", str(tmp_path), *TINY, "--steps", "2", "--finetune-steps", "0"]
    assert _cli([*base, "--output-dir", str(out)], capsys)[0] == 0
    code, _, err = _cli(["--model", "wrn28-2", "--evaluate", str(out / "final.pt")], capsys)
    assert code == 1 and "does not fit this model" in err and "--model" in err


def test_cifar100_preset_reads_the_cifar100_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_fake_cifar(tmp_path, n_train=400, n_test=100, num_classes=100, name="cifar100")
    out = tmp_path / "o"
    argv = [
        "--preset",
        "cifar100-10k",
        "--data-dir",
        str(tmp_path),
        "--output-dir",
        str(out),
        *TINY,
        "--steps",
        "1",
        "--finetune-steps",
        "0",
        "--json",
    ]
    code, printed, err = _cli(argv, capsys)
    assert code == 0, err
    assert len(json.loads((out / "split.json").read_text())["labeled"]) == 200  # 2 x 100
    assert torch.load(out / "final.pt", weights_only=False)["final"]["net.3.bias"].shape == (100,)
    config = json.loads((out / "config.json").read_text())
    assert config["data.dataset"] == "cifar100" and config["settings.model"] == "mlp"


def test_help_lists_presets_models_and_the_recipe(capsys):
    with pytest.raises(SystemExit) as done:
        _example().main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "--preset {cifar10-4k, cifar100-10k, svhn-1k}" in text
    assert "--finetune-epochs FLOAT" in text and "(default: 625.0)" in text
    assert "--evaluate RUN_DIR_or_FILE" in text and "--student-bn {joint,unlabeled}" in text
    assert "--model {wrn28-2,wrn28-8,resnet50,mlp}" in text and "--total-steps" in text
    with pytest.raises(SystemExit):
        _example().main(["--preset", "cifar100-10k", "--help"])
    assert "(default: wrn28-8)" in capsys.readouterr().out  # the preset's model
