"""Meta-gradient methods as small frozen specs: each carries the options only it uses.

``meta_grad(..., method=Exact(checkpoint=5))``; the strings (``"exact"``, ...) stay as
shorthands for a spec with its defaults, and take the options as ``meta_grad`` keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

from torch import Tensor

from metapl.metagrad.implicit import CG, Neumann, Solver

__all__ = [
    "Exact",
    "FiniteDifference",
    "FirstOrder",
    "Implicit",
    "MethodSpec",
    "ScoreFunction",
    "method_spec",
]

METHOD_HELP = (
    "'exact' (second order), 'finite_difference' (the same from first-order gradients), "
    "'first_order' (second-order terms dropped: first-order MAML), 'implicit' (implicit "
    "function theorem at the final student) or 'score_function' (sampled targets, needs "
    "log_prob), or a spec such as metapl.Exact(checkpoint=5)"
)


CURVATURES = ("reverse", "forward")


@dataclass(frozen=True)
class Exact:
    """Reverse mode through the inner steps, second order. ``checkpoint``: which steps the
    reverse pass recomputes instead of keeping their graphs (an int n: keep at most n at a
    time; ``True``: n = 1; ``False``: keep all; ``None``: n = max(10, ceil(K / 2))).
    ``curvature``: how each step's second-order products are taken: ``"reverse"`` (double
    backward) or ``"forward"`` (forward-over-reverse: one ``jvp`` of the inner gradient; no
    step keeps a graph, the kept steps keep their gradient instead; every operation of the
    inner loss needs a forward-mode formula)."""

    checkpoint: bool | int | None = None
    curvature: str = "reverse"
    name: ClassVar[str] = "exact"

    def __post_init__(self):
        _check_checkpoint(self.checkpoint)
        if self.curvature not in CURVATURES:
            raise ValueError(
                f"curvature must be 'reverse' (double backward) or 'forward' "
                f"(forward-over-reverse), got {self.curvature!r}"
            )


@dataclass(frozen=True)
class FiniteDifference:
    """The exact method's reverse pass with each second-order product taken by central
    differences of first-order gradients at ``s ± radius * a / ||a||`` (DARTS). The default
    radius is within 1% of exact on a WRN-28-2 student in float32 (benchmarks/fd_radius.py)."""

    radius: float = 3e-4
    checkpoint: bool | int | None = None
    name: ClassVar[str] = "finite_difference"

    def __post_init__(self):
        if isinstance(self.radius, bool) or not (
            isinstance(self.radius, float | int) and self.radius > 0
        ):
            raise ValueError(
                f"the finite-difference radius must be a float > 0, got {self.radius!r}"
            )
        _check_checkpoint(self.checkpoint)


@dataclass(frozen=True)
class FirstOrder:
    """The reverse pass with the second-order terms dropped (first-order MAML, and its
    analogue for the optimizer's hyperparameters)."""

    checkpoint: bool | int | None = None
    name: ClassVar[str] = "first_order"

    def __post_init__(self):
        _check_checkpoint(self.checkpoint)


@dataclass(frozen=True)
class Implicit:
    """The implicit function theorem at the final student (``metapl.implicit_grad``), the
    linear system solved by ``solver``; a final student whose Cauchy step exceeds
    ``stationary_tol * ||s||`` is refused as not stationary (``math.inf`` accepts any)."""

    solver: Solver = field(default_factory=CG)
    stationary_tol: float = 1e-2
    name: ClassVar[str] = "implicit"

    def __post_init__(self):
        if not isinstance(self.solver, CG | Neumann):
            raise TypeError(
                f"solver must be metapl.CG(...) or metapl.Neumann(...), got {self.solver!r}"
            )
        tol = self.stationary_tol
        if isinstance(tol, bool) or not (isinstance(tol, float | int) and tol > 0):
            raise ValueError(
                f"stationary_tol must be a float > 0 (math.inf accepts any point), got {tol!r}"
            )


@dataclass(frozen=True)
class ScoreFunction:
    """REINFORCE for inner losses on sampled targets: ``(outer(s_K) - outer(s_0) - baseline)
    * grad log_prob(m)``; ``log_prob: (meta) -> 0-d`` (here or as ``meta_grad``'s argument),
    ``baseline`` a control variate (it leaves the estimator unbiased). MPL's "first order"."""

    log_prob: Callable | None = None
    baseline: float | Tensor = 0.0
    name: ClassVar[str] = "score_function"

    def __post_init__(self):
        if self.log_prob is not None and not callable(self.log_prob):
            raise TypeError(f"log_prob must be a callable (meta) -> 0-d, got {self.log_prob!r}")


MethodSpec = Exact | FiniteDifference | FirstOrder | Implicit | ScoreFunction
_BY_NAME = {
    spec.name: spec for spec in (Exact, FiniteDifference, FirstOrder, Implicit, ScoreFunction)
}
# meta_grad's keyword for each spec field it may fill, when the method is given as a string.
_KEYWORDS = {"fd_radius": "radius"}


def method_spec(method: str | MethodSpec, **options) -> MethodSpec:
    """The spec for ``method`` (a name or a spec) and the method options given to
    ``meta_grad`` as keywords (``None``: not given). A name takes its options from the
    keywords; a spec carries its own, and only ``log_prob`` may come beside it."""
    given = {name: value for name, value in options.items() if value is not None}
    if isinstance(method, str):
        if method not in _BY_NAME:
            raise ValueError(f"unknown method {method!r}; pass one of {METHOD_HELP}")
        spec = _BY_NAME[method]
        fields = {_KEYWORDS.get(name, name): value for name, value in given.items()}
        for name in given:
            if _KEYWORDS.get(name, name) not in spec.__dataclass_fields__:
                raise ValueError(_unused_message(name, method))
        return spec(**fields)
    if not isinstance(method, MethodSpec):
        raise TypeError(
            f"method must be a name or a spec, got {method!r}; pass one of {METHOD_HELP}"
        )
    log_prob = given.pop("log_prob", None)
    if given:
        name = next(iter(given))
        field_name = _KEYWORDS.get(name, name)
        raise ValueError(
            f"{name}= is a method option and method={method!r} carries its own: set it on "
            f"the spec (e.g. {type(method).__name__}({field_name}=...)), not on meta_grad"
        )
    if log_prob is None:
        return method
    if not isinstance(method, ScoreFunction):
        raise ValueError(_unused_message("log_prob", method.name))
    if method.log_prob is not None:
        raise ValueError("log_prob given twice: on the ScoreFunction spec and to meta_grad")
    return replace(method, log_prob=log_prob)


def _unused_message(option: str, method: str) -> str:
    users = [
        repr(name)
        for name, spec in _BY_NAME.items()
        if _KEYWORDS.get(option, option) in spec.__dataclass_fields__
    ]
    hint = (
        ": the score-function estimator (MPL's 'first order') is method='score_function'; "
        "method='first_order' drops second-order terms (first-order MAML)"
        if option == "log_prob" and method == "first_order"
        else ""
    )
    return f"{option} is only used by method={' or '.join(users)}, not {method!r}{hint}"


def _check_checkpoint(checkpoint) -> None:
    valid = checkpoint is None or isinstance(checkpoint, bool)
    if not valid and (not isinstance(checkpoint, int) or checkpoint < 1):
        raise ValueError(
            "checkpoint must be True (recompute all steps but the last), False (keep every "
            f"step's graph) or an int n >= 1 (keep the last n), got {checkpoint!r}"
        )
