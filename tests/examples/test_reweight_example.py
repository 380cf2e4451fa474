"""examples/reweight.py (Learning to Reweight Examples): the meta-gradient per example weight
matches a hand-written autograd computation, and a short run is deterministic per seed."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from support import ROOT, load_script

from metapl import optim

_PATH = ROOT / "examples" / "reweight.py"


@pytest.fixture(scope="module")
def rw():
    yield load_script(_PATH, "reweight_example")
    sys.modules.pop("reweight_example", None)


@pytest.fixture(scope="module")
def data(rw):
    return rw.load_data(seed=0)


def _autograd_eps_grad(rw, params, lr, momentum, buf, x, y, x_meta, y_meta):
    """d meta_loss(theta') / d eps at eps = 0, with theta' one torch-style momentum SGD step."""
    eps = torch.zeros(len(y), requires_grad=True)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    inner = torch.sum(eps * F.cross_entropy(rw.forward(leaves, x), y, reduction="none"))
    grads = torch.autograd.grad(inner, list(leaves.values()), create_graph=True)
    updated = {
        k: p - lr * (momentum * buf[k] + g) for (k, p), g in zip(leaves.items(), grads, strict=True)
    }
    outer = F.cross_entropy(rw.forward(updated, x_meta), y_meta)
    (eps_grad,) = torch.autograd.grad(outer, eps)
    return eps_grad


def test_eps_grad_matches_autograd(rw, data):
    torch.manual_seed(0)
    params = rw.init_mlp(0, (64, 32, 10))
    lr, momentum = 0.05, 0.9
    opt = optim.sgd(lr, momentum=momentum)
    state = opt.init(params)

    # Two plain steps first, so the momentum buffer in the lookahead is not zero.
    def loss(p, x, y):
        return F.cross_entropy(rw.forward(p, x), y)

    for i in range(2):
        x, y = data.x_train[16 * i : 16 * (i + 1)], data.y_train[16 * i : 16 * (i + 1)]
        params, state = opt.step(params, torch.func.grad(loss)(params, x, y), state)

    x, y = data.x_train[32:64], data.y_train[32:64]
    weights, eps_grad = rw.reweight(params, opt, state, x, y, data.x_meta, data.y_meta)
    expected = _autograd_eps_grad(
        rw, params, lr, momentum, state["momentum"], x, y, data.x_meta, data.y_meta
    )
    assert eps_grad.shape == (32,)
    torch.testing.assert_close(eps_grad, expected, rtol=1e-4, atol=1e-7)
    assert (eps_grad != 0).all()

    # The clipped negative gradient, normalised to sum to one.
    positive = -expected > 0
    assert positive.any() and not positive.all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    assert (weights[~positive] == 0).all()
    torch.testing.assert_close(weights[positive], -expected[positive] / -expected[positive].sum())


def test_weights_from_grad(rw):
    torch.testing.assert_close(
        rw.weights_from_grad(torch.tensor([-1.0, 2.0, -3.0, 0.0])),
        torch.tensor([0.25, 0.0, 0.75, 0.0]),
    )
    # No example lowers the meta loss: all weights zero (not NaN), so the step is skipped.
    assert torch.equal(rw.weights_from_grad(torch.tensor([1.0, 0.0])), torch.zeros(2))


def test_short_run_is_deterministic_per_seed(rw, data):
    def run(method, seed):
        return rw.train(method, seed, steps=15, batch_size=32, hidden=32, data=data)

    for method in ("plain", "reweight"):
        a, b = run(method, 0), run(method, 0)
        assert all(torch.equal(a[k], b[k]) for k in a), method
        c = run(method, 1)
        assert not all(torch.equal(a[k], c[k]) for k in a), method


def test_load_data_split(rw, data):
    assert torch.equal(torch.bincount(data.y_meta), torch.full((10,), 10))
    noisy = (data.y_train != data.y_train_clean).float().mean().item()
    assert 0.35 < noisy < 0.45
    n = len(data.y_train) + len(data.y_meta) + len(data.y_test)
    assert n == 1797


def test_main_json(rw, capsys):
    summary = rw.main(["--steps", "3", "--seeds", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(rw.METHODS) <= out.keys() and out["seeds"] == [0]
    assert out["reweight"] == summary["reweight"]


def test_table_shows_a_spread_only_for_several_seeds(rw, capsys):
    rw.main(["--steps", "2", "--seeds", "0"])
    one, err = capsys.readouterr()
    assert "\r" not in err  # no progress bar when stderr is not a terminal (a log file)
    rw.main(["--steps", "2", "--seeds", "0", "1"])
    two = capsys.readouterr().out
    assert "±" not in one and "| plain     |" in one
    assert two.count("±") == len(rw.METHODS) + 1  # every row and the header
