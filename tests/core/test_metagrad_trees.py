"""Nested trees everywhere: the student, the meta parameters, per-parameter hyperparameters,
the state and every result may be nested dicts / lists / tuples of tensors, and come back in
the caller's structure, with the same numbers as the flat-dict call (itself checked against
the float64 references in tests/reference.py)."""

import pytest
import torch
import torch.nn.functional as F
from reference import (
    F64,
    RefOptimizer,
    assert_close,
    init_mlp,
    mlp,
    one_thread,  # noqa: F401 (autouse fixture)
    reference_general,
)
from torch.func import vmap

import metapl
from metapl import optim


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_u, x_l = (
        torch.randn(7, 3, generator=gen, dtype=F64),
        torch.randn(5, 3, generator=gen, dtype=F64),
    )
    y_u, y_l = torch.randint(0, 3, (7,), generator=gen), torch.randint(0, 3, (5,), generator=gen)
    theta = init_mlp([3, 5, 3], gen)
    alpha = {k: 0.1 + 0.2 * torch.rand(v.shape, generator=gen, dtype=F64) for k, v in theta.items()}
    return theta, alpha, x_u, y_u, x_l, y_l


def as_layers(flat):
    """The flat ``w0, b0, w1, b1`` as a list of ``(weight, bias)`` tuples."""
    return [(flat["w0"], flat["b0"]), (flat["w1"], flat["b1"])]


def layers_mlp(layers, x):
    return mlp({"w0": layers[0][0], "b0": layers[0][1], "w1": layers[1][0], "b1": layers[1][1]}, x)


def test_meta_sgd_with_nested_meta_parameters_matches_the_reference():
    """The docs' Meta-SGD: ``{"theta": {...}, "alpha": {...}}``, the start m["theta"] and one
    learned rate per entry, m["alpha"], a dict shaped like the student."""
    theta, alpha, x_u, y_u, x_l, y_l = data()
    meta = {"theta": theta, "alpha": alpha}

    def inner(s, m):
        return F.cross_entropy(mlp(s, x_u), y_u)

    def outer(s):
        return F.cross_entropy(mlp(s, x_l), y_l)

    res = metapl.meta_grad(
        inner, outer, lambda m: m["theta"], meta, lambda m: optim.sgd(m["alpha"]), steps=2
    )
    flat = {**theta, **{f"lr_{k}": v for k, v in alpha.items()}}
    expected, outer_grads, s, *_ = reference_general(
        lambda s_, m: inner(s_, m),
        lambda s_, m: outer(s_),
        lambda m: {k: m[k] for k in theta},
        lambda m: RefOptimizer(
            lambda p: {}, lambda p, g, st: ({k: p[k] - m[f"lr_{k}"] * g[k] for k in p}, st)
        ),
        flat,
        2,
    )
    nested = {
        "theta": {k: expected[k] for k in theta},
        "alpha": {k: expected[f"lr_{k}"] for k in theta},
    }
    assert_close(res.meta_grads, nested, rtol=1e-10, atol=1e-13)
    assert res.meta_grads.keys() == {"theta", "alpha"}
    assert_close(res.outer_grads, outer_grads, rtol=1e-10, atol=1e-13)
    assert_close(res.student_params, s, rtol=1e-12, atol=1e-14)


METHODS = ["exact", "exact-reverse", "exact-forward", "finite_difference", "first_order"]


def run(method, student, meta, start, inner, outer, opt, steps=3):
    kwargs = {"reduce": lambda t: t} if method == "exact-reverse" else {}
    if method == "exact-forward":
        kwargs["curvature"] = "forward"
    if method == "finite_difference":
        kwargs["fd_radius"] = 1e-6
    name = method.removesuffix("-reverse").removesuffix("-forward")
    return metapl.meta_grad(
        inner, outer, start if start else student, meta, opt, steps=steps, method=name, **kwargs
    )


