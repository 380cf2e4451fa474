"""MPL(compile=True) computes what the eager step computes, and compiles once.

Compiled code draws other random numbers than eager code, so the comparisons have no dropout
(inductor's dropout draws another stream even with ``fallback_random``), and the one with sampled
labels sets inductor's ``fallback_random`` (eager's ``rand_like`` inside the compiled graph).
With dropout, a compiled run is checked against itself: same seed, same result.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from test_mpl import assert_tree_close, buffers, make_batch, mlp, params, uda_for
from torch._dynamo.utils import counters

import metapl
from metapl import optim

F32 = torch.float32
TOL = {"rtol": 1e-5, "atol": 1e-6}
F64_TOL = {"rtol": 1e-9, "atol": 1e-11}


def build(
    meta_grad, pseudo_labels, compile, *, bn=True, dropout=0.0, uda=True, dtype=F32, **kwargs
):
    teacher = mlp(seed=1, bn=bn, dropout=dropout, dtype=dtype)
    student = mlp(seed=2, bn=bn, dropout=dropout, dtype=dtype)
    return metapl.MPL(
        teacher,
        student,
        optim.sgd(0.2, momentum=0.9, weight_decay=1e-3),
        optim.sgd(
            optim.warmup_cosine(0.5, total_steps=10, warmup_steps=2),
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
        ),
        meta_grad=meta_grad,
        pseudo_labels=pseudo_labels,
        uda=uda_for(ramp_steps=4) if uda else None,
        label_smoothing=0.1,
        compile=compile,
        temperature=0.8,
        ema_decay=0.9,
        **kwargs,
    )


def run(mpl: metapl.MPL, steps=3, no_recompile=False, seed=0, n_mpl=0):
    """``steps`` steps on fixed batches (with an MPL batch of ``n_mpl`` rows); with
    ``no_recompile`` every step after the first must reuse the first step's graph."""
    dtype = next(mpl.teacher.parameters()).dtype
    torch.manual_seed(seed)
    metrics = []
    for k in range(steps):
        guard = (
            torch._dynamo.config.patch(error_on_recompile=True)
            if no_recompile and k > 0
            else contextlib.nullcontext()
        )
        with guard:
            batch = make_batch(k, dtype=dtype, n_mpl=n_mpl)
            metrics.append(mpl.step(*batch.args(), mpl_batch=batch.mpl_batch))
    return metrics


def assert_same_run(compiled: metapl.MPL, eager: metapl.MPL, m_compiled, m_eager, tol=TOL):
    for net in ("teacher", "student", "ema_student"):
        got, expected = getattr(compiled, net), getattr(eager, net)
        assert_tree_close(params(got), params(expected), **tol, path=net)
        assert_tree_close(buffers(got), buffers(expected), **tol, path=net)
    assert_tree_close(
        compiled.state.teacher.opt, eager.state.teacher.opt, **tol, path="teacher_state"
    )
    assert_tree_close(
        compiled.state.student.opt, eager.state.student.opt, **tol, path="student_state"
    )
    assert_tree_close(_counters(compiled), _counters(eager), **tol, path="counters")
    for got, expected in zip(m_compiled, m_eager, strict=True):
        assert sorted(got) == sorted(expected)
        for k in expected:
            assert got[k] == pytest.approx(expected[k], rel=10 * tol["rtol"], abs=tol["atol"]), k


def compare(meta_grad, pseudo_labels, tol=TOL, n_mpl=0, **kwargs):
    torch._dynamo.reset()
    counters.clear()
    compiled = build(meta_grad, pseudo_labels, compile=True, **kwargs)
    m_compiled = run(compiled, no_recompile=True, n_mpl=n_mpl)
    assert counters["stats"]["unique_graphs"] == 1  # one graph, compiled once for all steps
    eager = build(meta_grad, pseudo_labels, compile=False, **kwargs)
    m_eager = run(eager, n_mpl=n_mpl)
    assert_same_run(compiled, eager, m_compiled, m_eager, tol)
    # the run is not trivial: the weights moved
    start = params(mlp(seed=1, bn=True))
    assert (params(eager.teacher)["0.weight"] - start["0.weight"]).abs().max() > 1e-3


def test_compiled_exact_step_equals_eager():
    compare("exact", "soft")


@pytest.mark.slow
def test_compiled_forward_curvature_step_equals_eager():
    compare("exact", "soft", curvature="forward")


@pytest.mark.slow
def test_compiled_finite_difference_step_equals_eager():
    # float64: a float32 central difference amplifies rounding beyond float32 tolerances
    compare("finite_difference", "soft", tol=F64_TOL, dtype=torch.float64)


@pytest.mark.slow
def test_compiled_step_with_a_separate_mpl_batch_equals_eager():
    compare("exact", "soft", n_mpl=6)


@pytest.mark.slow
def test_compiled_step_without_dropout_in_the_mpl_signal_equals_eager():
    compare("exact", "soft", mpl_dropout=False)


@pytest.mark.slow
def test_compiled_no_meta_grad_step_equals_eager():
    compare(None, "soft")


@pytest.mark.slow
def test_compiled_step_with_the_student_on_the_weak_view_equals_eager():
    compare("exact", "soft", student_view="weak")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, torch.float64], ids=["float32", "float64"])
def test_compiled_first_order_step_equals_eager_with_eager_random_numbers(dtype):
    tol = TOL if dtype == F32 else F64_TOL
    with torch._inductor.config.patch(fallback_random=True):
        compare("first_order", "hard", tol=tol, dtype=dtype, h_baseline_decay=0.9)


@pytest.mark.slow
def test_compiled_step_with_dropout_is_seed_deterministic():
    mpl = build("first_order", "hard", compile=True, dropout=0.2, h_baseline_decay=0.9)
    start = mpl.state_dict()
    ends = []
    for seed in (0, 0, 1):
        mpl.load_state_dict(start)
        # loading a state_dict must not recompile either
        recompile = torch._dynamo.config.patch(error_on_recompile=True)
        with recompile if ends else contextlib.nullcontext():
            run(mpl, steps=2, seed=seed, no_recompile=True)
        ends.append(params(mpl.teacher) | params(mpl.student))
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    assert not all(torch.equal(ends[0][k], ends[2][k]) for k in ends[0])


def _counters(mpl) -> dict:
    return {"step": mpl.state.step, "h_baseline": mpl.state.h_baseline}
