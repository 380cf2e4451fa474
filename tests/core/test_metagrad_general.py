"""meta_grad with meta parameters everywhere: the start (MAML), the inner loss, the optimizer's
hyperparameters (learned lr / momentum / weight decay / betas, Meta-SGD) and the outer loss,
against the plain-autograd float64 unroll in tests/reference.py, closed forms and each other."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from reference import (
    ALL_PATHS_SIZES,
    F64,
    REFERENCE,
    RefOptimizer,
    all_paths_data,
    all_paths_losses,
    assert_close,
    flat,
    init_mlp,
    mlp,
    one_thread,  # noqa: F401 (autouse fixture)
    reference_general,
    rel_err,
    ridge,
)

import metapl
from metapl import optim
from metapl.metagrad import unrolled


def everywhere_problem(kind, seed=0):
    """Meta parameters in all four places at once: the start (``w*``/``b*``), example weights
    in the inner loss (``t``), the optimizer's hyperparameters (``log_lr`` and ``mom`` or
    ``beta1`` / ``wd``) and an outer penalty (``reg``)."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(seed)
    meta = init_mlp(ALL_PATHS_SIZES, gen)
    keys = list(meta)
    meta["t"] = torch.randn(len(y_u), generator=gen, dtype=F64)
    meta["log_lr"] = torch.tensor(-1.2 if kind == "sgd" else -2.5, dtype=F64)
    meta["reg"] = torch.tensor(0.3, dtype=F64)
    if kind == "sgd":
        meta["mom"] = torch.tensor(0.7, dtype=F64)
    else:
        meta["beta1"], meta["wd"] = torch.tensor(0.8, dtype=F64), torch.tensor(0.05, dtype=F64)

    start, inner, outer = all_paths_losses(keys, x_u, y_u, x_l, y_l)

    def hyper(m):
        if kind == "sgd":
            return {"lr": m["log_lr"].exp(), "momentum": m["mom"]}
        return {
            "lr": m["log_lr"].exp(),
            "betas": (m["beta1"], 0.999),
            "eps": 1e-3,
            "weight_decay": m["wd"],
        }

    def metapl_opt(m):
        return getattr(optim, kind)(**hyper(m))

    def ref_opt(m):
        return REFERENCE[kind](**hyper(m))

    return meta, start, inner, outer, metapl_opt, ref_opt


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("engine", ["autograd", "reverse", "forward"])
def test_exact_through_every_path_matches_reference(kind, steps, engine):
    res, (grads, outer_grads, s, st, loss) = exact_and_reference(
        everywhere_problem(kind, seed=steps), steps, engine, late=("mom", "beta1")
    )
    if kind == "sgd":
        assert_close(res.opt_state["momentum"], st["momentum"], rtol=1e-12, atol=1e-14)


def exact_and_reference(problem, steps: int, engine: str, late: tuple[str, ...]):
    """The engines of "exact" (plain autograd through the kept unroll, eager's default; the
    step-by-step reverse pass, which ``reduce`` selects as vmap and compile do; and that pass
    with forward-over-reverse curvature) against the reference on ``problem = (meta, start,
    inner, outer, opt, ref_opt)``; every meta parameter must carry a signal (those in
    ``late`` act from step 2 on). Returns the result and the reference's ``(grads,
    outer_grads, student, opt_state, loss)``."""
    meta, start, inner, outer, opt, ref_opt = problem
    kw = {
        "autograd": {},
        "reverse": {"reduce": lambda tree: tree},
        "forward": {"curvature": "forward"},
    }[engine]
    with mock.patch.object(unrolled, "unrolled", wraps=unrolled.unrolled) as spy:
        res = metapl.meta_grad(inner, outer, start, meta, opt, steps=steps, **kw)
    assert spy.call_count == (engine == "autograd")
    ref = reference_general(inner, outer, start, ref_opt, meta, steps)
    grads, outer_grads, s, _, loss = ref
    for k in grads:
        assert grads[k].abs().max() > 1e-4 or (k in late and steps == 1), k
    assert_close(res.meta_grads, grads, rtol=1e-10, atol=1e-13)
    assert_close(res.outer_grads, outer_grads, rtol=1e-10, atol=1e-13)
    assert_close(res.student_params, s, rtol=1e-12, atol=1e-14)
    assert res.outer_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    return res, ref


