"""Fault injection: kills, damaged checkpoints, NaN data, stale folders, changed flags.

Every fault ends in a clear error or in the result an uninterrupted run gets, and no file that
was good before the fault is lost. The tiny run lives in tests/training/faulty_run.py; the
command-line faults run examples/cifar_mpl.py on a fake CIFAR-10.
"""

import errno
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faulty_run import tiny_data, tiny_mpl, tiny_train
from support import EXAMPLES, TINY_PAPER, load_script

from metapl import atomic
from metapl.data import ImageFolderDataset
from metapl.data.fake import write_fake_imagefolder
from metapl.training import loop as loop_module
from metapl.training import rundir as rundir_module
from metapl.training.guard import DivergenceError, DivergenceGuard
from metapl.training.loop import load_checkpoint
from metapl.training.rundir import RunError

HERE = Path(__file__).resolve().parent
CIFAR = EXAMPLES / "cifar_mpl.py"
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _assert_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}.{k}")
    else:
        assert a == b, path


# ------------------------------------------------------------------ kills, then resume


def _driver(out: Path, *flags: str, killed: bool = False) -> None:
    cmd = [sys.executable, str(HERE / "faulty_run.py"), str(out), *flags]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    if killed:
        assert done.returncode == -9, done.stderr[-2000:]
    else:
        assert done.returncode == 0, done.stderr[-2000:]


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    _driver(tmp_path / "whole")
    out = tmp_path / "killed"
    rng = random.Random(9)  # the kill points are random, and the same in every test run
    kills = [
        ("--die-at-step", str(rng.randint(1, 5))),  # before or after the first checkpoint
        ("--die-in-save", "1", "--die-while", "torch_save"),
        ("--die-in-save", "2", "--die-while", "keeping_previous"),
        ("--die-at-step", str(rng.randint(2, 4))),
    ]
    for i, kill in enumerate(kills):
        _driver(out, *(["--resume"] if i else []), *kill, killed=True)
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            if (out / name).exists():  # whatever is there is a whole, loadable checkpoint
                assert 0 < load_checkpoint(out / name)["step"] <= 12
    _driver(out, "--resume")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    resumed = load_checkpoint(out / "checkpoint.pt")
    assert resumed["step"] == whole["step"] == 12
    _assert_equal(resumed["mpl"], whole["mpl"], "mpl")
    final = load_checkpoint(tmp_path / "whole" / "final.pt")
    _assert_equal(load_checkpoint(out / "final.pt"), final, "final")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "teacher/loss" in x]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]  # no step logged twice
    assert not list(out.glob(".*.tmp")), "a resumed run removes the temporary files of a kill"


@pytest.mark.parametrize(
    "sig",
    [
        "SIGTERM",
        pytest.param("SIGINT", marks=pytest.mark.slow),
        pytest.param("SIGUSR1", marks=pytest.mark.slow),
    ],
)
def test_a_stop_signal_checkpoints_the_step_and_resume_equals_an_uninterrupted_run(tmp_path, sig):
    """A preempted job: the signal comes in step 5 (checkpoints every 3 steps); the run
    saves step 5, says how to resume and exits 1; the resumed run ends as an uninterrupted
    one does."""
    whole, out = tmp_path / "whole", tmp_path / "stopped"
    _driver(whole)
    cmd = [sys.executable, str(HERE / "faulty_run.py"), str(out), "--signal-at-step", "5"]
    done = subprocess.run([*cmd, "--signal", sig], env=ENV, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: stopped by {sig} after step 5 of 12: {out / 'checkpoint.pt'} holds it; "
        "continue with --resume (train(..., resume=True))"
    )
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5
    assert load_checkpoint(out / "checkpoint.prev.pt")["step"] == 3
    assert not (out / "final.pt").exists()
    _driver(out, "--resume")
    _assert_equal(load_checkpoint(out / "final.pt"), load_checkpoint(whole / "final.pt"), "final")


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    tiny_train(tmp_path, steps=6)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["world_size"] == 1
    torch.save({**state, "world_size": 2}, tmp_path / "checkpoint.pt")
    with pytest.raises(RunError, match="written by a run of 2 process.es. and this one has 1"):
        tiny_train(tmp_path, steps=6, resume=True)


