"""examples/maml_fewshot.py: tasks drawn from the right classes, the meta-gradient of the
BatchNorm conv net against plain float64 autograd on a module that updates its own
statistics, and a tiny end-to-end run on small IDX files written here."""

import copy
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import ROOT, load_script, write_set

_PATH = ROOT / "examples" / "maml_fewshot.py"
F64 = torch.float64


@pytest.fixture(scope="module")
def fs():
    yield load_script(_PATH, "maml_fewshot_example")
    sys.modules.pop("maml_fewshot_example", None)


@pytest.fixture
def data_dir(tmp_path):
    """12 training and 12 test images of every digit, random pixels."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        labels = np.repeat(np.arange(10), 12).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_set(tmp_path / "mnist", split, images, labels, gz=True)
    return tmp_path / "mnist"


def test_tasks_come_from_their_split(fs, data_dir):
    train, test = fs.class_pools(data_dir)
    assert len(train) == len(test) == 5 and all(len(p) == 12 for p in train + test)
    cfg = fs.Config(shots=2, query=3)
    x_s, y_s, x_q, y_q = fs.sample_task(train, cfg, torch.Generator().manual_seed(0))
    assert x_s.shape == (10, 1, 28, 28) and x_q.shape == (15, 1, 28, 28)
    assert y_s.tolist() == [c for c in range(5) for _ in range(2)]
    assert float(x_s.max()) <= 1.0
    # support and query images of a class are distinct images of that class
    pool = torch.cat(train)
    for x in torch.cat([x_s, x_q]):
        assert (pool == x).flatten(1).all(1).sum() >= 1


@pytest.mark.parametrize("row", ["transductive", "running"])
def test_meta_gradient_matches_a_plain_autograd_unroll(fs, row):
    """float64: MAML through 3 steps of the conv net; the reference is a copy of the module
    whose BatchNorm updates its own buffers at every forward."""
    cfg = fs.Config(filters=4, inner_steps=3, shots=2, query=2)
    learner = fs.Learner(cfg, row)
    learner.train.double()
    learner.evaluation.double()
    meta, stats = learner.init()
    gen = torch.Generator().manual_seed(1)
    task = tuple(
        t.double() if t.is_floating_point() else t
        for t in fs.sample_task(
            [torch.rand(6, 1, 28, 28, generator=gen) for _ in range(5)], cfg, gen
        )
    )
    res = learner.meta_grad(meta, stats, task)
    model = copy.deepcopy(learner.train)
    m = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    s = dict(m)
    x_s, y_s, x_q, y_q = task
    for _ in range(3):
        loss = F.cross_entropy(torch.func.functional_call(model, s, (x_s,)), y_s)
        g = torch.autograd.grad(loss, list(s.values()), create_graph=True)
        s = {k: p - cfg.inner_lr * gk for (k, p), gk in zip(s.items(), g, strict=True)}
    statistics = {k: v.detach().clone() for k, v in model.named_buffers()}
    if row == "running":
        model.eval()
    outer = F.cross_entropy(torch.func.functional_call(model, s, (x_q,)), y_q)
    expected = dict(zip(m, torch.autograd.grad(outer, list(m.values())), strict=True))
    torch.testing.assert_close(res.meta_grads, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res.state, statistics, rtol=1e-12, atol=1e-14)
    assert int(res.state["1.num_batches_tracked"]) == 3
    assert all(
        v.equal(w) for v, w in zip(stats.values(), learner.init()[1].values(), strict=True)
    )  # the caller's statistics untouched


def test_main_tiny_run(fs, data_dir, tmp_path, capsys):
    argv = [
        "--data-dir",
        str(data_dir),
        "--iterations",
        "2",
        "--meta-batch",
        "2",
        "--test-tasks",
        "3",
        "--filters",
        "4",
        "--query",
        "2",
        "--inner-steps",
        "2",
        "--test-steps",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
        "--json",
    ]
    returned = fs.main(argv)
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads((tmp_path / "out" / "results.json").read_text())
    assert out["rows"].keys() == set(fs.ROWS)
    for r in out["rows"].values():
        assert 0 <= r["accuracy"] <= 100 and r["seconds"] >= 0
    assert returned["rows"] == out["rows"]


def test_missing_data_and_bad_flags_are_one_line_errors(fs, tmp_path, capsys):
    for argv, message in (
        (["--data-dir", str(tmp_path / "none")], "make mnist"),
        (["--shots", "0"], "shots must be > 0"),
        (["--ways", "6"], "ways must be <= 5"),
    ):
        with pytest.raises(SystemExit) as exc:
            fs.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