def test_plain_autograd_only_where_it_composes():
    """Eager "exact" calls take the segmented autograd engine, also for unrolls longer than
    ``checkpoint`` keeps; vmap, torch.compile and reduce take the reverse pass."""
    theta, xs, ys, xq, yq = tasks()
    with mock.patch.object(unrolled, "unrolled", wraps=unrolled.unrolled) as spy:
        sinusoid_maml(theta, xs[0], ys[0], xq[0], yq[0], steps=2)
        sinusoid_maml(theta, xs[0], ys[0], xq[0], yq[0], steps=6)  # > checkpoint's 5
        assert spy.call_count == 2
        torch.func.vmap(lambda *t: sinusoid_maml(theta, *t).meta_grads)(xs, ys, xq, yq)
        sinusoid_maml(theta, xs[0], ys[0], xq[0], yq[0], method="first_order")
        assert spy.call_count == 2


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_finite_difference_through_every_path(kind):
    """Same reverse pass, second-order products by central differences at radius 1e-6: error
    O(r^2) + O(eps_mach / r) ~ 1e-10 relative (see test_metagrad's finite-difference test)."""
    meta, start, inner, outer, opt, ref_opt = everywhere_problem(kind, seed=4)
    res = metapl.meta_grad(
        inner, outer, start, meta, opt, steps=3, method="finite_difference", fd_radius=1e-6
    )
    grads, *_ = reference_general(inner, outer, start, ref_opt, meta, 3)
    assert rel_err(res.meta_grads, grads) < 1e-8


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_first_order_drops_exactly_the_second_order_terms(kind):
    meta, start, inner, outer, opt, ref_opt = everywhere_problem(kind, seed=5)
    res = metapl.meta_grad(inner, outer, start, meta, opt, steps=3, method="first_order")
    grads, outer_grads, *_ = reference_general(
        inner, outer, start, ref_opt, meta, 3, first_order=True
    )
    exact, *_ = reference_general(inner, outer, start, ref_opt, meta, 3)
    assert_close(res.meta_grads, grads, rtol=1e-10, atol=1e-13)
    assert_close(res.outer_grads, outer_grads, rtol=1e-10, atol=1e-13)
    assert res.meta_grads["t"].abs().max() == 0  # the inner-loss path is purely second order
    assert rel_err(res.meta_grads, exact) > 1e-3  # and it is a different (cheaper) gradient


