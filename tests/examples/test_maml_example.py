"""examples/maml_sinusoid.py: a tiny end-to-end run writes its outputs, and the per-task
meta-gradients (MAML, first-order MAML, Meta-SGD) equal hand-written float64 autograd ones."""

import json
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT, load_script

from metapl.training.tracking import read_metrics

_PATH = ROOT / "examples" / "maml_sinusoid.py"
F64 = torch.float64


@pytest.fixture(scope="module")
def ms():
    yield load_script(_PATH, "maml_sinusoid_example")
    sys.modules.pop("maml_sinusoid_example", None)


def _net(p, x):
    """The MLP written out again, so the reference shares no code with the example."""
    h = torch.relu(x @ p["w0"].T + p["b0"])
    h = torch.relu(h @ p["w1"].T + p["b1"])
    return h @ p["w2"].T + p["b2"]


def _one_task(ms, seed=3):
    tasks = ms.sample_tasks(torch.Generator().manual_seed(seed), 1, 10, 10, dtype=F64)
    return tuple(t[0] for t in tasks[2:])  # x_s, y_s, x_q, y_q


def _reference(meta, x_s, y_s, x_q, y_q, lr, second_order=True):
    """d query-MSE(theta - lr * grad support-MSE(theta)) / d meta, plain torch.autograd;
    ``lr(m, name)`` is the step size of parameter ``name`` (constant, or a meta parameter)."""
    m = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    theta = {k: m[k] for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
    inner = (_net(theta, x_s) - y_s).square().mean()
    g = torch.autograd.grad(inner, list(theta.values()), create_graph=second_order)
    adapted = {k: p - lr(m, k) * gk for (k, p), gk in zip(theta.items(), g, strict=True)}
    outer = (_net(adapted, x_q) - y_q).square().mean()
    return dict(zip(m, torch.autograd.grad(outer, list(m.values())), strict=True))


@pytest.mark.parametrize("row", ["maml", "fomaml"])
def test_maml_gradient_matches_autograd(ms, row):
    cfg = ms.Config(hidden=16)
    meta = ms.init_meta(row, cfg, F64)
    task = _one_task(ms)
    got = ms.task_meta_grad(row, cfg, meta, *task).meta_grads
    expected = _reference(meta, *task, lr=lambda m, k: cfg.inner_lr, second_order=row == "maml")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if row == "maml":  # the second-order terms are not negligible here
        first = _reference(meta, *task, lr=lambda m, k: cfg.inner_lr, second_order=False)
        assert max((got[k] - first[k]).abs().max() for k in got) > 1e-4


def test_meta_sgd_gradient_matches_autograd(ms):
    cfg = ms.Config(hidden=16)
    meta = ms.init_meta("meta_sgd", cfg, F64)
    gen = torch.Generator().manual_seed(1)
    meta.update(
        {
            k: v + 0.01 * torch.rand(v.shape, generator=gen, dtype=F64)
            for k, v in meta.items()
            if k.startswith("lr_")
        }
    )
    task = _one_task(ms)
    got = ms.task_meta_grad("meta_sgd", cfg, meta, *task).meta_grads
    expected = _reference(meta, *task, lr=lambda m, k: m[f"lr_{k}"])
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _bn_net(p, x, stats, training):
    """The BatchNorm MLP written out again: batch statistics in training, folded into the
    running ones as a cumulative average (unbiased variance); running ones otherwise."""
    h = torch.relu(x @ p["w0"].T + p["b0"]) @ p["w1"].T
    if training:
        mean, var = h.mean(0), h.var(0, unbiased=False)
        c = stats[2] + 1
        stats = (
            stats[0] + (mean.detach() - stats[0]) / c,
            stats[1] + (h.detach().var(0) - stats[1]) / c,
            c,
        )
    else:
        mean, var = stats[0], stats[1]
    h = (h - mean) / torch.sqrt(var + 1e-5) * p["bn_weight"] + p["bn_bias"]
    return torch.relu(h) @ p["w2"].T + p["b2"], stats


def test_maml_bn_gradient_and_statistics_match_autograd(ms):
    """Two inner steps carry the running statistics (state=); the query is scored in eval
    mode with them, so they reach the meta-gradient."""
    cfg = ms.Config(hidden=16, bn_steps=2)
    meta = ms.init_meta("maml_bn", cfg, F64)
    x_s, y_s, x_q, y_q = _one_task(ms)
    res = ms.task_meta_grad("maml_bn", cfg, meta, x_s, y_s, x_q, y_q)
    m = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    s, stats = dict(m), (torch.zeros(16, dtype=F64), torch.ones(16, dtype=F64), 0)
    for _ in range(2):
        out, stats = _bn_net(s, x_s, stats, training=True)
        g = torch.autograd.grad((out - y_s).square().mean(), list(s.values()), create_graph=True)
        s = {k: p - cfg.inner_lr * gk for (k, p), gk in zip(s.items(), g, strict=True)}
    outer = (_bn_net(s, x_q, stats, training=False)[0] - y_q).square().mean()
    expected = dict(zip(m, torch.autograd.grad(outer, list(m.values())), strict=True))
    torch.testing.assert_close(res.meta_grads, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.state["mean"], stats[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.state["var"], stats[1], rtol=1e-12, atol=1e-14)
    assert res.state["count"] == 2


def test_main_tiny_run_writes_outputs(ms, tmp_path, capsys):
    argv = [
        "--iterations",
        "3",
        "--meta-batch",
        "4",
        "--hidden",
        "8",
        "--test-tasks",
        "6",
        "--test-points",
        "20",
        "--imaml-steps",
        "2",
        "--bn-steps",
        "2",
        "--log-every",
        "2",
        "--no-compile",
        "--output-dir",
        str(tmp_path / "out"),
        "--figure-copy",
        str(tmp_path / "copy.png"),
        "--json",
    ]
    returned = ms.main(argv)
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads((tmp_path / "out" / "results.json").read_text())
    assert out["rows"].keys() == set(ms.ROWS) and out["config"]["iterations"] == 3
    for row, r in out["rows"].items():
        assert len(r["mse"]) == len(r["ci95"]) == 11, row
        assert all(v >= 0 for v in r["mse"][:2]) and r["seconds"] >= 0
        assert r["mse"] == returned["rows"][row]["mse"]
        config, records = read_metrics(tmp_path / "out" / row)
        assert [r["step"] for r in records] == [2, 3] and config["row"] == row
    assert Path(out["figure"]).stat().st_size > 0 and (tmp_path / "copy.png").stat().st_size > 0
    ms.main(argv)  # run again into the same folder: each row's records are replaced, not appended
    capsys.readouterr()
    for row in ms.ROWS:
        config, records = read_metrics(tmp_path / "out" / row)
        assert [r["step"] for r in records] == [2, 3] and config["row"] == row


def test_evaluate_shapes(ms):
    cfg = ms.Config(hidden=8, test_tasks=5, test_points=30, test_steps=3)
    tasks = ms.held_out_tasks(cfg)
    assert tasks.x_support.shape == (5, 10, 1) and tasks.x_query.shape == (5, 30, 1)
    mses, preds = ms.evaluate("maml", cfg, ms.init_meta("maml", cfg), tasks)
    assert mses.shape == (5, 4) and preds.shape == (5, 4, 30, 1)
    torch.testing.assert_close(mses, (preds - tasks.y_query[:, None]).square().mean((2, 3)))


@pytest.mark.parametrize("flag", ["--iterations", "--meta-batch", "--test-tasks"])
def test_bad_input_is_a_one_line_error(ms, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        ms.main([flag, "0"])
    assert exc.value.code == 2
    name = flag.removeprefix("--").replace("-", "_")
    assert f"error: {name} must be > 0, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_meta_step_equals_eager(ms):
    cfg = ms.Config(hidden=8, meta_batch=4)
    meta_opt = ms.optim.adam(cfg.meta_lr)
    meta = ms.init_meta("maml", cfg)
    state = meta_opt.init(meta)
    t = ms.sample_tasks(torch.Generator().manual_seed(0), 4, 10, 10)
    step = ms.make_meta_step("maml", cfg, meta_opt)
    batch = (t.x_support, t.y_support, t.x_query, t.y_query)
    eager = step(meta, state, *batch)
    compiled = torch.compile(step, fullgraph=True)(meta, state, *batch)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-7)
