"""examples/distill.py (dataset distillation): the example's hypergradient for the synthetic
images and the learning rate equals a hand-written float64 autograd unroll (no metapl in the
reference), the vmap over inits equals a loop, and a smoke run writes its outputs."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from reference import one_thread  # noqa: F401  (fixture: single-threaded module)
from support import ROOT, load_script

_PATH = ROOT / "examples" / "distill.py"
F64 = torch.float64


@pytest.fixture(scope="module")
def ds():
    yield load_script(_PATH, "distill_example")
    sys.modules.pop("distill_example", None)


@pytest.fixture(scope="module")
def problem(ds):
    data = ds.load_data(0, dtype=F64)
    cfg = ds.Config(per_class=2, hidden=16, initial_lr=0.3)
    meta = ds.initial_meta(cfg, seed=0, dtype=F64)
    labels = ds.synthetic_labels(cfg.per_class)
    gen = torch.Generator().manual_seed(3)
    starts = [ds.init_mlp(gen, cfg.hidden, dtype=F64) for _ in range(3)]
    return meta, labels, starts, data.x_train[:64], data.y_train[:64]


def _mlp(p, x):
    return torch.relu(x @ p["w0"].T + p["b0"]) @ p["w1"].T + p["b1"]


def _reference(meta, start, labels, x_real, y_real, steps):
    """d real_loss / d (images, log_lr) through K hand-written SGD steps (create_graph)."""
    m = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    p = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    for _ in range(steps):
        loss = F.cross_entropy(_mlp(p, m["images"]), labels)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        p = {k: w - m["log_lr"].exp() * g for (k, w), g in zip(p.items(), grads, strict=True)}
    outer = F.cross_entropy(_mlp(p, x_real), y_real)
    return dict(zip(m, torch.autograd.grad(outer, list(m.values())), strict=True))


def test_hypergradient_matches_autograd_unroll(ds, problem):
    meta, labels, starts, x_real, y_real = problem
    res = ds.hypergradient(meta, starts[0], labels, x_real, y_real, steps=8)
    expected = _reference(meta, starts[0], labels, x_real, y_real, steps=8)
    assert res.meta_grads["images"].shape == (20, 64)
    assert expected["images"].abs().max() > 1e-4 and expected["log_lr"].abs() > 1e-6
    for k in ("images", "log_lr"):
        torch.testing.assert_close(res.meta_grads[k], expected[k], rtol=1e-10, atol=1e-14)


def test_vmap_over_inits_is_the_mean_of_a_loop(ds, problem):
    meta, labels, starts, x_real, y_real = problem
    stacked = {k: torch.stack([s[k] for s in starts]) for k in starts[0]}
    grads, loss = ds.batched_hypergradient(meta, stacked, labels, x_real, y_real, steps=4)
    loop = [ds.hypergradient(meta, s, labels, x_real, y_real, steps=4) for s in starts]
    for k in meta:
        mean = torch.stack([r.meta_grads[k] for r in loop]).mean(0)
        torch.testing.assert_close(grads[k], mean, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss, torch.stack([r.outer_loss for r in loop]).mean())


def test_real_subset_is_class_cyclic(ds):
    data = ds.load_data(0)
    x, y = ds.real_subset(data, torch.Generator().manual_seed(0), per_class=3)
    assert torch.equal(y, ds.synthetic_labels(3)) and x.shape == (30, 64)


def test_main_smoke(ds, tmp_path, capsys):
    out = tmp_path / "out"
    summary = ds.main(["--preset", "smoke", "--per-class", "2", "--json", "--output-dir", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["rows"]) == list(ds.ROWS) == list(summary["rows"])
    for row in printed["rows"].values():
        assert {"mean", "std", "runs", "lr"} <= row.keys() and len(row["runs"]) == 2
        assert 0.0 <= row["mean"] <= 1.0
    assert len(printed["meta_losses"]) == 3 and printed["learned_lr"] > 0
    assert (out / "distill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(out / "distilled.pt")["images"].shape == (20, 64)
    assert json.loads((out / "results.json").read_text())["rows"].keys() == printed["rows"].keys()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "steps must be >= 1"),
        (["--meta-lr", "-1"], "meta_lr must be > 0"),
        (["--per-class", "x"], "--per-class: invalid literal for int()"),
    ],
)
def test_bad_arguments(ds, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ds.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_shows_defaults(ds, capsys):
    with pytest.raises(SystemExit):
        ds.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 20)" in text and "--per-class" in text and "--output-dir" in text
    with pytest.raises(SystemExit):
        ds.main(["--preset", "smoke", "--help"])
    assert "(default: 3)" in capsys.readouterr().out  # the preset's steps