def test_first_order_maml_is_the_outer_gradient_at_the_adapted_student():
    """FOMAML (Finn et al. 2017, Sec. 5.2): with SGD from s_0 = theta, the first-order
    meta-gradient is grad outer(s_K)."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(1)
    theta = init_mlp(ALL_PATHS_SIZES, gen)

    def inner(s, m):
        return F.cross_entropy(mlp(s, x_u), y_u)

    def outer(s):
        return F.cross_entropy(mlp(s, x_l), y_l)

    res = metapl.meta_grad(
        inner, outer, lambda m: m, theta, optim.sgd(0.4), steps=2, method="first_order"
    )
    adapted = {k: v.clone().requires_grad_() for k, v in res.student_params.items()}
    expected = torch.autograd.grad(outer(adapted), list(adapted.values()))
    assert_close(res.meta_grads, dict(zip(adapted, expected, strict=True)), 1e-12, 1e-14)


@pytest.mark.parametrize("method", ["exact", "exact-forward", "first_order"])
@pytest.mark.parametrize("truncate", [1, 2, 4])
def test_truncated_backpropagation(method, truncate):
    meta, start, inner, outer, opt, ref_opt = everywhere_problem("sgd", seed=6)
    spec = metapl.Exact(curvature="forward") if method == "exact-forward" else method
    res = metapl.meta_grad(inner, outer, start, meta, opt, steps=4, method=spec, truncate=truncate)
    grads, *_ = reference_general(
        inner,
        outer,
        start,
        ref_opt,
        meta,
        4,
        truncate=truncate,
        first_order=method == "first_order",
    )
    assert_close(res.meta_grads, grads, rtol=1e-10, atol=1e-13)
    if truncate < 4:  # the start is cut off
        full, *_ = reference_general(inner, outer, start, ref_opt, meta, 4)
        assert rel_err(res.meta_grads, full) > 1e-3


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize(("checkpoint", "recomputed"), [(True, 3), (2, 2), (3, 1), (False, 0)])
def test_kept_graphs_give_the_same_numbers_with_fewer_recomputations(kind, checkpoint, recomputed):
    """K=4 steps: the reverse pass evaluates the inner loss again for every step whose graph
    was not kept (checkpoint=True keeps the last one, n the last n, False all)."""
    meta, start, inner, outer, opt, ref_opt = everywhere_problem(kind, seed=3)
    reference = reference_general(inner, outer, start, ref_opt, meta, 4)[0]
    calls = []

    def counted(s, m):
        calls.append(None)
        return inner(s, m)

    res = metapl.meta_grad(counted, outer, start, meta, opt, steps=4, checkpoint=checkpoint)
    assert_close(res.meta_grads, reference, rtol=1e-10, atol=1e-13)
    assert len(calls) == 4 + recomputed


def test_truncate_all_steps_is_exact():
    meta, start, inner, outer, opt, _ = everywhere_problem("adamw", seed=2)
    a = metapl.meta_grad(inner, outer, start, meta, opt, steps=3)
    b = metapl.meta_grad(inner, outer, start, meta, opt, steps=3, truncate=3)
    assert_close(a.meta_grads, b.meta_grads, rtol=0, atol=0)


def test_inner_batches_feed_step_k_its_own_slice():
    gen, *_ = all_paths_data(7)
    steps, xs = 3, torch.randn(3, 6, 3, generator=gen, dtype=F64)
    ys = torch.randint(0, 3, (3, 6), generator=gen)
    x_l, y_l = torch.randn(5, 3, generator=gen, dtype=F64), torch.randint(0, 3, (5,), generator=gen)
    theta = init_mlp(ALL_PATHS_SIZES, gen)
    teacher = {"log_w": torch.randn(6, generator=gen, dtype=F64)}  # per-slot example weights

    def inner(s, m, batch):
        per_example = F.cross_entropy(mlp(s, batch["x"]), batch["y"], reduction="none")
        return (m["log_w"].exp() * per_example).mean()

    def outer(s, m):
        return F.cross_entropy(mlp(s, x_l), y_l)

    batches = {"x": xs, "y": ys}
    res = metapl.meta_grad(
        inner,
        lambda s: outer(s, None),
        theta,
        teacher,
        optim.sgd(0.3, momentum=0.9),
        steps=steps,
        inner_batches=batches,
    )
    grads, _, s, *_ = reference_general(
        inner,
        outer,
        lambda m: theta,
        lambda m: REFERENCE["sgd"](0.3, momentum=0.9),
        teacher,
        steps,
        batches=batches,
    )
    assert_close(res.meta_grads, grads, rtol=1e-10, atol=1e-13)
    assert_close(res.student_params, s, rtol=1e-12, atol=1e-14)
    # Feeding every step the first slice gives another answer: the slices are really used.
    same = {k: v[:1].expand_as(v) for k, v in batches.items()}
    other = metapl.meta_grad(
        inner,
        lambda s: outer(s, None),
        theta,
        teacher,
        optim.sgd(0.3),
        steps=steps,
        inner_batches=same,
    )
    assert rel_err(other.meta_grads, grads) > 1e-2


def test_meta_sgd_per_parameter_learning_rates():
    """Meta-SGD (Li et al. 2017): s_1 = theta - alpha ∘ grad, with theta and the per-entry
    rates alpha both meta parameters."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(8)
    theta = init_mlp(ALL_PATHS_SIZES, gen)
    meta = {
        **theta,
        **{
            f"lr_{k}": 0.1 + 0.2 * torch.rand(v.shape, generator=gen, dtype=F64)
            for k, v in theta.items()
        },
    }

    def start(m):
        return {k: m[k] for k in theta}

    def inner(s, m):
        return F.cross_entropy(mlp(s, x_u), y_u)

    def outer(s, m):
        return F.cross_entropy(mlp(s, x_l), y_l)

    def metapl_opt(m):
        return optim.sgd({k: m[f"lr_{k}"] for k in theta})

    def ref_opt(m):  # written out: p - alpha ∘ g
        return RefOptimizer(
            lambda p: {}, lambda p, g, st: ({k: p[k] - m[f"lr_{k}"] * g[k] for k in p}, st)
        )

    for steps in (1, 2):
        res = metapl.meta_grad(inner, outer, start, meta, metapl_opt, steps=steps)
        grads, *_ = reference_general(inner, outer, start, ref_opt, meta, steps)
        assert all(grads[f"lr_{k}"].abs().max() > 1e-4 for k in theta)
        assert_close(res.meta_grads, grads, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- implicit


def ridge_problem(seed=0, n=20, d=4):
    r = ridge(seed, n, d, log_lam=-0.5, center_scale=1.0)
    return r.meta, r.inner, r.outer, r.closed_form, r.x


@pytest.mark.parametrize(
    "solver", [metapl.CG(), metapl.Neumann(iterations=400, alpha=0.5), metapl.CG(damping=0.0)]
)
def test_implicit_matches_the_ridge_closed_form(solver):
    meta, inner, outer, closed_form, x = ridge_problem()
    m = {k: v.clone().requires_grad_() for k, v in meta.items()}
    loss = outer(closed_form(m))
    expected = dict(zip(m, torch.autograd.grad(loss, list(m.values())), strict=True))
    start = {"w": torch.zeros(x.shape[1], dtype=F64)}
    # 400 gradient steps at lr 0.5 converge to ~1e-15 here (the stationarity IFT assumes).
    res = metapl.meta_grad(
        inner, outer, start, meta, optim.sgd(0.5), steps=400, method="implicit", solver=solver
    )
    assert_close(res.student_params, closed_form(meta), rtol=1e-12, atol=1e-13)
    assert_close(res.meta_grads, expected, rtol=1e-9, atol=1e-12)


def test_implicit_damping_changes_the_solution():
    meta, inner, outer, _, x = ridge_problem(seed=1)
    start = {"w": torch.zeros(x.shape[1], dtype=F64)}
    plain = metapl.meta_grad(
        inner, outer, start, meta, optim.sgd(0.5), steps=100, method="implicit"
    )
    damped = metapl.meta_grad(
        inner,
        outer,
        start,
        meta,
        optim.sgd(0.5),
        steps=100,
        method="implicit",
        solver=metapl.CG(damping=10.0),
    )
    assert rel_err(damped.meta_grads, plain.meta_grads) > 0.1


def test_implicit_imaml_matches_a_long_exact_unroll():
    """iMAML (Rajeswaran et al. 2019): inner = task loss + lam/2 ||s - theta||^2, s_0 = theta.
    A nonlinear task: logistic regression. The exact gradient through K steps converges to the
    implicit one as the inner problem converges."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(9, n_u=30, n_l=30)
    theta = init_mlp([3, 3], gen)

    def inner(s, m):
        proximal = sum((s[k] - m[k]).square().sum() for k in s)
        return F.cross_entropy(mlp(s, x_u), y_u) + 0.5 * proximal

    def outer(s):
        return F.cross_entropy(mlp(s, x_l), y_l)

    implicit = metapl.meta_grad(
        inner, outer, lambda m: m, theta, optim.sgd(0.5), steps=200, method="implicit"
    )
    exact = metapl.meta_grad(inner, outer, lambda m: m, theta, optim.sgd(0.5), steps=200)
    assert flat(implicit.meta_grads).abs().max() > 1e-3
    assert rel_err(exact.meta_grads, implicit.meta_grads) < 1e-8


# --------------------------------------------------------------------------- transforms


def sinusoid_maml(theta, x_s, y_s, x_q, y_q, steps=2, method="exact"):
    def inner(s, m):
        return (mlp(s, x_s) - y_s).square().mean()

    def outer(s):
        return (mlp(s, x_q) - y_q).square().mean()

    return metapl.meta_grad(
        inner, outer, lambda m: m, theta, optim.sgd(0.1), steps=steps, method=method
    )


def tasks(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=gen)
    phase = 3.1 * torch.rand(n, 1, 1, generator=gen)
    x = 10 * torch.rand(n, 20, 1, generator=gen, dtype=F64) - 5
    y = amp * torch.sin(x + phase)
    theta = init_mlp([1, 8, 1], gen)
    return theta, x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


@pytest.mark.parametrize(
    "method", ["exact", metapl.Exact(curvature="forward"), "first_order", "finite_difference"]
)
def test_vmap_over_tasks_equals_a_loop(method):
    theta, xs, ys, xq, yq = tasks()
    batched = torch.func.vmap(
        lambda a, b, c, d: sinusoid_maml(theta, a, b, c, d, method=method).meta_grads
    )(xs, ys, xq, yq)
    for i in range(len(xs)):
        one = sinusoid_maml(theta, xs[i], ys[i], xq[i], yq[i], method=method).meta_grads
        assert_close({k: v[i] for k, v in batched.items()}, one, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curvature", ["reverse", "forward"])
def test_maml_compiles_and_matches_eager(curvature):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    theta, xs, ys, xq, yq = tasks(seed=1)
    spec = metapl.Exact(curvature=curvature)
    compiled = torch.compile(sinusoid_maml, backend=counter, fullgraph=True)
    for i in range(2):
        got = compiled(theta, xs[i], ys[i], xq[i], yq[i], method=spec)
        expected = sinusoid_maml(theta, xs[i], ys[i], xq[i], yq[i])  # reverse, eager
        assert rel_err(got.meta_grads, expected.meta_grads) < 1e-10
    assert counter.frame_count == 1


def meta_sgd_problem(seed=8):
    """Meta-SGD: the start and a per-parameter learning-rate dict are both meta parameters."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(seed)
    theta = init_mlp(ALL_PATHS_SIZES, gen)
    meta = {
        **theta,
        **{
            f"lr_{k}": 0.1 + 0.2 * torch.rand(v.shape, generator=gen, dtype=F64)
            for k, v in theta.items()
        },
    }

    def run(m, steps=2):
        return metapl.meta_grad(
            lambda s, m_: F.cross_entropy(mlp(s, x_u), y_u),
            lambda s: F.cross_entropy(mlp(s, x_l), y_l),
            lambda m_: {k: m_[k] for k in theta},
            m,
            lambda m_: optim.sgd({k: m_[f"lr_{k}"] for k in theta}),
            steps=steps,
        ).meta_grads

    return meta, run


@pytest.mark.slow  # about a minute of compilation on the 2-core CPU
def test_meta_sgd_compiles_and_matches_eager():
    """A per-parameter learning-rate dict inside torch.compile (it once failed to trace)."""
    torch._dynamo.reset()
    meta, run = meta_sgd_problem()
    compiled = torch.compile(run, fullgraph=True)
    assert rel_err(compiled(meta), run(meta)) < 1e-10


def test_implicit_compiles_and_matches_eager():
    """method="implicit" inside torch.compile (its early-stopping check once broke tracing)."""
    torch._dynamo.reset()
    meta, inner, outer, _, x = ridge_problem(seed=2)
    start = {"w": torch.zeros(x.shape[1], dtype=F64)}

    def run(m):
        return metapl.meta_grad(
            inner,
            outer,
            start,
            m,
            optim.sgd(0.5),
            steps=3,
            method="implicit",
            solver=metapl.CG(iterations=4),
            stationary_tol=math.inf,
        ).meta_grads  # far from converged

    compiled = torch.compile(run, fullgraph=True)
    assert rel_err(compiled(meta), run(meta)) < 1e-10


# --------------------------------------------------------------------------- errors


def test_unsupported_combinations_name_the_fix():
    meta, start, inner, outer, opt, _ = everywhere_problem("sgd")
    fixed = start(meta)
    teacher = {"t": meta["t"]}
    inner_t = lambda s, m: inner(s, {**meta, **m})  # noqa: E731
    outer_1 = lambda s: outer(s, meta)  # noqa: E731
    with pytest.raises(ValueError, match="hyperparameters have no effect"):
        metapl.meta_grad(inner, outer, start, meta, opt, method="implicit")
    with pytest.raises(ValueError, match="truncate is only used by method='exact' or"):
        metapl.meta_grad(
            inner_t, outer_1, fixed, teacher, optim.sgd(0.1), steps=2, method="implicit", truncate=1
        )
    with pytest.raises(ValueError, match="leading dimension of steps=2"):
        metapl.meta_grad(
            lambda s, m, b: inner_t(s, m),
            outer_1,
            fixed,
            teacher,
            optim.sgd(0.1),
            steps=2,
            inner_batches={"x": torch.zeros(3, 4)},
        )
    with pytest.raises(TypeError, match=r"inner_loss must take \(student, meta, batch\)"):
        metapl.meta_grad(
            inner_t,
            outer_1,
            fixed,
            teacher,
            optim.sgd(0.1),
            steps=2,
            inner_batches={"x": torch.zeros(2, 4)},
        )
    for bad in (0, "2", 1.5):
        with pytest.raises(ValueError, match="checkpoint must be True .* or an int n >= 1"):
            metapl.meta_grad(inner_t, outer_1, fixed, teacher, optim.sgd(0.1), checkpoint=bad)
    with pytest.raises(ValueError, match=r"truncate must be an int in \[1, steps=2\]"):
        metapl.meta_grad(inner_t, outer_1, fixed, teacher, optim.sgd(0.1), steps=2, truncate=3)
    with pytest.raises(TypeError, match=r"outer_loss must take \(student\) or \(student, meta\)"):
        metapl.meta_grad(inner_t, lambda s, m, x: 0, fixed, teacher, optim.sgd(0.1))
    with pytest.raises(ValueError, match="solver is only used by method='implicit'"):
        metapl.meta_grad(inner_t, outer_1, fixed, teacher, optim.sgd(0.1), solver=metapl.CG())
    with pytest.raises(ValueError, match="score_function' estimates the gradient through sampled"):
        metapl.meta_grad(
            inner, outer, start, meta, opt, method="score_function", log_prob=lambda m: m["t"].sum()
        )


def test_compile_steps_once_for_every_unroll_length():
    """compile=True: one graph per step function, reused for every step, every K and new
    data; the numbers equal eager (float64)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for steps, method, seed in [(2, "exact", 0), (5, "exact", 1), (3, "first_order", 2)]:
        meta, start, inner, outer, opt, _ = everywhere_problem("sgd", seed=seed)
        eager = metapl.meta_grad(inner, outer, start, meta, opt, steps=steps, method=method)
        compiled = metapl.meta_grad(
            inner, outer, start, meta, opt, steps=steps, method=method, compile=True
        )
        assert_close(compiled.meta_grads, eager.meta_grads, rtol=1e-10, atol=1e-13)
        assert_close(compiled.student_params, eager.student_params, rtol=1e-12, atol=1e-14)
    # Per method one forward and one pullback graph, whatever K and the data.
    assert counters["stats"]["unique_graphs"] == 4
    assert not counters["graph_break"]


def test_options_a_method_ignores_are_refused():
    """Each was silently ignored before (fd_radius by exact, ...)."""
    meta, start, inner, outer, opt, _ = everywhere_problem("sgd")
    cases = [
        ({"fd_radius": 1e-3}, "fd_radius is only used by method='finite_difference', not 'exact'"),
        ({"baseline": 0.5}, "baseline is only used by method='score_function', not 'exact'"),
        ({"stationary_tol": 1e-3}, "stationary_tol is only used by method='implicit'"),
        (
            {"method": "implicit", "checkpoint": 2, "optimizer": optim.sgd(0.1)},
            "checkpoint is only used by .* not 'implicit'",
        ),
        (
            {
                "method": "score_function",
                "truncate": 1,
                "log_prob": lambda m: m["t"].sum(),
                "student_params": {k: meta[k] for k in ("w0", "b0", "w1", "b1")},
                "outer_loss": lambda s: outer(s, meta),
                "optimizer": optim.sgd(0.1),
            },
            "truncate is only used by .* not 'score_function'",
        ),
    ]
    for kwargs, message in cases:
        args = {
            "inner_loss": inner,
            "outer_loss": outer,
            "student_params": start,
            "teacher_params": meta,
            "optimizer": opt,
            "steps": 2,
            **kwargs,
        }
        with pytest.raises(ValueError, match=message):
            metapl.meta_grad(**args)


@pytest.mark.parametrize("method", ["exact", "finite_difference", "first_order"])
def test_truncation_that_leaves_no_path_to_the_meta_parameters_is_refused(method):
    """MAML (the meta parameters are the start only) with truncate < K: the start is cut off
    and the result was all zeros, silently."""
    theta, xs, ys, xq, yq = tasks()

    def inner(s, m):
        return (mlp(s, xs[0]) - ys[0]).square().mean()

    def outer(s):
        return (mlp(s, xq[0]) - yq[0]).square().mean()

    with pytest.raises(ValueError, match="would be (all )?zero"):
        metapl.meta_grad(
            inner, outer, lambda m: m, theta, optim.sgd(0.1), steps=3, truncate=2, method=method
        )
    # with a learned rate the truncated gradient is defined (and not zero)
    meta = {**theta, "log_lr": torch.tensor(-2.0, dtype=F64)}
    res = metapl.meta_grad(
        inner,
        outer,
        lambda m: {k: m[k] for k in theta},
        meta,
        lambda m: optim.sgd(m["log_lr"].exp()),
        steps=3,
        truncate=2,
        method=method,
    )
    assert res.meta_grads["log_lr"].abs() > 0
    # and so is the full one
    full = metapl.meta_grad(
        inner, outer, lambda m: m, theta, optim.sgd(0.1), steps=3, method=method
    )
    assert flat(full.meta_grads).abs().max() > 0


def test_finite_difference_assumes_no_stop_gradient_in_the_inner_loss():
    """Meta-Weight-Net (Shu et al. 2019): example weights from a net over the *detached*
    per-example losses. Exact differentiates the inner gradient as autograd defines it (the
    weights' input is a constant); finite differences evaluate the gradient at perturbed
    students, where the weights move with the losses, so they estimate another derivative:
    far from exact here. The docs say so; use exact (or first_order) for such inner losses."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(10, n_u=12)
    theta = init_mlp(ALL_PATHS_SIZES, gen)
    weighter = {"v": torch.randn(4, generator=gen, dtype=F64), "c": torch.tensor(0.1, dtype=F64)}

    def weights(losses, m):  # a tiny scorer of each example's loss
        features = torch.stack(
            [losses, losses**2, torch.ones_like(losses), torch.sqrt(losses + 1)], -1
        )
        return torch.sigmoid(features @ m["v"] + m["c"])

    def inner(s, m):
        losses = F.cross_entropy(mlp(s, x_u), y_u, reduction="none")
        return (weights(losses.detach(), m) * losses).mean()

    def outer(s):
        return F.cross_entropy(mlp(s, x_l), y_l)

    exact = metapl.meta_grad(inner, outer, theta, weighter, optim.sgd(0.5), steps=2)
    reference, *_ = reference_general(
        inner, lambda s, m: outer(s), lambda m: theta, lambda m: REFERENCE["sgd"](0.5), weighter, 2
    )
    assert_close(exact.meta_grads, reference, rtol=1e-10, atol=1e-13)
    fd = metapl.meta_grad(
        inner,
        outer,
        theta,
        weighter,
        optim.sgd(0.5),
        steps=2,
        method="finite_difference",
        fd_radius=1e-6,
    )
    assert rel_err(fd.meta_grads, reference) > 0.1