@pytest.mark.parametrize(
    ("error", "reason"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
)
def test_a_full_or_read_only_disk_is_one_error_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, error, reason
):
    """The second checkpoint (step 6) cannot be written: the first (step 3) stays whole."""
    real, writes = atomic.write_atomically, [0]

    def refusing(path, write, binary):
        writes[0] += 1
        if Path(path).name == "checkpoint.pt" and writes[0] > 1:  # the second: step 6
            raise OSError(error, os.strerror(error), str(path))
        return real(path, write, binary)

    monkeypatch.setattr(loop_module, "write_atomically", refusing)
    with pytest.raises(RunError) as e:
        tiny_train(tmp_path, steps=12)
    assert str(e.value) == (
        f"cannot write {tmp_path / 'checkpoint.pt'}: {reason}; the last good checkpoint, "
        f"{tmp_path / 'checkpoint.pt'} (step 3), is kept. Free space or make the folder "
        "writable, then resume"
    )
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_read_only_output_folder_is_one_line_at_the_command_line(
    tmp_path, cifar_dir, monkeypatch, capsys
):
    def refusing(path, write, binary):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(rundir_module, "write_atomically", refusing)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    example = load_script(CIFAR, "cifar_mpl_readonly")
    out = tmp_path / "run"
    argv = ["--data-dir", str(cifar_dir), "--output-dir", str(out), *TINY, "--steps", "2"]
    assert example.cli(example.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: [Errno 13] Permission denied: '{out / 'config.json'}'"]


# ------------------------------------------------------------------ damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    tiny_train(out, steps=6)
    return out


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "wrong_model", "not_mpl"])
def test_a_damaged_checkpoint_is_named_and_nothing_is_lost(tmp_path, finished_run, damage):
    out = tmp_path / "run"
    out.mkdir()
    for p in finished_run.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint\n" * 10)
    elif damage == "wrong_model":
        other = tiny_mpl(hidden=5)
        state = load_checkpoint(ckpt)
        torch.save({**state, "mpl": other.state_dict()}, ckpt)
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    before = _digests(out)
    with pytest.raises(RunError) as e:
        tiny_train(out, steps=6, resume=True)
    message = str(e.value)
    assert str(ckpt) in message and "\n" not in message
    expected = {
        "truncated": "truncated",
        "empty": "empty",
        "garbage": "not a checkpoint",
        "wrong_model": "another model: it has teacher.net.0.bias of shape (5,), this",
        "not_mpl": "not a metapl training checkpoint",
    }[damage]
    assert expected in message
    if damage in ("truncated", "empty", "garbage"):
        assert "checkpoint.prev.pt" in message  # where to resume from instead
    assert _digests(out) == before


def test_the_previous_checkpoint_is_kept(finished_run):
    last = load_checkpoint(finished_run / "checkpoint.pt")
    prev = load_checkpoint(finished_run / "checkpoint.prev.pt")
    assert (prev["step"], last["step"]) == (3, 6)


# ------------------------------------------------------------------ divergence


@pytest.mark.parametrize("nan_step", [7, 8])
def test_nan_in_a_batch_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, nan_step):
    with pytest.raises(DivergenceError) as e:
        tiny_train(tmp_path, steps=12, data=tiny_data(nan_at_step=nan_step))
    message = str(e.value)
    assert f"at step {nan_step} " in message and "is nan" in message
    term = message.split("training diverged: ")[1].split(" is ")[0]
    assert term.split("/")[0] in ("teacher", "student", "mpl")
    good = 6  # checkpoints every 3 steps; the error comes at the next log (every 2) or save
    assert f"(step {good})" in message
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == good
    for net in ("teacher", "student", "ema_student"):
        assert all(torch.isfinite(t).all() for t in saved["mpl"][net].values())
    assert not (tmp_path / "final.pt").exists()


def test_a_huge_learning_rate_is_refused_not_saved(tmp_path):
    with pytest.raises(DivergenceError, match="training diverged: .* at step"):
        tiny_train(tmp_path, steps=12, mpl=tiny_mpl(lr=1e12))
    if (tmp_path / "checkpoint.pt").exists():
        saved = load_checkpoint(tmp_path / "checkpoint.pt")["mpl"]
        assert all(torch.isfinite(t).all() for t in saved["student"].values())


def _guarded(stream: dict[str, list[float]], factor: float = 1e3) -> DivergenceGuard:
    """A guard fed ``stream`` (metric -> one value per step, steps from 1)."""
    guard = DivergenceGuard(torch.device("cpu"), factor)
    steps = len(next(iter(stream.values())))
    for k in range(steps):
        guard.update({name: torch.tensor(v[k]) for name, v in stream.items()}, k + 1)
    return guard


def _divergence(guard: DivergenceGuard) -> str | None:
    try:
        guard.check(Path("run/checkpoint.pt"), None)
    except DivergenceError as e:
        return str(e)
    return None