@pytest.mark.parametrize("method", METHODS)
def test_a_list_of_tuples_student_equals_the_flat_dict(method):
    """The student as ``[(w0, b0), (w1, b1)]``, the meta parameters as a tuple ``(t, log_lr)``
    (example weights in the inner loss, a learned rate): same numbers as the flat dicts."""
    theta, _, x_u, y_u, x_l, y_l = data(1)
    t, log_lr = torch.linspace(-1, 1, 7, dtype=F64), torch.tensor(-1.0, dtype=F64)

    def inner_flat(s, m):
        return (torch.sigmoid(m["t"]) * F.cross_entropy(mlp(s, x_u), y_u, reduction="none")).mean()

    def inner_nested(s, m):
        per_example = F.cross_entropy(layers_mlp(s, x_u), y_u, reduction="none")
        return (torch.sigmoid(m[0]) * per_example).mean()

    flat = run(
        method,
        theta,
        {"t": t, "log_lr": log_lr},
        None,
        inner_flat,
        lambda s: F.cross_entropy(mlp(s, x_l), y_l),
        lambda m: optim.sgd(m["log_lr"].exp(), momentum=0.5),
    )
    nested = run(
        method,
        as_layers(theta),
        (t, log_lr),
        None,
        inner_nested,
        lambda s: F.cross_entropy(layers_mlp(s, x_l), y_l),
        lambda m: optim.sgd(m[1].exp(), momentum=0.5),
    )
    assert isinstance(nested.meta_grads, tuple) and len(nested.meta_grads) == 2
    assert isinstance(nested.student_params, list)
    assert all(isinstance(layer, tuple) for layer in nested.student_params)
    assert isinstance(nested.opt_state["momentum"], list)
    assert_close(
        nested.meta_grads,
        (flat.meta_grads["t"], flat.meta_grads["log_lr"]),
        rtol=1e-12,
        atol=1e-15,
    )
    assert_close(nested.student_params, as_layers(flat.student_params), rtol=1e-13, atol=1e-15)
    if flat.outer_grads is not None:
        assert_close(nested.outer_grads, as_layers(flat.outer_grads), rtol=1e-12, atol=1e-15)


def test_nested_trees_under_vmap_equal_a_loop():
    theta, _, x_u, y_u, x_l, y_l = data(2)
    xs = torch.stack([x_u, x_u + 0.3, x_u - 0.2])
    meta = {"start": as_layers(theta)}

    def one(x):
        return metapl.meta_grad(
            lambda s, m: F.cross_entropy(layers_mlp(s, x), y_u),
            lambda s: F.cross_entropy(layers_mlp(s, x_l), y_l),
            lambda m: m["start"],
            meta,
            optim.sgd(0.3),
            steps=2,
        ).meta_grads

    batched = vmap(one)(xs)
    for i in range(len(xs)):
        loop = one(xs[i])
        got = {"start": [tuple(leaf[i] for leaf in layer) for layer in batched["start"]]}
        assert_close(got, loop, rtol=1e-10, atol=1e-13)


def test_score_function_and_implicit_return_the_callers_structure():
    theta, _, x_u, y_u, x_l, y_l = data(3)
    z = [torch.randn(7, 3, dtype=F64)]
    target = torch.randint(0, 3, (7,))
    res = metapl.meta_grad(
        lambda s, m: F.cross_entropy(layers_mlp(s, x_u), target),
        lambda s: F.cross_entropy(layers_mlp(s, x_l), y_l),
        as_layers(theta),
        z,
        optim.sgd(0.2),
        method="score_function",
        log_prob=lambda m: F.log_softmax(m[0], -1).gather(-1, target[:, None]).sum(),
    )
    assert isinstance(res.meta_grads, list) and res.meta_grads[0].shape == (7, 3)
    # implicit at a ridge solution given as a tuple
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 4, generator=gen, dtype=F64), torch.randn(30, generator=gen, dtype=F64)
    meta = {"lam": {"log": torch.tensor(-0.3, dtype=F64)}}

    def inner(s, m):
        w, b = s
        fit = (x @ w + b - y).square().mean() / 2
        return fit + m["lam"]["log"].exp() / 2 * w.square().sum()

    def solve(log_lam):
        a = torch.cat([x, torch.ones(30, 1, dtype=F64)], 1)
        reg = torch.diag(torch.tensor([1.0] * 4 + [0.0], dtype=F64)) * log_lam.exp()
        wb = torch.linalg.solve(a.T @ a / 30 + reg, a.T @ y / 30)
        return wb[:4], wb[4]

    def outer(s):
        return (x[:10] @ s[0] + s[1] - 1).square().mean()

    solution = tuple(v.detach() for v in solve(meta["lam"]["log"]))
    got = metapl.implicit_grad(inner, outer, solution, meta)
    log_lam = meta["lam"]["log"].clone().requires_grad_()
    (expected,) = torch.autograd.grad(outer(solve(log_lam)), [log_lam])
    assert isinstance(got.meta_grads["lam"], dict)
    torch.testing.assert_close(got.meta_grads["lam"]["log"], expected, rtol=1e-9, atol=1e-12)
    assert isinstance(got.student_params, tuple) and isinstance(got.outer_grads, tuple)


def test_structure_mismatches_name_the_leaves():
    theta, alpha, x_u, y_u, x_l, y_l = data(4)
    alpha.pop("b1")
    with pytest.raises(ValueError, match=r"missing \['b1'\]"):
        metapl.meta_grad(
            lambda s, m: F.cross_entropy(mlp(s, x_u), y_u),
            lambda s: F.cross_entropy(mlp(s, x_l), y_l),
            lambda m: m["theta"],
            {"theta": theta, "alpha": alpha},
            lambda m: optim.sgd(m["alpha"]),
        )
