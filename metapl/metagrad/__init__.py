"""Meta-gradients: the gradient of an outer loss through differentiable inner training steps.

The student starts at ``s_0 = start(m)`` and takes ``steps`` optimizer steps on
``inner_loss(s, m[, batch_k])``; the outer loss is evaluated at the final student.
``meta_grad`` returns d outer / d m, the meta parameters ``m`` reaching the outer loss through
every path at once: the start (MAML), the inner loss (MPL's teacher, reweighting, iMAML's
proximal term), the optimizer's hyperparameters (learned learning rates, Meta-SGD) and the
outer loss itself. See docs/meta_gradients.md for the math, cost and memory of each method.

BatchNorm and other buffers: a loss may be evaluated more than once (the reverse pass
recomputes each step), and a function under a ``torch.func`` transform may not mutate tensors
it captured. Loss functions must therefore be pure: pass buffers through
``torch.func.functional_call`` next to the parameters, as a *copy* made inside the loss when the
module updates running statistics in training mode. To keep those statistics, return the copy
as auxiliary output with ``has_aux=True``: ``result.inner_aux`` is the aux of the first inner
evaluation (the student's forward at its starting parameters), so the running statistics
advance exactly once per call::

    buffers = dict(model.named_buffers())

    def inner_loss(s, t):
        scratch = {k: b.clone() for k, b in buffers.items()}  # running stats land here
        logits = torch.func.functional_call(model, {**s, **scratch}, (x_u,))
        return loss_fn(logits, t), scratch

    res = meta_grad(inner_loss, outer_loss, s, t, opt, has_aux=True)
    buffers = res.inner_aux                                   # updated once
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, get_args

from torch import Tensor

from metapl.metagrad import curvature, tree, unrolled
from metapl.metagrad.check import check_arguments
from metapl.metagrad.implicit import CG, Neumann, implicit
from metapl.metagrad.problem import Schedule, make_problem, scalar_loss
from metapl.metagrad.reverse import reverse
from metapl.metagrad.score import score_function
from metapl.optim import Optimizer, State

Params = dict[str, Tensor]
Method = Literal["exact", "finite_difference", "first_order", "implicit", "score_function"]
METHODS: tuple[str, ...] = get_args(Method)

__all__ = ["CG", "METHODS", "Method", "MetaGradResult", "Neumann", "meta_grad"]


class MetaGradResult(NamedTuple):
    teacher_grads: Params  # d outer / d teacher_params (the meta parameters), same keys
    student_params: Params  # the student after the inner steps (detached)
    opt_state: State  # the optimizer state after the inner steps
    outer_loss: Tensor  # 0-d, the outer loss at the final student
    inner_aux: Any = None  # has_aux=True: aux of the first inner evaluation (at s_0)
    h: Tensor | None = None  # score_function: outer(s_K) - outer(s_0), before the baseline
    outer_grads: Params | None = None  # d outer / d s_K (None for score_function)

    @property
    def meta_grads(self) -> Params:
        """``teacher_grads`` under the general name: d outer / d meta parameters."""
        return self.teacher_grads


def meta_grad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[..., Tensor],
    student_params: Mapping[str, Tensor] | Callable[[Params], Mapping[str, Tensor]],
    teacher_params: Mapping[str, Tensor],
    optimizer: Optimizer | Callable[[Params], Optimizer],
    opt_state: State | None = None,
    steps: int = 1,
    method: Method = "exact",
    log_prob: Callable[[Params], Tensor] | None = None,
    *,
    inner_batches: Any = None,
    truncate: int | None = None,
    has_aux: bool = False,
    fd_radius: float = 3e-4,
    baseline: float | Tensor = 0.0,
    solver: CG | Neumann | None = None,
    reduce: Callable[[Params], Params] | None = None,
    checkpoint: bool | int = 5,
    compile: bool = False,
) -> MetaGradResult:
    """Gradient of ``outer_loss(s_K[, m])`` with respect to the meta parameters
    ``m = teacher_params``, where ``s_0 = student_params(m)`` (or the dict itself) and
    ``s_{k+1}, st_{k+1} = optimizer(m).step(s_k, grad_s inner_loss(s_k, m[, batch_k]), st_k)``.

    Args:
        inner_loss: ``(student, meta) -> 0-d`` the student trains on; with ``inner_batches``,
            ``(student, meta, batch_k)``.
        outer_loss: ``(student) -> 0-d`` or ``(student, meta) -> 0-d``, after the inner steps.
        student_params: the starting student, a dict of tensors, or a callable
            ``meta -> dict`` (MAML: ``lambda m: m``; gradients then flow into the start).
        teacher_params: the meta parameters, a dict of tensors (not modified).
        optimizer: a ``metapl.optim`` optimizer, or a callable ``meta -> optimizer`` whose
            tensor hyperparameters (lr: 0-d or a per-parameter dict; momentum, weight_decay,
            betas: 0-d) are functions of the meta parameters. ``opt_state`` defaults to
            ``optimizer.init(s_0)``.
        steps: number of inner steps K >= 1.
        method: ``"exact"`` (reverse mode through the steps, second order; each step is
            recomputed in the reverse pass, so memory grows with K by the trajectory only),
            ``"finite_difference"`` (the same reverse pass with the second-order products
            taken by central differences of first-order gradients at ``s ± eps a``, each
            perturbation of norm ``fd_radius``, as in DARTS), ``"first_order"`` (the reverse
            pass with the second-order terms dropped: first-order MAML and its analogue for
            the optimizer's hyperparameters), ``"implicit"`` (the implicit function theorem at
            the final student, which must be a stationary point of the inner loss; linear
            system solved by ``solver``) or ``"score_function"`` (REINFORCE for inner losses
            on sampled targets: ``(outer(s_K) - outer(s_0) - baseline) * grad log_prob(m)``;
            what MPL calls "first order").
        log_prob: ``"score_function"`` only: ``(meta) -> 0-d`` log-probability of the sampled
            targets the inner loss used.
        inner_batches: a pytree (dict / tuple / tensor) whose leaves have leading dimension
            K; step k's inner loss receives slice k as its third argument.
        truncate: differentiate through the last ``truncate`` steps only (truncated
            backpropagation; the start then gets no gradient). Default: all K.
        has_aux: ``inner_loss`` returns ``(loss, aux)``; the aux of its first evaluation comes
            back as ``result.inner_aux`` (e.g. updated BatchNorm statistics).
        fd_radius: ``"finite_difference"`` only: the norm of each perturbation (default 3e-4:
            within 1% of exact on a WRN-28-2 student in float32; see benchmarks/fd_radius.py).
        baseline: ``"score_function"`` only: subtracted from ``h = outer(s_K) - outer(s_0)``
            (a control variate; it leaves the estimator unbiased).
        solver: ``"implicit"`` only: ``metapl.CG(...)`` (default) or ``metapl.Neumann(...)``
            for ``(H_ss + damping I) x = d outer / d s_K``.
        reduce: data parallelism: a function averaging a dict of tensors across processes
            (e.g. an all-reduce). It is applied to the student gradients before every inner
            step, to the outer gradient and losses, and to the student-side Hessian products,
            so every process takes the same student steps. The returned ``teacher_grads`` are
            this process's share: average them across processes too.
        checkpoint: which steps the reverse pass recomputes instead of keeping their graphs
            from the forward pass. An int ``n``: keep the last n steps' graphs, recompute the
            earlier ones, so memory grows with K by the trajectory and at most n steps'
            activations (default 5: short unrolls such as MAML's recompute nothing, about 1.3x
            faster than recomputing); ``True``: n = 1 (the least memory); ``False``: keep every
            step's graph (no recomputation; memory grows by each step's activations). When
            every graph is kept, an eager ``"exact"`` call without ``reduce`` backpropagates
            through the unroll with plain autograd (the same numbers, less per-operation
            overhead); under vmap or torch.compile the step-by-step reverse pass runs.
        compile: ``"exact"`` and ``"first_order"``: run each inner step's forward and reverse
            as one ``torch.compile``'d graph, compiled once for every step (compile time does
            not grow with K; later calls with the same shapes reuse it). To compile a whole
            short unroll into one graph instead, ``torch.compile`` a function that calls
            ``meta_grad``.
    """
    check_arguments(
        inner_loss=inner_loss, outer_loss=outer_loss, student_params=student_params,
        teacher_params=teacher_params, optimizer=optimizer, opt_state=opt_state, steps=steps,
        method=method, log_prob=log_prob, inner_batches=inner_batches, truncate=truncate,
        solver=solver, checkpoint=checkpoint, methods=METHODS,
    )  # fmt: skip
    if method == "implicit" and reduce is not None:
        raise ValueError("method='implicit' does not support reduce (data parallelism) yet")
    if compile and (method not in ("exact", "first_order") or reduce is not None):
        raise ValueError(
            "compile=True compiles the reverse pass' step of method='exact' or 'first_order' "
            f"without reduce (got method={method!r}, reduce={reduce is not None}); otherwise "
            "torch.compile a function that calls meta_grad"
        )
    meta = {k: v.detach() for k, v in teacher_params.items()}
    problem = make_problem(
        inner_loss, outer_loss, student_params, optimizer, inner_batches is not None, has_aux
    )
    schedule = Schedule(steps, inner_batches)
    kept_graphs = steps if checkpoint is False else int(checkpoint)
    eager_autograd = unrolled.applies(method, reduce, compile, kept_graphs, steps)
    reduce = reduce or tree.identity
    h, outer_grads = None, None
    if method == "score_function":
        log_prob = scalar_loss("log_prob", log_prob, False)
        grads, s, st, loss, aux, h = score_function(
            problem, schedule, meta, opt_state, log_prob, baseline, reduce
        )
    elif method == "implicit":
        grads, s, st, loss, aux, outer_grads = implicit(
            problem, schedule, meta, opt_state, solver or CG()
        )
    elif eager_autograd:
        grads, s, st, loss, aux, outer_grads = unrolled.unrolled(
            problem, schedule, meta, opt_state, truncate or steps
        )
    else:
        if method == "exact":
            stepper = curvature.Exact(problem, reduce)
        elif method == "finite_difference":
            stepper = curvature.FiniteDifference(problem, reduce, fd_radius)
        else:
            stepper = curvature.FirstOrder(problem, reduce)
        grads, s, st, loss, aux, outer_grads = reverse(
            problem, schedule, meta, opt_state, stepper, reduce, truncate or steps, kept_graphs,
            compile,
        )  # fmt: skip
    result = MetaGradResult(
        grads, s, st, loss, aux if has_aux else None, h, outer_grads
    )  # fmt: skip
    return MetaGradResult(*(tree.detach(part) for part in result))