def test_a_loss_growing_by_orders_of_magnitude_stops_at_the_step_it_crosses():
    # steady at 2, then x10 per step from step 31: 2e3 is 1e3 x the median, 2e4 crosses it
    loss = [2.0] * 30 + [2.0 * 10**k for k in range(1, 8)]
    lr = [0.05] * len(loss)
    message = _divergence(_guarded({"teacher/loss": loss, "teacher/lr": lr}))
    assert "teacher/loss exploded at step 34: 2e+04, 1e+04 times its usual size 2" in message
    assert "teacher/lr was 0.05 at that step: try a tenth" in message
    assert "no checkpoint had been written" in message
    assert _divergence(_guarded({"teacher/loss": loss[:33], "teacher/lr": lr[:33]})) is None


def test_a_loss_that_jumps_at_once_is_caught_at_the_second_step():
    message = _divergence(_guarded({"student/loss": [1.1, 5e3, 5e3, 5e3]}))
    assert "student/loss exploded at step 2" in message


@pytest.mark.parametrize(
    "loss",
    [
        [1e-5] * 20 + [0.5] * 5,  # near 0 at first (a consistency loss), then ordinary
        [0.1 * 1.05**k for k in range(100)],  # a ramped weight: x130 over 100 steps
        [2.3] * 20 + [-400.0, 300.0] * 5,  # large swings of either sign within the limit
        [5e4] * 30,  # large from the first step on and steady: its own scale
    ],
)
def test_ordinary_losses_never_stop_a_run(loss):
    assert _divergence(_guarded({"teacher/loss_mpl": loss, "mpl/h": loss})) is None


def test_metrics_other_than_losses_may_grow_and_infinity_still_stops():
    growing = [10.0**k for k in range(12)]  # a gradient norm, not a loss
    assert _divergence(_guarded({"mpl/grad_rms_logits": growing})) is None
    loss = [1.0] * 5 + [float("inf")]
    message = _divergence(_guarded({"teacher/loss": loss}, factor=math.inf))
    assert "teacher/loss is inf at step 6 (the first non-finite value)" in message
    assert _divergence(_guarded({"teacher/loss": [1.0, 1e9, 1e12]}, factor=math.inf)) is None


def test_an_exploding_run_stops_before_writing_a_checkpoint(tmp_path):
    """The tiny run at lr 100: finite losses, 1e5 times their first value at step 2."""
    with pytest.raises(DivergenceError) as e:
        tiny_train(tmp_path, steps=12, mpl=tiny_mpl(lr=100.0))
    message = str(e.value)
    assert "exploded at step 2" in message and "no checkpoint had been written" in message
    assert "teacher/lr was 100, student/lr was 100 at that step: try a tenth" in message
    assert not (tmp_path / "checkpoint.pt").exists()
    done = tiny_train(tmp_path / "off", steps=4, mpl=tiny_mpl(lr=100.0), explosion_factor=math.inf)
    # finite, so the guard lets it run
    assert set(done) >= {"test/student_finetuned", "val/student_finetuned"}


# ------------------------------------------------------------------ the command line


TINY = [
    *TINY_PAPER,
    "--eval-every",
    "2",
    "--log-every",
    "2",
    "--finetune-steps",
    "2",
    "--checkpoint-every",
    "2",
]


def _cifar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CIFAR), *args], capture_output=True, text=True, env=ENV, timeout=300
    )


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    """The one error line of a run that could not start or go on (status 1), or of a command
    line that could not be taken (status 2)."""
    assert done.returncode in (1, 2), done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("error: ") or ": error: " in x]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return lines[0]


