"""Method specs (metapl.Exact, FiniteDifference, FirstOrder, Implicit, ScoreFunction): each
gives what its string and keywords give, against the float64 references where one exists;
its options are checked when it is built; an option given both ways is refused."""

import dataclasses
import math

import pytest
import torch
from reference import (
    F64,
    assert_close,
    flat,
    make_problem,
    mlp,
    one_thread,  # noqa: F401 (autouse fixture)
    ref_sgd,
    reference_meta_grad,
)

import metapl
from metapl import optim


def run(problem, method, steps=3, **kwargs):
    return metapl.meta_grad(
        problem.inner_loss,
        problem.outer_loss,
        problem.student,
        problem.teacher,
        optim.sgd(0.5),
        steps=steps,
        method=method,
        **kwargs,
    )


def assert_same(a, b):
    """Bitwise: a spec and its string run the same computation."""
    for x, y in zip(flat(a.meta_grads), flat(b.meta_grads), strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.outer_loss, b.outer_loss)


@pytest.mark.parametrize(
    ("spec", "name", "keywords"),
    [
        (metapl.Exact(), "exact", {}),
        (metapl.Exact(checkpoint=1), "exact", {"checkpoint": 1}),
        (metapl.Exact(checkpoint=False), "exact", {"checkpoint": False}),
        (metapl.FiniteDifference(), "finite_difference", {}),
        (metapl.FiniteDifference(radius=1e-2), "finite_difference", {"fd_radius": 1e-2}),
        (
            metapl.FiniteDifference(1e-3, checkpoint=2),
            "finite_difference",
            {"fd_radius": 1e-3, "checkpoint": 2},
        ),  # fmt: skip
    ],
)
def test_a_spec_is_its_string_with_keywords(spec, name, keywords):
    problem = make_problem(seed=1)
    assert_same(run(problem, spec), run(problem, name, **keywords))


def test_exact_spec_against_the_reference_for_every_checkpoint():
    problem = make_problem(seed=2)
    ref = reference_meta_grad(
        problem.inner_loss, problem.outer_loss, problem.student, problem.teacher, ref_sgd(0.5), 4
    )
    assert flat(ref.meta_grads).abs().max() > 1e-3
    for checkpoint in (None, True, False, 1, 3):
        res = run(problem, metapl.Exact(checkpoint=checkpoint), steps=4)
        assert_close(res.meta_grads, ref.meta_grads)


def test_the_finite_difference_radius_reaches_the_products():
    """A large radius is far from exact, a small one close: the spec's radius is the one used."""
    problem = make_problem(seed=3)
    exact = flat(run(problem, metapl.Exact()).meta_grads)
    err = {
        radius: (flat(run(problem, metapl.FiniteDifference(radius)).meta_grads) - exact).norm()
        / exact.norm()
        for radius in (1.0, 1e-5)
    }
    assert err[1e-5] < 1e-6 < 1e-3 < err[1.0]


def maml():
    gen = torch.Generator().manual_seed(4)
    theta = {"w": torch.randn(3, 4, generator=gen, dtype=F64)}
    x_s, x_q = (torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(2))
    y_s, y_q = (torch.randint(0, 3, (6,), generator=gen) for _ in range(2))

    def inner(s, m):
        return torch.nn.functional.cross_entropy(x_s @ s["w"].T, y_s)

    def outer(s):
        return torch.nn.functional.cross_entropy(x_q @ s["w"].T, y_q)

    return inner, outer, theta


def test_first_order_spec_is_its_string():
    inner, outer, theta = maml()
    args = (inner, outer, lambda m: m, theta, optim.sgd(0.3))
    for spec, keywords in ((metapl.FirstOrder(), {}), (metapl.FirstOrder(1), {"checkpoint": 1})):
        got = metapl.meta_grad(*args, steps=3, method=spec)
        want = metapl.meta_grad(*args, steps=3, method="first_order", **keywords)
        assert_same(got, want)
        assert flat(got.meta_grads).abs().max() > 1e-3


def test_implicit_spec_is_its_string_and_its_solver_is_used():
    inner, outer, theta = maml()

    def proximal(s, m):
        return inner(s, m) + 1.0 * (s["w"] - m["w"]).square().sum()

    args = (proximal, outer, lambda m: m, theta, optim.sgd(0.2))
    solver = metapl.CG(iterations=1)
    got = metapl.meta_grad(*args, steps=100, method=metapl.Implicit(solver=solver))
    want = metapl.meta_grad(*args, steps=100, method="implicit", solver=solver)
    assert_same(got, want)
    converged = metapl.meta_grad(*args, steps=100, method=metapl.Implicit())
    assert (flat(converged.meta_grads) - flat(got.meta_grads)).abs().max() > 1e-6
    assert_same(converged, metapl.meta_grad(*args, steps=100, method="implicit"))
    with pytest.raises(ValueError, match="stationary"):
        metapl.meta_grad(*args, steps=1, method=metapl.Implicit(stationary_tol=1e-12))


