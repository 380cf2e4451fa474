"""Property tests (hypothesis): random shapes, hyperparameters and step counts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    F64,
    REFERENCE,
    assert_close,
    flat,
    make_problem,
    one_thread,  # noqa: F401 (autouse fixture)
    reference_meta_grad,
)

import metapl
from metapl import optim

lrs = st.floats(1e-3, 0.5)
weight_decays = st.sampled_from([0.0, 1e-2, 0.3])
betas = st.tuples(st.floats(0.0, 0.95), st.floats(0.5, 0.999))


@st.composite
def optimizers(draw):
    """(kind, hyperparameters) valid for metapl, torch.optim and the reference alike."""
    kind = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    hyper = {"lr": draw(lrs), "weight_decay": draw(weight_decays)}
    if kind == "sgd":
        hyper["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        hyper["nesterov"] = hyper["momentum"] > 0 and draw(st.booleans())
    else:  # eps >= 1e-4 keeps one Adam step away from sign descent (meta-gradient ~ 0)
        hyper |= {"betas": draw(betas), "eps": draw(st.sampled_from([1e-4, 1e-3, 1e-1]))}
    return kind, hyper


problems = st.builds(
    make_problem,
    seed=st.integers(0, 2**16),
    d_in=st.integers(1, 4),
    hidden=st.integers(1, 5),
    classes=st.integers(2, 4),
    n_u=st.integers(1, 6),
    n_l=st.integers(1, 5),
    teacher_hidden=st.sampled_from([None, 2, 5]),
)


@settings(max_examples=60, deadline=None, derandomize=True)  # the same examples in every run
@given(problem=problems, opt=optimizers(), steps=st.integers(1, 3))
def test_exact_and_finite_difference_match_reference(problem, opt, steps):
    kind, hyper = opt
    ref = reference_meta_grad(
        problem.inner_loss,
        problem.outer_loss,
        problem.student,
        problem.teacher,
        REFERENCE[kind](**hyper),
        steps,
    )
    # Norm-wise relative error with a small absolute floor for near-vanishing meta-gradients
    # (the finite difference's rounding error, ~1e-16 * |grad| / fd_radius, does not shrink
    # with them). That error is taken along the adjoint of the inner gradient, which Adam's
    # step g / (sqrt(v) + eps) amplifies by up to lr / eps where |g| ~ eps (hypothesis found
    # 8e-10 at lr 0.5, eps 1e-4, beta1 0 for a meta-gradient of norm 1e-5). Worst seen over
    # 2000 examples: 7e-13 (exact) and 5e-6 (finite_difference).
    fd_floor = 1e-10 * max(1.0, hyper["lr"] / hyper.get("eps", 1.0))
    for method, kwargs, rtol, atol in (
        ("exact", {}, 1e-9, 1e-14),
        ("exact", {"reduce": lambda tree: tree}, 1e-9, 1e-14),  # the step-by-step reverse pass
        ("finite_difference", {"fd_radius": 1e-6}, 1e-5, fd_floor),
    ):
        res = metapl.meta_grad(
            problem.inner_loss,
            problem.outer_loss,
            problem.student,
            problem.teacher,
            getattr(optim, kind)(**hyper),
            steps=steps,
            method=method,
            **kwargs,
        )
        error = (flat(res.meta_grads) - flat(ref.meta_grads)).norm()
        assert error <= rtol * flat(ref.meta_grads).norm() + atol, method
        assert_close(res.student_params, ref.student_params, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(opt=optimizers(), seed=st.integers(0, 2**16), shape=st.sampled_from([(1,), (3,), (2, 3)]))
def test_optimizers_match_torch_optim(opt, seed, shape):
    kind, hyper = opt
    torch_opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    gen = torch.Generator().manual_seed(seed)
    params = {"p": torch.randn(shape, generator=gen, dtype=F64)}
    leaf = params["p"].clone()
    ref = torch_opt[kind]([leaf], **hyper)
    metapl_opt = getattr(optim, kind)(**hyper)
    state = metapl_opt.init(params)
    for _ in range(5):
        grad = torch.randn(shape, generator=gen, dtype=F64)
        params, state = metapl_opt.step(params, {"p": grad}, state)
        leaf.grad = grad.clone()
        ref.step()
        torch.testing.assert_close(params["p"], leaf, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(problem=problems, opt=optimizers(), steps=st.integers(1, 3))
def test_exact_and_finite_difference_match_reference_many(problem, opt, steps):
    test_exact_and_finite_difference_match_reference.hypothesis.inner_test(problem, opt, steps)
