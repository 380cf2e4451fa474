"""Meta-gradients: the gradient of an outer loss through differentiable inner training steps.

The student starts at ``s_0 = start(m)`` and takes ``steps`` optimizer steps on
``inner_loss(s, m[, state][, batch_k])``; the outer loss is evaluated at the final student.
``meta_grad`` returns d outer / d m, the meta parameters ``m`` reaching the outer loss through
every path at once: the start (MAML), the inner loss (MPL's teacher, reweighting, iMAML's
proximal term), the optimizer's hyperparameters (learned learning rates, Meta-SGD) and the
outer loss itself. ``implicit_grad`` differentiates a solution found by any means. See
docs/meta_gradients.md for the math, cost and memory of each method.

BatchNorm and other buffers: pass them as ``state=`` (a tree of tensors carried through the
steps, never differentiated). The inner loss then takes the state and returns
``(loss, new_state)``; each evaluation receives its own copy, so a module that updates its
running statistics in place may do so, and the statistics advance once per inner step::

    def inner_loss(s, m, state):
        logits = torch.func.functional_call(model, {**s, **state}, (x_u,))
        return loss_fn(logits, m), state      # the copy, updated by BatchNorm

    res = meta_grad(inner_loss, outer_loss, s, m, opt, steps=10,
                    state=dict(model.named_buffers()))
    res.state                                 # the statistics after the 10 steps
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

from torch import Tensor

from metapl import _tree as tree
from metapl.metagrad import unrolled
from metapl.metagrad.check import (
    check_arguments,
    check_tree,
    check_truncation_reaches_meta,
    explained_batchnorm_errors,
)
from metapl.metagrad.curvature import for_method
from metapl.metagrad.implicit import CG, Neumann, Solver, implicit_at
from metapl.metagrad.methods import (
    Exact,
    FiniteDifference,
    FirstOrder,
    Implicit,
    MethodSpec,
    ScoreFunction,
    method_spec,
)
from metapl.metagrad.problem import NO_STATE, Schedule, make_problem, positional_arity, scalar_loss
from metapl.metagrad.reverse import reverse, run_forward
from metapl.metagrad.score import score_function
from metapl.optim import Optimizer, State

Tree = Any  # a dict of tensors, or nested dicts / lists / tuples of tensors
Method = Literal["exact", "finite_difference", "first_order", "implicit", "score_function"]
METHODS: tuple[str, ...] = get_args(Method)
DEFAULT_STATIONARY_TOL = Implicit.stationary_tol

__all__ = [
    "CG",
    "METHODS",
    "Exact",
    "FiniteDifference",
    "FirstOrder",
    "Implicit",
    "Method",
    "MetaGradResult",
    "MethodSpec",
    "Neumann",
    "ScoreFunction",
    "implicit_grad",
    "meta_grad",
]


class MetaGradResult(NamedTuple):
    meta_grads: Tree  # d outer / d teacher_params (the meta parameters), same structure
    student_params: Tree  # the student after the inner steps (detached)
    opt_state: State | None  # the optimizer state after the inner steps (None: implicit_grad)
    outer_loss: Tensor  # 0-d, the outer loss at the final student
    inner_aux: Any = None  # has_aux=True: aux of the first inner evaluation (at s_0)
    h: Tensor | None = None  # score_function: outer(s_K) - outer(s_0), before the baseline
    outer_grads: Tree | None = None  # d outer / d s_K (None for score_function)
    state: Tree | None = None  # state=: the carried state after the K steps

    @property
    def teacher_grads(self) -> Tree:
        """``meta_grads`` under MPL's name (the teacher's parameters are its meta parameters)."""
        return self.meta_grads


def meta_grad(
    inner_loss: Callable[..., Tensor | tuple[Tensor, Any]],
    outer_loss: Callable[..., Tensor],
    student_params: Tree | Callable[[Tree], Tree],
    teacher_params: Tree,
    optimizer: Optimizer | Callable[[Tree], Optimizer],
    opt_state: State | None = None,
    steps: int = 1,
    method: Method | MethodSpec = "exact",
    log_prob: Callable[[Tree], Tensor] | None = None,
    *,
    state: Tree | None = None,
    inner_batches: Any = None,
    truncate: int | None = None,
    has_aux: bool = False,
    fd_radius: float | None = None,
    baseline: float | Tensor | None = None,
    solver: Solver | None = None,
    stationary_tol: float | None = None,
    reduce: Callable[[Tree], Tree] | None = None,
    checkpoint: bool | int | None = None,
    curvature: Literal["reverse", "forward"] | None = None,
    compile: bool = False,
) -> MetaGradResult:
    """Gradient of ``outer_loss(s_K[, m])`` with respect to the meta parameters
    ``m = teacher_params``, where ``s_0 = student_params(m)`` (or the tree itself) and
    ``s_{k+1}, st_{k+1} = optimizer(m).step(s_k, grad_s inner_loss(s_k, m[, batch_k]), st_k)``.

    Trees: the student, the meta parameters, the state and per-parameter hyperparameters may
    be dicts of tensors or nested dicts / lists / tuples of them; every result comes back in
    the caller's structure.

    Args:
        inner_loss: ``(student, meta) -> 0-d`` the student trains on; with ``inner_batches``,
            ``(student, meta, batch_k)``; with ``state``, ``(student, meta, state[, batch_k])
            -> (loss, new_state)``.
        outer_loss: ``(student) -> 0-d`` or ``(student, meta) -> 0-d``, after the inner steps;
            with ``state``, ``(student, state)`` or ``(student, meta, state)`` with the state
            after the K steps.
        student_params: the starting student, a tree of tensors, or a callable
            ``meta -> tree`` (MAML: ``lambda m: m``; gradients then flow into the start).
        teacher_params: the meta parameters, a tree of tensors (not modified).
        optimizer: a ``metapl.optim`` optimizer, or a callable ``meta -> optimizer`` whose
            tensor hyperparameters (0-d tensors, or per-parameter trees shaped like the
            student: Meta-SGD) are functions of the meta parameters. ``opt_state`` defaults
            to ``optimizer.init(s_0)``.
        steps: number of inner steps K >= 1.
        method: a spec carrying its own options, or its name (the spec with its defaults,
            the options then given as the keywords below): ``Exact(checkpoint)`` /
            ``"exact"`` (reverse mode through the steps, second order; memory-lean by
            checkpointing), ``FiniteDifference(radius, checkpoint)`` /
            ``"finite_difference"`` (the same reverse pass with the second-order products
            taken by central differences of first-order gradients at ``s ± eps a``, each
            perturbation of norm ``radius``, as in DARTS; it assumes the inner loss has no
            stop-gradient: a ``.detach()`` of something that depends on the student changes
            its answer, not exact's), ``FirstOrder(checkpoint)`` / ``"first_order"`` (the
            reverse pass with the second-order terms dropped: first-order MAML and its
            analogue for the optimizer's hyperparameters), ``Implicit(solver,
            stationary_tol)`` / ``"implicit"`` (the implicit function theorem at the final
            student: ``implicit_grad`` after the unroll) or ``ScoreFunction(log_prob,
            baseline)`` / ``"score_function"`` (REINFORCE for inner losses on sampled
            targets: ``(outer(s_K) - outer(s_0) - baseline) * grad log_prob(m)``; what MPL
            calls "first order").
        log_prob: the score function's ``(meta) -> 0-d`` log-probability of the sampled
            targets the inner loss used (here or on the ``ScoreFunction`` spec).
        state: a tree of tensors carried through the steps and never differentiated
            (BatchNorm running statistics: ``dict(model.named_buffers())``). Each evaluation
            of a loss receives a fresh copy (in-place updates are safe); a step recomputed
            in the reverse pass sees the state it saw going forward; ``result.state`` is the
            state after the K steps. Under ``vmap``, pass one state per task (batched).
        inner_batches: a tree whose leaves have leading dimension K; step k's inner loss
            receives slice k as its last argument.
        truncate: differentiate through the last ``truncate`` steps only (truncated
            backpropagation; the start then gets no gradient). Default: all K.
        has_aux: ``inner_loss`` returns ``(loss, aux)``; the aux of its first evaluation comes
            back as ``result.inner_aux`` (not with ``state``).
        fd_radius, baseline, solver, stationary_tol, checkpoint, curvature: with a method name only
            (a spec carries its own): ``FiniteDifference.radius`` (default 3e-4: within 1% of
            exact on a WRN-28-2 student in float32; see benchmarks/fd_radius.py),
            ``ScoreFunction.baseline`` (a control variate subtracted from ``h = outer(s_K) -
            outer(s_0)``; it leaves the estimator unbiased; default 0), ``Implicit.solver`` and
            ``Implicit.stationary_tol`` (see ``implicit_grad``), and the reverse-mode methods'
            ``checkpoint``: which steps the reverse pass recomputes instead of keeping their
            graphs from the forward pass. An int ``n``: keep at most n steps' graphs at a time,
            recomputing the others once (memory grows with K by the trajectory and at most n
            steps' activations); ``True``: n = 1 (the least memory); ``False``: keep every
            step's graph (no recomputation). Default: n = max(10, ceil(K / 2)) (short unrolls
            such as MAML's recompute nothing; long ones half their steps, for half the
            memory). Eager ``"exact"`` calls without ``reduce`` backpropagate through
            segments of n steps with plain autograd (keeping only each segment's start:
            memory grows by K / n students); under vmap or torch.compile the step-by-step
            reverse pass runs. ``Exact.curvature``: how the exact method takes each step's
            second-order products ``(H_ss a, H_ms a)``: ``"reverse"`` (default; double
            backward) or ``"forward"`` (forward-over-reverse: one ``torch.func.jvp`` of the
            inner gradient in direction ``a``; no step's graph is kept, only the kept steps'
            gradients, so memory holds at most one step's activations with their tangents).
            The two agree wherever the Hessian of the inner loss is symmetric: a twice
            differentiable loss, stop-gradients included (forward mode, like reverse mode,
            takes a detached value as a constant; finite differences do not), and custom
            ``autograd.Function``s whose ``jvp`` agrees with their ``backward``. Every
            operation of the inner gradient needs a forward-mode formula (fused attention
            kernels lack one: use the math path of ``scaled_dot_product_attention``); a
            missing one is a ``NotImplementedError`` naming it. Inside a caller's
            ``torch.compile`` a step's products are recomputed without its dropout masks
            (``compile=True`` replays them); see docs/meta_gradients.md.
        reduce: data parallelism: a function averaging a tree of tensors across processes
            (e.g. an all-reduce). It is applied to the student gradients before every inner
            step, to the outer gradient and losses, and to the student-side Hessian products,
            so every process takes the same student steps. The returned ``meta_grads`` are
            this process's share: average them across processes too.
        compile: ``"exact"`` and ``"first_order"``: run each inner step's forward and reverse
            as one ``torch.compile``'d graph, compiled once for every step (compile time does
            not grow with K; later calls with the same shapes reuse it). To compile a whole
            short unroll into one graph instead, ``torch.compile`` a function that calls
            ``meta_grad``.

    Options a method does not use (``fd_radius`` with ``"exact"``, ...) are refused, and so
    is a method option given as a keyword beside a spec.
    """
    spec = method_spec(
        method,
        log_prob=log_prob,
        baseline=baseline,
        fd_radius=fd_radius,
        solver=solver,
        stationary_tol=stationary_tol,
        checkpoint=checkpoint,
        curvature=curvature,
    )
    check_arguments(
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        student_params=student_params,
        teacher_params=teacher_params,
        optimizer=optimizer,
        opt_state=opt_state,
        steps=steps,
        method=spec,
        truncate=truncate,
        inner_batches=inner_batches,
        state=state,
        has_aux=has_aux,
    )
    if isinstance(spec, Implicit) and reduce is not None:
        raise ValueError("method='implicit' does not support reduce (data parallelism) yet")
    if compile and (not isinstance(spec, Exact | FirstOrder) or reduce is not None):
        raise ValueError(
            "compile=True compiles the reverse pass' step of method='exact' or 'first_order' "
            f"without reduce (got method={spec.name!r}, reduce={reduce is not None}); "
            "otherwise torch.compile a function that calls meta_grad"
        )
    meta = tree.detach(teacher_params)
    carried = NO_STATE if state is None else tree.detach(state)
    problem = make_problem(
        inner_loss,
        outer_loss,
        student_params,
        optimizer,
        inner_batches is not None,
        has_aux,
        state is not None,
    )
    schedule = Schedule(steps, inner_batches)
    check_truncation_reaches_meta(problem, schedule, meta, carried, truncate)
    truncate = truncate or steps
    h, outer_grads = None, None
    with explained_batchnorm_errors():
        if isinstance(spec, ScoreFunction):
            grads, s, st, c, loss, aux, h = score_function(
                problem,
                schedule,
                meta,
                opt_state,
                carried,
                scalar_loss("log_prob", spec.log_prob, False),
                spec.baseline,
                reduce or tree.identity,
            )
        elif isinstance(spec, Implicit):
            s, st, c, aux = run_forward(problem, schedule, meta, opt_state, carried)
            grads, loss, outer_grads = implicit_at(
                problem, s, c, meta, spec.solver, spec.stationary_tol
            )
        elif unrolled.applies(spec, reduce, compile):
            grads, s, st, c, loss, aux, outer_grads = unrolled.unrolled(
                problem,
                schedule,
                meta,
                opt_state,
                carried,
                truncate,
                kept_steps(spec.checkpoint, truncate),
            )
        else:
            reduce = reduce or tree.identity
            grads, s, st, c, loss, aux, outer_grads = reverse(
                problem,
                schedule,
                meta,
                opt_state,
                carried,
                for_method(spec, problem, reduce),
                reduce,
                truncate,
                kept_steps(spec.checkpoint, truncate),
                compile,
            )
    result = MetaGradResult(
        grads, s, st, loss, aux if has_aux else None, h, outer_grads, None if state is None else c
    )
    return MetaGradResult(*(tree.detach(part) for part in result))


def kept_steps(checkpoint: bool | int | None, steps: int) -> int:
    """How many steps' graphs the reverse pass keeps at a time, of the ``steps`` it
    differentiates: by default half of them, at least 10 (short unrolls recompute nothing; a
    long one recomputes half its steps once, for half the memory: measured in
    benchmarks/meta_learning.py)."""
    if checkpoint is None:
        return max(10, math.ceil(steps / 2))
    return steps if checkpoint is False else int(checkpoint)


def implicit_grad(
    inner_loss: Callable[..., Tensor | tuple[Tensor, Any]],
    outer_loss: Callable[..., Tensor],
    solution: Tree,
    teacher_params: Tree,
    solver: Solver | None = None,
    *,
    state: Tree | None = None,
    stationary_tol: float = DEFAULT_STATIONARY_TOL,
) -> MetaGradResult:
    """The implicit-function-theorem hypergradient d outer(s*(m)) / d m at a solution ``s*``
    of the inner problem, found by any means (an unroll, LBFGS, a closed form, a torch.optim
    loop): ``dL/dm = ∂L/∂m - H_ms x`` with ``(H_ss + damping I) x = ∂L/∂s*``.

    The inner loss must be stationary at the solution, ``grad_s inner(s*, m) = 0``, and its
    Hessian there positive definite (or made so by the solver's damping). The gradient norm
    is checked cheaply (one Hessian-vector product, eager mode only): a solution whose
    Cauchy step ``<g, g> / <g, H g> * ||g||`` exceeds ``stationary_tol * ||s*||`` is refused
    (``math.inf`` accepts any point).

    Args:
        inner_loss: ``(student, meta) -> 0-d``; with ``state``, ``(student, meta, state) ->
            (loss, new_state)`` (the new state is ignored).
        outer_loss: ``(student)`` or ``(student, meta)`` -> 0-d; with ``state``,
            ``(student, state)`` or ``(student, meta, state)``.
        solution: the inner problem's solution, a tree of tensors like the student.
        teacher_params: the meta parameters, a tree of tensors.
        solver: ``metapl.CG(...)`` (default) or ``metapl.Neumann(...)``.
        state: the state (e.g. BatchNorm statistics) at the solution.
        stationary_tol: see above (default 1e-2).

    Returns a ``MetaGradResult`` with ``meta_grads``, ``student_params`` (the solution),
    ``outer_loss`` and ``outer_grads``.
    """
    check_tree("teacher_params", teacher_params)
    check_tree("solution", solution)
    if state is not None:
        check_tree("state", state, allow_empty=True)
    if solver is not None and not isinstance(solver, CG | Neumann):
        raise TypeError(f"solver must be metapl.CG(...) or metapl.Neumann(...), got {solver!r}")
    if not (isinstance(stationary_tol, float | int) and stationary_tol > 0):
        raise ValueError(
            f"stationary_tol must be a float > 0 (math.inf accepts any point), got "
            f"{stationary_tol!r}"
        )
    stateful = state is not None
    outer_arity = positional_arity(outer_loss)
    if outer_arity not in (None, 1 + stateful, 2 + stateful):
        form = (
            "(student, state) or (student, meta, state)"
            if stateful
            else ("(student) or (student, meta)")
        )
        raise TypeError(f"outer_loss must take {form}")
    meta = tree.detach(teacher_params)
    problem = make_problem(
        inner_loss, outer_loss, tree.detach(solution), None, False, False, stateful
    )
    carried = NO_STATE if state is None else tree.detach(state)
    with explained_batchnorm_errors():
        grads, loss, outer_grads = implicit_at(
            problem, problem.start(meta), carried, meta, solver or CG(), stationary_tol
        )
    result = MetaGradResult(
        grads,
        tree.detach(solution),
        None,
        loss,
        outer_grads=outer_grads,
        state=None if state is None else carried,
    )
    return MetaGradResult(*(tree.detach(part) for part in result))
