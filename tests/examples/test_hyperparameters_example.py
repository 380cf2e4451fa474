"""examples/hyperparameters.py (learned optimizer hyperparameters): the example's hypergradient
equals a hand-written float64 autograd unroll (no metapl in the reference), and a smoke run
writes its outputs."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from reference import one_thread  # noqa: F401  (fixture: single-threaded module)
from support import ROOT, load_script

_PATH = ROOT / "examples" / "hyperparameters.py"
F64 = torch.float64


@pytest.fixture(scope="module")
def hp():
    yield load_script(_PATH, "hyperparameters_example")
    sys.modules.pop("hyperparameters_example", None)


def _mlp(p, x):
    return torch.relu(x @ p["w0"].T + p["b0"]) @ p["w1"].T + p["b1"]


def _sqrt(v):
    """sqrt with derivative 0 at exactly 0 (a dead ReLU unit's gradient is exactly 0)."""
    return torch.where(v > 0, torch.sqrt(torch.where(v > 0, v, 1.0)), 0.0)


def _reference(name, meta, start, xs, ys, x_val, y_val, truncate=None):
    """d val_loss / d meta through K hand-written torch.optim-style updates (create_graph)."""
    m = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    lr = m["log_lr"].exp()
    second = torch.sigmoid(m[[k for k in m if k != "log_lr"][0]])  # momentum or beta1
    if name == "adamw":
        second = m["log_weight_decay"].exp()
    beta1, beta2, eps = (second, 0.999, 1e-8) if name == "adam" else (0.9, 0.999, 1e-8)
    steps = len(ys)
    p = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    buf = {k: torch.zeros_like(v) for k, v in p.items()}
    sq = {k: torch.zeros_like(v) for k, v in p.items()}
    for t in range(steps):
        if truncate is not None and t == steps - truncate:  # cut the graph before step K - T
            p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            buf = {k: v.detach() for k, v in buf.items()}
            sq = {k: v.detach() for k, v in sq.items()}
        loss = F.cross_entropy(_mlp(p, xs[t]), ys[t])
        grads = dict(
            zip(p, torch.autograd.grad(loss, list(p.values()), create_graph=True), strict=True)
        )
        new = {}
        for k, w in p.items():
            g = grads[k]
            if name == "sgd":
                buf[k] = second * buf[k] + g
                new[k] = w - lr * buf[k]
                continue
            if name == "adamw":
                w = w * (1 - lr * second)
            buf[k] = beta1 * buf[k] + (1 - beta1) * g
            sq[k] = beta2 * sq[k] + (1 - beta2) * g * g
            m_hat = buf[k] / (1 - beta1 ** (t + 1))
            v_hat = sq[k] / (1 - beta2 ** (t + 1))
            new[k] = w - lr * m_hat / (_sqrt(v_hat) + eps)
        p = new
    outer = F.cross_entropy(_mlp(p, x_val), y_val)
    return dict(zip(m, torch.autograd.grad(outer, list(m.values())), strict=True))


@pytest.mark.parametrize(
    "name, values, truncate",
    [
        ("sgd", (0.2, 0.8), None),
        ("sgd", (0.2, 0.8), 3),
        ("adam", (0.01, 0.7), None),
        ("adamw", (0.01, 0.5), None),
    ],
)
def test_hypergradient_matches_autograd_unroll(hp, name, values, truncate):
    data = hp.load_data(0, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    start = hp.init_mlp(gen, hidden=16, dtype=F64)
    xs, ys = hp.batches(data, gen, steps=6, batch_size=16)
    x_val, y_val = data.x_val[:64], data.y_val[:64]
    meta = hp.meta_of(name, values, dtype=F64)

    res = hp.hypergradient(name, meta, start, (xs, ys), x_val, y_val, truncate=truncate)
    expected = _reference(name, meta, start, xs, ys, x_val, y_val, truncate)
    assert res.meta_grads.keys() == expected.keys() == meta.keys()
    for k in meta:
        assert expected[k].abs() > 1e-6, k  # a real signal, not two zeros
        torch.testing.assert_close(res.meta_grads[k], expected[k], rtol=1e-10, atol=1e-14)


def test_spaces_round_trip(hp):
    for name in hp.OPTIMIZERS:
        values = hp.SPACES[name].initial
        back = hp.values_of(name, hp.meta_of(name, values, dtype=F64))
        assert back == pytest.approx(values, rel=1e-12)


def test_main_smoke(hp, tmp_path, capsys):
    out = tmp_path / "out"
    summary = hp.main(["--preset", "smoke", "--json", "--output-dir", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"].keys() == summary["rows"].keys()
    assert list(printed["rows"]) == ["sgd", "adam", "adamw", "sgd_long", "sgd_truncated"]
    for row in printed["rows"].values():
        assert {"initial", "learned", "grid", "trajectory", "meta_losses", "seconds_per_iter"} <= (
            row.keys()
        )
        assert len(row["trajectory"]) == summary["config"]["meta_iters"] + 1
        for part in ("initial", "learned", "grid"):
            assert len(row[part]["values"]) == 2 and 0.0 <= row[part]["test_acc"] <= 1.0
    assert printed["rows"]["sgd_truncated"]["truncate"] == 2
    assert json.loads((out / "results.json").read_text())["rows"].keys() == printed["rows"].keys()
    assert (out / "hyperparameters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "steps must be >= 1"),
        (["--long-steps", "10", "--truncate", "10"], "truncate (10) must be < long_steps"),
        (["--optimizers", "rmsprop"], "invalid choice"),
    ],
)
def test_bad_arguments(hp, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hp.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_shows_defaults(hp, capsys):
    with pytest.raises(SystemExit):
        hp.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 50)" in text and "--output-dir" in text and "--seed" in text
