"""examples/cifar_mpl.py end to end on tiny fake datasets in the real on-disk formats."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metapl.data.fake import write_fake_cifar, write_fake_svhn
from metapl.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cifar_mpl.py"
TINY = ["--model", "mlp", "--lr", "1e-3", "--labels-per-class", "2", "--val-per-class", "2",
        "--labeled-batch", "4", "--unlabeled-ratio", "2", "--eval-every", "5", "--log-every", "5",
        "--finetune-steps", "2"]  # fmt: skip


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, check=check, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, n_train=100, n_test=20)
    return root


@pytest.mark.parametrize("preset", ["cifar10-4k", "svhn-1k"])
def test_runs_and_resumes(tmp_path, cifar_dir, preset):
    data = cifar_dir
    if preset == "svhn-1k":
        data = tmp_path / "svhn"
        write_fake_svhn(data, n_train=100, n_test=20)
    out = tmp_path / "run"
    common = ["--preset", preset, "--data-dir", str(data), "--output-dir", str(out), *TINY,
              "--json", "--checkpoint-every", "2"]  # fmt: skip
    first = _run(*common, "--steps", "4")
    results = json.loads(first.stdout.strip().splitlines()[-1])
    assert {"val/student", "test/student", "test/teacher"} <= results.keys()
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert json.loads((out / "split.json").read_text())["meta"]["preset"] == preset
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    resumed = _run(*common, "--steps", "4", "--resume")
    assert json.loads(resumed.stdout.strip().splitlines()[-1]).keys() == results.keys()


def test_sigkill_then_resume_is_bit_identical(tmp_path, cifar_dir):
    steps = ["--steps", "200", "--checkpoint-every", "10", "--meta-grad", "first_order"]

    def args(out):
        return ["--data-dir", str(cifar_dir), "--output-dir", str(out), *TINY, *steps]

    _run(*args(tmp_path / "whole"))

    killed = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    step_at_kill = load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 0 < step_at_kill < 200
    _run(*args(killed), "--resume")

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


def test_bad_paths_and_flags_fail_fast(tmp_path, cifar_dir):
    missing = _run("--data-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"),
                   check=False)  # fmt: skip
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    no_files = _run("--data-dir", str(empty), "--output-dir", str(tmp_path / "o"), *TINY,
                    "--steps", "2", check=False)  # fmt: skip
    assert no_files.returncode == 1 and "cifar-10-batches-py" in no_files.stderr
    assert "Traceback" not in no_files.stderr and not list((tmp_path / "o").glob("*"))
    no_ckpt = _run("--data-dir", str(cifar_dir), "--output-dir", str(tmp_path / "o2"),
                   "--resume", check=False)  # fmt: skip
    assert no_ckpt.returncode != 0 and "no run to resume" in no_ckpt.stderr
    bad_steps = _run("--data-dir", str(cifar_dir), "--output-dir", str(tmp_path / "o3"),
                     "--steps", "0", check=False)  # fmt: skip
    assert bad_steps.returncode == 2 and "--steps must be >= 1" in bad_steps.stderr


def test_default_wideresnet_runs(tmp_path, cifar_dir):
    out = tmp_path / "wrn"
    args = ["--data-dir", str(cifar_dir), "--output-dir", str(out), "--labels-per-class", "2",
            "--val-per-class", "2", "--labeled-batch", "4", "--unlabeled-ratio", "2", "--steps",
            "2", "--finetune-steps", "0", "--json"]  # fmt: skip
    results = json.loads(_run(*args).stdout.strip().splitlines()[-1])
    assert {"val/student", "val/teacher", "test/student", "test/teacher"} == results.keys()
    assert load_checkpoint(out / "checkpoint.pt")["config"]["steps"] == 2


def test_torchrun_two_processes(tmp_path, cifar_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), "--data-dir", str(cifar_dir), "--output-dir", str(out), *TINY,
           "--steps", "3", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    results = json.loads(done.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    assert {"val/student", "test/student"} <= results.keys()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
