"""metapl.implicit_grad around solutions found by any means (LBFGS, a torch.optim loop, a
closed form), against closed forms; the solvers' safety (Neumann's step, stationarity)."""

import math

import pytest
import torch
from reference import (
    F64,
    assert_close,
    one_thread,  # noqa: F401 (autouse fixture)
    rel_err,
)
from reference import ridge as make_ridge

import metapl


def ridge(seed=0, n=40, d=5):
    """The ridge problem of tests/reference.py and its closed-form hypergradient."""
    r = make_ridge(seed, n, d, log_lam=-1.0, center_scale=0.3)
    return r.meta, r.inner, r.outer, r.closed_form, r.hypergradient()


def lbfgs_solution(inner, meta, d=5):
    w = torch.zeros(d, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=200,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = inner({"w": w}, meta)
        loss.backward()
        return loss

    opt.step(closure)
    return {"w": w.detach()}


def torch_optim_solution(inner, meta, d=5, steps=2000):
    w = torch.zeros(d, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5, momentum=0.5)
    for _ in range(steps):
        opt.zero_grad()
        inner({"w": w}, meta).backward()
        opt.step()
    return {"w": w.detach()}


@pytest.mark.parametrize("found_by", ["closed form", "LBFGS", "torch.optim SGD"])
@pytest.mark.parametrize(
    "solver", [metapl.CG(), metapl.Neumann(iterations=300)], ids=["cg", "neumann"]
)
def test_implicit_grad_at_a_solution_found_by_any_means(found_by, solver):
    meta, inner, outer, closed_form, expected = ridge()
    solution = {
        "closed form": lambda: {k: v.detach() for k, v in closed_form(meta).items()},
        "LBFGS": lambda: lbfgs_solution(inner, meta),
        "torch.optim SGD": lambda: torch_optim_solution(inner, meta),
    }[found_by]()
    res = metapl.implicit_grad(inner, outer, solution, meta, solver=solver)
    if found_by == "LBFGS":
        # LBFGS stops at a gradient norm of ~1e-8 here (its line search sees no further
        # decrease in float64), 8e-9 from the minimiser: the hypergradient is that accurate.
        assert rel_err(res.meta_grads, expected) < 1e-7
    else:
        assert_close(res.meta_grads, expected, rtol=1e-8, atol=1e-11)
    assert_close(res.student_params, solution, rtol=0, atol=0)
    assert res.outer_loss.item() == pytest.approx(outer(solution).item(), rel=1e-14)
    assert res.opt_state is None


def test_method_implicit_is_implicit_grad_after_the_unroll():
    meta, inner, outer, _, expected = ridge(1)
    start = {"w": torch.zeros(5, dtype=F64)}
    res = metapl.meta_grad(
        inner, outer, start, meta, metapl.optim.sgd(0.5), steps=500, method="implicit"
    )
    direct = metapl.implicit_grad(inner, outer, res.student_params, meta)
    assert_close(res.meta_grads, direct.meta_grads, rtol=0, atol=0)
    assert_close(res.meta_grads, expected, rtol=1e-8, atol=1e-11)


def test_outer_loss_with_meta_parameters():
    meta, inner, outer, closed_form, _ = ridge(2)

    def outer_m(s, m):
        return outer(s) + 0.1 * m["center"].square().sum()

    m = {k: v.clone().requires_grad_() for k, v in meta.items()}
    expected = dict(
        zip(m, torch.autograd.grad(outer_m(closed_form(m), m), list(m.values())), strict=True)
    )
    solution = {k: v.detach() for k, v in closed_form(meta).items()}
    res = metapl.implicit_grad(inner, outer_m, solution, meta)
    assert_close(res.meta_grads, expected, rtol=1e-9, atol=1e-12)


def test_a_clearly_non_stationary_solution_is_refused():
    meta, inner, outer, closed_form, _ = ridge(3)
    early = torch_optim_solution(inner, meta, steps=3)
    with pytest.raises(ValueError, match="stationary point of the inner loss.*stationary_tol"):
        metapl.implicit_grad(inner, outer, early, meta)
    # accepted when asked to, and then (of course) not the closed form's gradient
    loose = metapl.implicit_grad(inner, outer, early, meta, stationary_tol=math.inf)
    assert all(torch.isfinite(v).all() for v in loose.meta_grads.values())
    # an unroll that stopped early is refused the same way
    with pytest.raises(ValueError, match="solve the inner problem further"):
        metapl.meta_grad(
            inner,
            outer,
            {"w": torch.zeros(5, dtype=F64)},
            meta,
            metapl.optim.sgd(0.1),
            steps=3,
            method="implicit",
        )


def test_neumann_picks_a_safe_step_and_a_diverging_one_names_it():
    """The ridge Hessian's largest eigenvalue is 3.6 here, so the old default alpha=1 lies
    beyond 2 / lambda_max: its series diverged silently."""
    meta, inner, outer, closed_form, expected = ridge(4, n=40, d=5)
    meta["log_lam"] = torch.tensor(0.7, dtype=F64)  # lam ~ 2
    solution = {k: v.detach() for k, v in closed_form(meta).items()}
    m = {k: v.clone().requires_grad_() for k, v in meta.items()}
    grads = torch.autograd.grad(outer(closed_form(m)), list(m.values()))
    expected = dict(zip(m, grads, strict=True))
    auto = metapl.implicit_grad(inner, outer, solution, meta, solver=metapl.Neumann(300))
    assert_close(auto.meta_grads, expected, rtol=1e-8, atol=1e-11)
    hessian = torch.func.hessian(lambda w: inner({"w": w}, meta))(solution["w"])
    lam_max = torch.linalg.eigvalsh(hessian).max().item()
    assert lam_max > 2  # alpha = 1 is unsafe
    with pytest.raises(ValueError, match="diverged with alpha=1.0") as info:
        metapl.implicit_grad(inner, outer, solution, meta, solver=metapl.Neumann(100, alpha=1.0))
    assert f"Neumann(alpha={1 / lam_max:.3g})" in str(info.value)
    safe = metapl.Neumann(300, alpha=1 / lam_max)
    assert_close(
        metapl.implicit_grad(inner, outer, solution, meta, solver=safe).meta_grads,
        expected,
        rtol=1e-8,
        atol=1e-11,
    )


def test_neumann_power_iteration_estimates_the_largest_eigenvalue():
    h = torch.diag(torch.tensor([0.5, 1.0, 3.0, 7.0], dtype=F64))
    v = torch.ones(4, dtype=F64)
    estimate = metapl.Neumann(power_iterations=60).largest_eigenvalue(lambda u: h @ u, v)
    assert estimate.item() == pytest.approx(7.0, rel=1e-6)
    damped = metapl.Neumann(power_iterations=60, damping=1.0).largest_eigenvalue(lambda u: h @ u, v)
    assert damped.item() == pytest.approx(8.0, rel=1e-6)


def test_cg_and_neumann_agree_under_vmap():
    """Neither solver branches on data under vmap (CG runs all iterations; Neumann with
    alpha=None picks its step by power iteration, a pure tensor computation)."""
    meta, inner, outer, closed_form, _ = ridge(5)
    centers = torch.stack([meta["center"], meta["center"] + 0.5, meta["center"] - 0.5])

    def one(center, solver):
        m = {"log_lam": meta["log_lam"], "center": center}
        solution = {k: v.detach() for k, v in closed_form(m).items()}
        return metapl.implicit_grad(inner, outer, solution, m, solver=solver).meta_grads

    for solver in (metapl.CG(), metapl.Neumann(300)):
        batched = torch.func.vmap(lambda c, solver=solver: one(c, solver))(centers)
        for i in range(3):
            assert rel_err({k: v[i] for k, v in batched.items()}, one(centers[i], solver)) < 1e-10


def test_solver_and_argument_errors_name_the_fix():
    meta, inner, outer, closed_form, _ = ridge(6)
    solution = {k: v.detach() for k, v in closed_form(meta).items()}
    with pytest.raises(ValueError, match="alpha > 0"):
        metapl.Neumann(alpha=-1.0)
    with pytest.raises(ValueError, match="iterations >= 1"):
        metapl.CG(iterations=0)
    with pytest.raises(ValueError, match="damping >= 0"):
        metapl.CG(damping=-1.0)
    with pytest.raises(TypeError, match=r"solver must be metapl.CG\(...\) or metapl.Neumann"):
        metapl.implicit_grad(inner, outer, solution, meta, solver="cg")
    with pytest.raises(TypeError, match="solution must be a dict of tensors"):
        metapl.implicit_grad(inner, outer, {"w": [1.0]}, meta)
    with pytest.raises(ValueError, match="stationary_tol must be a float > 0"):
        metapl.implicit_grad(inner, outer, solution, meta, stationary_tol=0)