def test_command_line_faults_end_in_one_line_and_keep_the_run(tmp_path, cifar_dir):
    out = tmp_path / "run"
    args = ["--data-dir", str(cifar_dir), "--output-dir", str(out), *TINY]
    assert _cifar(*args, "--steps", "4").returncode == 0
    assert {
        "config.json",
        "split.json",
        "checkpoint.pt",
        "checkpoint.prev.pt",
        "final.pt",
        "results.json",
        "metrics.jsonl",
    } <= {p.name for p in out.iterdir()}
    before = _digests(out)

    # The same folder again without --resume (other flags, or the same ones): refused.
    stale = _one_line_error(_cifar(*args, "--steps", "4", "--labels-per-class", "3", "--seed", "5"))
    assert "already holds a run" in stale and "--resume" in stale and str(out) in stale
    # --resume with flags that change the run: the first differing flag is named.
    for flag, value in [("--steps", "8"), ("--teacher-lr", "100")]:
        changed = _one_line_error(_cifar(*args, "--steps", "4", flag, value, "--resume"))
        assert f"{flag} is " in changed and f"but the run in {out} used" in changed
    changed = _one_line_error(_cifar(*args, "--steps", "4", "--no-uda", "--resume"))
    assert "--uda is False but" in changed
    # A truncated checkpoint: one line naming it.
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])
    before["checkpoint.pt"] = _digests(out)["checkpoint.pt"]
    damaged = _one_line_error(_cifar(*args, "--steps", "4", "--resume"))
    assert str(out / "checkpoint.pt") in damaged and "truncated" in damaged
    assert _digests(out) == before  # nothing written, nothing lost
    # Flags that only change logging may differ on resume.
    (out / "checkpoint.pt").unlink()
    (out / "checkpoint.prev.pt").rename(out / "checkpoint.pt")
    resumed = _cifar(*args, "--steps", "4", "--resume", "--log-every", "1", "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.mark.slow  # a subprocess; the in-process SIGTERM case stays in the fast set
def test_sigterm_at_the_command_line_saves_the_step_and_resume_finishes(tmp_path, cifar_dir):
    """A scheduler's SIGTERM at any time: one line saying how to resume, then --resume."""
    out = tmp_path / "run"
    args = ["--data-dir", str(cifar_dir), "--output-dir", str(out), *TINY_PAPER]
    args += ["--steps", "400", "--eval-every", "400", "--checkpoint-every", "2"]
    args += ["--finetune-steps", "1"]
    run = subprocess.Popen(
        [sys.executable, str(CIFAR), *args], env=ENV, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err[-2000:]
    line = _one_line_error(subprocess.CompletedProcess(run.args, 1, "", err))
    assert line.startswith("error: stopped by SIGTERM after step ") and "--resume" in line
    stopped_at = int(line.split("after step ")[1].split(" ")[0])
    assert 2 <= stopped_at < 400 and load_checkpoint(out / "checkpoint.pt")["step"] == stopped_at
    resumed = _cifar(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 400 and (out / "final.pt").exists()


def test_a_run_that_fails_after_loading_data_leaves_nothing_behind(tmp_path, cifar_dir):
    """Too many labels per class is found once the labels are read."""
    out = tmp_path / "run"
    failed = _cifar(
        "--data-dir",
        str(cifar_dir),
        "--output-dir",
        str(out),
        *TINY,
        "--steps",
        "4",
        "--labels-per-class",
        "999",
    )
    assert "--labels-per-class 999" in _one_line_error(failed)
    assert not out.exists() or not list(out.iterdir())
    rerun = _cifar("--data-dir", str(cifar_dir), "--output-dir", str(out), *TINY, "--steps", "2")
    assert rerun.returncode == 0, rerun.stderr[-2000:]


@pytest.mark.parametrize(
    ("lr", "expected"),
    [("1e30", "(the first non-finite value)"), ("30", "exploded at step 2")],
)
def test_divergence_at_the_command_line(tmp_path, cifar_dir, lr, expected):
    out = tmp_path / "run"
    done = _cifar(
        "--data-dir",
        str(cifar_dir),
        "--output-dir",
        str(out),
        *TINY,
        "--steps",
        "8",
        "--teacher-lr",
        lr,
        "--student-lr",
        lr,
    )
    line = _one_line_error(done)
    assert "training diverged" in line and expected in line and "Lower the learning rate" in line
    if (out / "checkpoint.pt").exists():
        saved = load_checkpoint(out / "checkpoint.pt")["mpl"]["student"]
        assert all(torch.isfinite(t).all() for t in saved.values())


# ------------------------------------------------------------------ ImageFolder classes


def test_val_shares_the_training_class_indices(tmp_path):
    write_fake_imagefolder(tmp_path, num_classes=3, train_per_class=2, val_per_class=2)
    val = tmp_path / "val"
    missing = sorted(d.name for d in val.iterdir())[0]
    (val / missing).rename(tmp_path / "aside")  # the first class has no validation images
    train_set = ImageFolderDataset(tmp_path / "train", size=8)
    val_set = ImageFolderDataset(val, size=8, classes=train_set.classes)
    for path, target in val_set.samples:
        assert train_set.classes[target] == path.parent.name
    assert sorted(set(val_set.targets.tolist())) == [1, 2]

    (tmp_path / "aside").rename(val / "extra_class")  # a class the training set lacks
    with pytest.raises(ValueError, match="extra_class"):
        ImageFolderDataset(val, size=8, classes=train_set.classes)
