"""MPL's static configuration, checked once when it is built (never inside a step)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from metapl.mpl.losses import UDA
from metapl.optim import Optimizer
from metapl.vat import VAT

__all__ = ["MPL_METHODS", "MPLConfig", "MPLMethod"]

# "first_order" is the paper's word for the score-function estimator on sampled labels (not
# first-order MAML, which would drop the whole MPL signal: it is second order).
MPLMethod = Literal["exact", "finite_difference", "score_function", "first_order"]
MPL_METHODS: tuple[str, ...] = ("exact", "finite_difference", "score_function", "first_order")
_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@dataclass(frozen=True, eq=False)
class MPLConfig:
    """What an MPL step does (see ``metapl.MPL`` for every field). The modules give the
    networks' structure to ``torch.func.functional_call``; their own tensors are never read
    by the step (the state carries the weights). ``meta_grad`` is the engine's method name
    (``"first_order"`` becomes ``"score_function"``) and ``pseudo_labels`` follows from it
    unless given: ``"hard"`` (sampled) for the score function, ``"soft"`` otherwise."""

    teacher: nn.Module
    student: nn.Module
    teacher_optimizer: Optimizer
    student_optimizer: Optimizer
    meta_grad: MPLMethod | None = "exact"
    pseudo_labels: Literal["soft", "hard"] | None = None
    uda: UDA | None = None
    vat: VAT | None = None
    label_smoothing: float = 0.0
    temperature: float = 1.0
    ema_decay: float | None = None
    h_baseline_decay: float | None = None
    fd_radius: float = 3e-4
    curvature: Literal["reverse", "forward"] = "reverse"
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    student_bn: Literal["joint", "unlabeled"] = "joint"
    student_view: Literal["strong", "weak"] = "strong"
    lookahead_steps: int = 1
    mpl_weight: float = 1.0
    mpl_dropout: bool = True
    compile: bool = False
    # the student's structure for the MPL signal's forward (an eval-mode copy without
    # weights when mpl_dropout is False; the student itself otherwise)
    student_scorer: nn.Module = field(init=False, repr=False)

    def __post_init__(self):
        if self.meta_grad == "first_order":
            object.__setattr__(self, "meta_grad", "score_function")
        if self.pseudo_labels is None:
            labels = "hard" if self.meta_grad == "score_function" else "soft"
            object.__setattr__(self, "pseudo_labels", labels)
        _check(self)
        scorer = self.student if self.mpl_dropout else _eval_copy(self.student)
        object.__setattr__(self, "student_scorer", scorer)

    @property
    def samples_labels(self) -> bool:
        """The score-function estimator: labels sampled once, ``h`` and its baseline."""
        return self.meta_grad == "score_function"


def _check(c: MPLConfig) -> None:
    if not (isinstance(c.teacher, nn.Module) and isinstance(c.student, nn.Module)):
        raise TypeError("teacher and student must be torch.nn.Module instances")
    if not (
        isinstance(c.teacher_optimizer, Optimizer) and isinstance(c.student_optimizer, Optimizer)
    ):
        raise TypeError(
            "teacher_optimizer and student_optimizer must be metapl.optim optimizers "
            "(optim.sgd / adam / adamw / rmsprop / adagrad), not torch.optim ones"
        )
    if c.meta_grad is not None and c.meta_grad not in MPL_METHODS:
        raise ValueError(f"unknown meta_grad {c.meta_grad!r}; pass one of {MPL_METHODS} or None")
    if c.pseudo_labels not in ("soft", "hard"):
        raise ValueError(f"pseudo_labels must be 'soft' or 'hard', got {c.pseudo_labels!r}")
    if c.meta_grad in ("exact", "finite_difference") and c.pseudo_labels == "hard":
        raise ValueError(
            f"meta_grad={c.meta_grad!r} differentiates through the pseudo labels, which sampled "
            "hard labels are not: use pseudo_labels='soft', or meta_grad='score_function' "
            "('first_order') for hard labels"
        )
    if c.samples_labels and c.pseudo_labels == "soft":
        raise ValueError(
            "meta_grad='score_function' ('first_order') is the estimator for sampled labels: use "
            "pseudo_labels='hard', or meta_grad='exact' for soft labels"
        )
    if c.curvature not in ("reverse", "forward"):
        raise ValueError(
            f"curvature must be 'reverse' (double backward) or 'forward' (forward-over-reverse), "
            f"got {c.curvature!r}"
        )
    if c.curvature != "reverse" and c.meta_grad != "exact":
        raise ValueError(
            f"curvature={c.curvature!r} is an option of meta_grad='exact', not {c.meta_grad!r}"
        )
    replays = c.meta_grad == "finite_difference" or c.curvature == "forward"
    if replays and c.compile and _has_dropout(c.student):
        what = (
            "meta_grad='finite_difference'" if c.curvature == "reverse" else "curvature='forward'"
        )
        raise ValueError(
            f"{what} replays the student's dropout masks, which torch.compile cannot do: pass "
            "compile=False, meta_grad='exact' with curvature='reverse', or a student without "
            "dropout"
        )
    if c.uda is not None and not isinstance(c.uda, UDA):
        raise TypeError("uda must be a metapl.UDA(weight, temperature, threshold) or None")
    if c.vat is not None and not isinstance(c.vat, VAT):
        raise TypeError("vat must be a metapl.VAT(weight, epsilon) or None")
    if c.vat is not None and c.compile:
        # measured on torch 2.13: with a dropout student and meta_grad="exact" the compiled
        # step's VAT loss came out as exactly 0 (eager: the closed form of tests/test_vat)
        raise ValueError(
            "vat does not compile reliably (its power iteration differentiates with respect "
            "to the input inside the step): pass compile=False"
        )
    if c.student_view not in ("strong", "weak"):
        raise ValueError(
            f"student_view must be 'strong' (x_u_strong, the paper's) or 'weak' (x_u), got "
            f"{c.student_view!r}"
        )
    if c.student_bn not in ("joint", "unlabeled"):
        raise ValueError(
            f"student_bn must be 'joint' (cat(x_l, x_u) through the student, the paper's "
            f"code) or 'unlabeled', got {c.student_bn!r}"
        )
    if not 0 <= c.label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {c.label_smoothing}")
    if not c.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {c.temperature}")
    if c.ema_decay is not None and not 0 <= c.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) or None, got {c.ema_decay}")
    if c.h_baseline_decay is not None and not 0 <= c.h_baseline_decay < 1:
        raise ValueError(f"h_baseline_decay must be in [0, 1) or None, got {c.h_baseline_decay}")
    if c.log_prob_reduction not in ("mean", "sum"):
        raise ValueError(
            f"log_prob_reduction must be 'mean' (the paper's scale) or 'sum', got "
            f"{c.log_prob_reduction!r}"
        )
    k = c.lookahead_steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"lookahead_steps must be an int >= 1, got {k!r}")
    if not c.mpl_weight >= 0 or (c.meta_grad is None and c.mpl_weight != 1.0):
        raise ValueError(
            f"mpl_weight must be >= 0 and needs a meta_grad (there is no MPL term without "
            f"one), got {c.mpl_weight} with meta_grad={c.meta_grad!r}"
        )
    if not isinstance(c.mpl_dropout, bool) or (c.meta_grad is None and not c.mpl_dropout):
        raise ValueError(
            f"mpl_dropout must be True or False and False needs a meta_grad (there is no MPL "
            f"signal without one), got {c.mpl_dropout!r} with meta_grad={c.meta_grad!r}"
        )
    if not c.fd_radius > 0:
        raise ValueError(f"fd_radius must be > 0, got {c.fd_radius}")


def _eval_copy(module: nn.Module) -> nn.Module:
    """``module``'s structure in eval mode, its tensors on the meta device (never read: the
    step passes every parameter and buffer)."""
    return copy.deepcopy(module).to("meta").eval()


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, _DROPOUT) and m.p > 0 for m in module.modules())
