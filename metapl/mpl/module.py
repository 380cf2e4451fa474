"""``MPL``: the pure step behind an object that holds the networks as ``nn.Module``s."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import partial

import torch
from torch import Tensor, nn

from metapl import _tree as tree
from metapl.functional import buffers_of, params_of, write_back
from metapl.mpl.config import MPLConfig, MPLMethod
from metapl.mpl.losses import UDA
from metapl.mpl.state import MPLState, Net
from metapl.mpl.step import Batch, Reduce, mpl_step
from metapl.optim import Optimizer
from metapl.vat import VAT

__all__ = ["MPL"]


class MPL:
    """Meta Pseudo Labels: a teacher that learns from how its pseudo labels help a student.

    Args:
        teacher, student: ``nn.Module`` classifiers mapping a batch to logits [B, C] with the
            same C. They hold the current weights after every step.
        teacher_optimizer, student_optimizer: ``metapl.optim`` optimizers (wrap them in
            ``optim.clip_grad_norm`` for gradient clipping; schedules go in their ``lr``).
        meta_grad: ``"exact"`` or ``"finite_difference"`` (soft labels),
            ``"score_function"`` (hard labels; the paper calls it ``"first_order"``, also
            accepted), or ``None`` for no MPL term (the pseudo-label / UDA baseline).
        pseudo_labels: ``"soft"`` (``softmax(z / temperature)``) or ``"hard"`` (sampled).
            Default: what the method needs (hard for the score function, soft otherwise).
        uda: a ``UDA`` term for the teacher, or ``None``.
        label_smoothing: for the teacher's supervised cross-entropy.
        compile: ``torch.compile`` the whole step (one graph).
        temperature: of the pseudo labels.
        ema_decay: keep ``ema_student``, an exponential moving average of the student's
            parameters and float buffers, for evaluation.
        h_baseline_decay: the score function's control variate: subtract a moving average of
            ``h`` with this decay (None: no baseline). Methods that sample no labels have no
            ``h`` and leave it unused, so one recipe serves every method.
        log_prob_reduction: score function only: ``"mean"`` averages the log-probability of
            the sampled labels over the batch (the paper's code), which makes the term 1/B_u of
            the score-function estimate of the gradient of the expected loss; ``"sum"`` is that
            estimate itself, on the scale of ``"exact"`` (for ablations comparing the two).
        fd_radius: ``"finite_difference"`` only: see ``metapl.meta_grad``.
        curvature: ``"exact"`` only: ``"reverse"`` (double backward) or ``"forward"``
            (forward-over-reverse; less memory; see ``metapl.meta_grad``).
        student_bn: the batch of the student's forward for its step on the pseudo labels:
            ``"joint"`` is ``cat(x_l, x_view)`` (the official code's and the PyTorch port's),
            ``"unlabeled"`` is ``x_view`` alone.
        lookahead_steps: K >= 1 student optimizer steps per MPL step on the same pseudo-labelled
            batch; the teacher's MPL gradient goes through all K (the score function uses
            ``h = L_l(s_K) - L_l(s_0)`` with the labels sampled once). With ``meta_grad=None``
            the student takes the same K steps (the matching baseline).
        mpl_weight: the MPL term's weight in the teacher's gradient (1.0: the paper's).
        mpl_dropout: whether the forward that scores the updated student on the MPL batch
            (the MPL signal) has dropout: True, the paper's code; False runs it in eval mode
            (BatchNorm still normalises with the batch's statistics), so the MPL term draws no
            random numbers: the run then draws exactly the dropout masks of its baseline
            (``meta_grad=None``, same seed), differs from it only through the term, and is
            that baseline bit for bit at ``mpl_weight=0`` (docs/mpl.md: the paired study).
        vat: a ``metapl.VAT`` term for the teacher (on ``x_u``), or ``None``.
        student_view: the batch the student learns from: ``"strong"`` (``x_u_strong`` when
            given, else ``x_u``: the paper's) or ``"weak"`` (``x_u``).
        reduce: data parallel: a function averaging a flat dict of tensors across processes
            (``metapl.distributed.all_reduce_mean`` under ``torchrun``); see
            ``metapl.mpl.step``. Give every process the same initial weights (e.g.
            ``metapl.distributed.broadcast_module``) and its share of each batch.

    The step itself is ``metapl.mpl.mpl_step(mpl.config, mpl.state, batch, reduce)``;
    ``mpl.state`` is the ``MPLState`` tree the modules and optimizers hold now.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_optimizer: Optimizer,
        student_optimizer: Optimizer,
        meta_grad: MPLMethod | None = "exact",
        pseudo_labels: str | None = None,
        uda: UDA | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
        *,
        temperature: float = 1.0,
        ema_decay: float | None = None,
        h_baseline_decay: float | None = None,
        fd_radius: float = 3e-4,
        curvature: str = "reverse",
        log_prob_reduction: str = "mean",
        student_bn: str = "joint",
        lookahead_steps: int = 1,
        mpl_weight: float = 1.0,
        mpl_dropout: bool = True,
        vat: VAT | None = None,
        student_view: str = "strong",
        reduce: Reduce | None = None,
    ):
        self.config = MPLConfig(
            teacher,
            student,
            teacher_optimizer,
            student_optimizer,
            meta_grad=meta_grad,
            pseudo_labels=pseudo_labels,
            uda=uda,
            vat=vat,
            label_smoothing=label_smoothing,
            temperature=temperature,
            ema_decay=ema_decay,
            h_baseline_decay=h_baseline_decay,
            fd_radius=fd_radius,
            curvature=curvature,
            log_prob_reduction=log_prob_reduction,
            student_bn=student_bn,
            student_view=student_view,
            lookahead_steps=lookahead_steps,
            mpl_weight=mpl_weight,
            mpl_dropout=mpl_dropout,
            compile=compile,
        )
        self.teacher, self.student = teacher, student
        self.ema_student = None
        if ema_decay is not None:
            self.ema_student = copy.deepcopy(student).eval().requires_grad_(False)
        self._teacher_opt = teacher_optimizer.init(params_of(teacher))
        self._student_opt = student_optimizer.init(params_of(student))
        param = next(student.parameters())
        self._step = torch.zeros((), device=param.device)
        self._h_baseline = torch.zeros((), device=param.device, dtype=param.dtype)
        self._num_classes: int | None = None  # of the teacher's logits, read by check_labels
        step = partial(mpl_step, self.config, reduce=reduce)
        self._step_fn = torch.compile(step, fullgraph=True) if compile else step

    @property
    def meta_grad(self) -> str | None:
        return self.config.meta_grad

    @property
    def num_steps(self) -> int:
        return int(self._step)

    @property
    def state(self) -> MPLState:
        """The training state: the modules' tensors, the optimizers' states, the counters."""
        ema = self.ema_student
        return MPLState(
            Net(params_of(self.teacher), buffers_of(self.teacher), self._teacher_opt),
            Net(params_of(self.student), buffers_of(self.student), self._student_opt),
            None if ema is None else Net(params_of(ema), buffers_of(ema)),
            self._step,
            self._h_baseline,
        )

    def _set_state(self, state: MPLState) -> None:
        write_back(self.teacher, state.teacher.params, state.teacher.buffers)
        write_back(self.student, state.student.params, state.student.buffers)
        if self.ema_student is not None:
            write_back(self.ema_student, state.ema.params, state.ema.buffers)
        self._teacher_opt, self._student_opt = state.teacher.opt, state.student.opt
        self._step, self._h_baseline = state.step, state.h_baseline

    def check_labels(self, y: Tensor, x: Tensor) -> None:
        """Raise ValueError unless every label in ``y`` [N] is a class index of the teacher's
        logits, ``0 <= y < C``, and the student has C outputs too. C is read once from both
        networks' outputs for ``x[:1]`` (model inputs; eval mode, no gradient) and kept. One
        host synchronisation."""
        if self._num_classes is None:
            n_teacher, n_student = (
                _num_outputs(net, x[:1]) for net in (self.teacher, self.student)
            )
            if n_student != n_teacher:
                raise ValueError(
                    f"the student outputs {n_student} classes but the teacher {n_teacher}; "
                    "give both the same number of outputs"
                )
            self._num_classes = n_teacher
        if not y.numel():
            return
        low, high = torch.stack([y.min(), y.max()]).tolist()
        n = self._num_classes
        if low < 0 or high >= n:
            raise ValueError(
                f"labels must be class indices 0..{n - 1} (the teacher has {n} outputs), got "
                f"label {low if low < 0 else high}: map the labels to 0..C-1, or build teacher "
                "and student with one output per class"
            )

    def step(
        self,
        x_l: Tensor,
        y_l: Tensor,
        x_u: Tensor,
        x_u_strong: Tensor | None = None,
        *,
        mpl_batch: tuple[Tensor, Tensor] | None = None,
        sync: bool = True,
    ) -> dict[str, float] | dict[str, Tensor]:
        """One MPL step on a labeled batch ``(x_l [B_l, ...], y_l [B_l])`` and an unlabeled
        batch ``x_u [B_u, ...]`` (with its strongly augmented view ``x_u_strong``).

        ``mpl_batch=(x [B_m, ...], y [B_m])`` is the labeled batch on which the updated
        student is scored for the MPL signal; by default the teacher's own ``(x_l, y_l)``.

        Returns the step's metrics as floats, or as 0-d tensors with ``sync=False`` (which
        avoids a host synchronisation per metric).

        The labels are checked (``check_labels``) on the first step, and on every step where
        that costs no extra device synchronisation: ``y_l`` on the CPU, or ``sync=True``.
        With ``sync=False`` on an accelerator later batches are not checked: check the whole
        labeled set once instead, as ``metapl.training.train`` does.
        """
        batch = self._checked_batch(x_l, y_l, x_u, x_u_strong, mpl_batch)
        if sync or y_l.device.type == "cpu" or self._num_classes is None:
            self.check_labels(y_l, x_l)
            if batch.y_mpl is not None:
                self.check_labels(batch.y_mpl, batch.x_mpl)
        self.teacher.train()
        self.student.train()
        state, metrics = self._step_fn(self.state, batch)
        self._set_state(state)
        return {k: float(v) for k, v in metrics.items()} if sync else metrics

    def _checked_batch(self, x_l, y_l, x_u, x_u_strong, mpl_batch) -> Batch:
        if not all(isinstance(x, Tensor) for x in (x_l, y_l, x_u)):
            raise TypeError("x_l, y_l and x_u must be tensors")
        _check_label_shape(y_l, x_l, "y_l", "x_l")
        if x_l.shape[1:] != x_u.shape[1:]:
            raise ValueError(
                f"x_l and x_u must have the same example shape, got {tuple(x_l.shape[1:])} and "
                f"{tuple(x_u.shape[1:])}"
            )
        if x_u_strong is not None and x_u_strong.shape != x_u.shape:
            raise ValueError(
                f"x_u_strong must be a view of x_u with the same shape {tuple(x_u.shape)}, got "
                f"{tuple(x_u_strong.shape)}"
            )
        if self.config.uda is not None and x_u_strong is None:
            raise ValueError("UDA needs the strongly augmented view: pass x_u_strong")
        if mpl_batch is None:
            return Batch(x_l, y_l, x_u, x_u_strong)
        if self.config.meta_grad is None:
            raise ValueError("mpl_batch needs a meta_grad: there is no MPL term without one")
        if not (
            isinstance(mpl_batch, (tuple, list))
            and len(mpl_batch) == 2
            and all(isinstance(t, Tensor) for t in mpl_batch)
        ):
            raise TypeError("mpl_batch must be a pair of tensors (x, y)")
        x_m, y_m = mpl_batch
        _check_label_shape(y_m, x_m, "mpl_batch's labels", "its x")
        if x_m.shape[1:] != x_l.shape[1:]:
            raise ValueError(
                f"mpl_batch's x must have x_l's example shape {tuple(x_l.shape[1:])}, got "
                f"{tuple(x_m.shape[1:])}"
            )
        return Batch(x_l, y_l, x_u, x_u_strong, x_m, y_m)

    def state_dict(self) -> dict:
        """Everything needed to resume training exactly (with the caller's RNG state)."""
        sd = {
            "teacher": self.teacher.state_dict(),
            "student": self.student.state_dict(),
            "teacher_state": self._teacher_opt,
            "student_state": self._student_opt,
            "counters": {"step": self._step, "h_baseline": self._h_baseline},
        }
        if self.ema_student is not None:
            sd["ema_student"] = self.ema_student.state_dict()
        return copy.deepcopy(sd)

    def load_state_dict(self, state_dict: Mapping) -> None:
        sd = copy.deepcopy(dict(state_dict))
        if ("ema_student" in sd) != (self.ema_student is not None):
            raise ValueError(
                "state_dict and this MPL disagree on ema_decay: build MPL with the same options"
            )
        self.teacher.load_state_dict(sd["teacher"])
        self.student.load_state_dict(sd["student"])
        if self.ema_student is not None:
            self.ema_student.load_state_dict(sd["ema_student"])
        device = next(self.teacher.parameters()).device
        self._teacher_opt = tree.to(sd["teacher_state"], device)
        self._student_opt = tree.to(sd["student_state"], device)
        counters = tree.to(sd["counters"], device)
        self._step, self._h_baseline = counters["step"], counters["h_baseline"]


def _num_outputs(net: nn.Module, x: Tensor) -> int:
    was_training = net.training
    net.eval()
    with torch.no_grad():
        n = int(net(x).shape[-1])
    net.train(was_training)
    return n


def _check_label_shape(y: Tensor, x: Tensor, y_name: str, x_name: str) -> None:
    """``y`` must be integer class indices [N], one per row of ``x`` [N, ...]."""
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(
            f"{y_name} must be integer class indices of shape [{x.shape[0]}] (one per row of "
            f"{x_name}), got {y.dtype} of shape {tuple(y.shape)}"
        )