def score_problem():
    problem = make_problem(seed=5, n_u=6)
    y = torch.tensor([0, 2, 1, 1, 0, 2])

    def inner(s, t):
        return torch.nn.functional.cross_entropy(mlp(s, problem.x_u), y)

    def log_prob(t):
        return -torch.nn.functional.cross_entropy(mlp(t, problem.x_u), y, reduction="sum")

    return problem, inner, log_prob


@pytest.mark.parametrize("baseline", [0.0, 0.25])
def test_score_function_spec_with_log_prob_on_it_or_beside_it(baseline):
    problem, inner, log_prob = score_problem()
    args = (inner, problem.outer_loss, problem.student, problem.teacher, optim.sgd(0.5))
    want = metapl.meta_grad(
        *args, steps=2, method="score_function", log_prob=log_prob, baseline=baseline
    )
    on_spec = metapl.ScoreFunction(log_prob=log_prob, baseline=baseline)
    assert_same(metapl.meta_grad(*args, steps=2, method=on_spec), want)
    beside = metapl.ScoreFunction(baseline=baseline)
    assert_same(metapl.meta_grad(*args, steps=2, method=beside, log_prob=log_prob), want)
    assert flat(want.meta_grads).abs().max() > 1e-4
    with pytest.raises(ValueError, match="log_prob given twice"):
        metapl.meta_grad(*args, steps=2, method=on_spec, log_prob=log_prob)
    with pytest.raises(ValueError, match="needs log_prob"):
        metapl.meta_grad(*args, steps=2, method=metapl.ScoreFunction())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: metapl.FiniteDifference(radius=0.0), "radius must be a float > 0"),
        (lambda: metapl.FiniteDifference(radius=-1e-3), "radius must be a float > 0"),
        (lambda: metapl.FiniteDifference(radius=True), "radius must be a float > 0"),
        (lambda: metapl.Exact(checkpoint=0), "checkpoint must be True"),
        (lambda: metapl.FirstOrder(checkpoint=1.5), "checkpoint must be True"),
        (lambda: metapl.FiniteDifference(checkpoint=-2), "checkpoint must be True"),
        (lambda: metapl.Implicit(solver="cg"), "solver must be metapl.CG"),
        (lambda: metapl.Implicit(stationary_tol=0.0), "stationary_tol must be a float > 0"),
        (lambda: metapl.ScoreFunction(log_prob=3.0), "log_prob must be a callable"),
    ],
)
def test_a_spec_checks_its_options_when_built(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


@pytest.mark.parametrize(
    ("spec", "keyword"),
    [
        (metapl.Exact(), {"checkpoint": 2}),
        (metapl.Exact(), {"fd_radius": 1e-3}),
        (metapl.FiniteDifference(), {"fd_radius": 1e-3}),
        (metapl.FirstOrder(), {"checkpoint": True}),
        (metapl.Implicit(), {"solver": metapl.CG()}),
        (metapl.Implicit(), {"stationary_tol": math.inf}),
        (metapl.ScoreFunction(), {"baseline": 0.5}),
    ],
)
def test_an_option_beside_a_spec_is_refused(spec, keyword):
    problem = make_problem()
    with pytest.raises(ValueError, match="carries its own: set it on the spec"):
        run(problem, spec, **keyword)


def test_unknown_methods_and_misplaced_options_are_refused():
    problem = make_problem()
    with pytest.raises(TypeError, match="method must be a name or a spec"):
        run(problem, metapl.CG())
    with pytest.raises(ValueError, match="unknown method 'second_order'"):
        run(problem, "second_order")
    with pytest.raises(ValueError, match="log_prob is only used by method='score_function'"):
        run(problem, metapl.Exact(), log_prob=lambda t: t["w0"].sum())
    with pytest.raises(ValueError, match="fd_radius is only used by method='finite_difference'"):
        run(problem, "exact", fd_radius=1e-3)
    with pytest.raises(ValueError, match="truncate is only used by"):
        run(problem, metapl.Implicit(), truncate=1)
    with pytest.raises(ValueError, match="compile=True compiles"):
        run(problem, metapl.FiniteDifference(), compile=True)


def test_specs_are_frozen_values():
    spec = metapl.FiniteDifference(radius=1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.radius = 1.0
    assert spec == metapl.FiniteDifference(1e-3) != metapl.FiniteDifference()
    assert dataclasses.replace(spec, checkpoint=2).radius == 1e-3
    names = [s.name for s in (metapl.Exact, metapl.FiniteDifference, metapl.FirstOrder)]
    names += [metapl.Implicit.name, metapl.ScoreFunction.name]
    assert tuple(names) == metapl.METHODS


def test_meta_grads_is_the_result_and_teacher_grads_its_alias():
    res = run(make_problem(), "exact", steps=1)
    assert res._fields[0] == "meta_grads"
    assert res.teacher_grads is res.meta_grads
    assert res[0] is res.meta_grads
