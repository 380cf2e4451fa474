"""Meta Pseudo Labels (Pham et al., CVPR 2021).

One ``MPL.step``:

1. The teacher runs once, in training mode, on ``cat(x_l, x_u, x_u_strong)`` (the parts it
   needs). Its own loss is cross-entropy on the labeled batch (with label smoothing) plus, with
   ``uda``, the UDA consistency loss between its sharpened, confidence-masked prediction on
   ``x_u`` and its prediction on ``x_u_strong``; with ``vat``, the VAT loss on ``x_u``
   (``metapl.VAT``: its perturbed forwards use batch statistics and track none).
2. Its logits ``z`` on the student's view (``x_u_strong``, else ``x_u``; ``x_u`` with
   ``student_view="weak"``) become pseudo labels:
   ``softmax(z / temperature)`` ("soft") or a sample from it ("hard").
3. The student takes ``lookahead_steps`` (K, default 1) optimizer steps on the pseudo labels
   of this one batch (the same view and the same targets at every step; fresh dropout masks).
   Those steps are the lookahead of the meta-gradient *and* the student's real update: their
   gradients are computed once.
4. The MPL term: the gradient of the updated student's labeled cross-entropy (on ``(x_l,
   y_l)``, or on the separate ``mpl_batch`` given to ``step``) with respect to ``z``
   (``metapl.meta_grad`` with the logits as "teacher parameters", through all K steps), times
   ``mpl_weight``, pushed through the teacher together with its own loss in a single backward
   pass (one VJP).

BatchNorm: the teacher's running statistics advance once per step, from its forward on the
concatenated batch; the student's once per optimizer step (K times with ``lookahead_steps=K``,
carried through ``metapl.meta_grad(..., state=)``), from its forward for that step, which with
``student_bn="joint"`` (the default, as the official code and the PyTorch port) runs on
``cat(x_l, x_view)`` (BatchNorm normalises the two together; the loss is on the ``x_view``
rows only) and with ``student_bn="unlabeled"`` on ``x_view`` alone. The student's forward
on the labeled batch after its steps (for the MPL signal) uses batch statistics and leaves the
running statistics alone. Dropout is active in every training forward.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vjp

from metapl.distributed import (
    all_reduce_mean,
    all_reduce_mean_floats,
    broadcast_module,
    is_distributed,
    world_size,
)
from metapl.functional import (
    buffers_of,
    forward,
    forward_batch_stats,
    params_of,
    soft_cross_entropy,
    write_back,
)
from metapl.metagrad import meta_grad as compute_meta_grad
from metapl.optim import Optimizer
from metapl.vat import VAT

__all__ = ["MPL", "UDA"]

# MPL's options, in the paper's words, and the metapl.meta_grad method each one runs. The
# paper's "first order" is the score-function estimator for sampled labels (not first-order
# MAML, which would drop the whole MPL signal: it is second order).
_METHODS = {
    "exact": "exact",
    "finite_difference": "finite_difference",
    "first_order": "score_function",
}


@dataclass(frozen=True)
class UDA:
    """Unsupervised Data Augmentation consistency loss for the teacher (Xie et al., 2020).

    ``weight * min(1, (step + 1) / ramp_steps) * mean_i[mask_i * CE(q_i, p_strong_i)]`` with
    ``q = softmax(logits_weak / temperature)`` (no gradient) and
    ``mask_i = max_c p_ic >= threshold``, where p is the unsharpened ``softmax(logits_weak)``
    (``mask_on="unsharpened"``: the UDA paper's convention) or the sharpened target q
    (``mask_on="sharpened"``: the official MPL code, for which its threshold 0.6 was tuned).
    ``ramp_steps=0`` disables the ramp.
    """

    weight: float = 1.0
    temperature: float = 0.4
    threshold: float = 0.8
    ramp_steps: int = 0
    mask_on: str = "unsharpened"

    def __post_init__(self):
        if self.weight < 0 or self.temperature <= 0 or not 0 <= self.threshold <= 1:
            raise ValueError(
                "UDA needs weight >= 0, temperature > 0 and 0 <= threshold <= 1, got "
                f"{self.weight}, {self.temperature}, {self.threshold}"
            )
        if self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {self.ramp_steps}")
        if self.mask_on not in ("unsharpened", "sharpened"):
            raise ValueError(f"mask_on must be 'unsharpened' or 'sharpened', got {self.mask_on!r}")

    def loss(self, logits_weak: Tensor, logits_strong: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(loss, mask_fraction)``; logits: [B, C]."""
        weak = logits_weak.detach()
        target = torch.softmax(weak / self.temperature, dim=-1)
        confidence = target if self.mask_on == "sharpened" else torch.softmax(weak, dim=-1)
        mask = (confidence.amax(-1) >= self.threshold).to(logits_strong.dtype)
        per_example = -(target * F.log_softmax(logits_strong, dim=-1)).sum(-1)
        return (per_example * mask).mean(), mask.mean()

    def weight_at(self, step: Tensor) -> Tensor:
        if not self.ramp_steps:
            return torch.full_like(step, self.weight)
        return self.weight * torch.clamp((step + 1) / self.ramp_steps, max=1.0)


class MPL:
    """Meta Pseudo Labels: a teacher that learns from how its pseudo labels help a student.

    Args:
        teacher, student: ``nn.Module`` classifiers mapping a batch to logits [B, C] with the
            same C. They hold the current weights after every step.
        teacher_optimizer, student_optimizer: ``metapl.optim`` optimizers (wrap them in
            ``optim.clip_grad_norm`` for gradient clipping; schedules go in their ``lr``).
        meta_grad: ``"exact"`` or ``"finite_difference"`` (soft labels), ``"first_order"``
            (hard labels: the paper's estimator, ``metapl.meta_grad``'s
            ``"score_function"``), or ``None`` for no MPL term (the pseudo-label / UDA
            baseline).
        pseudo_labels: ``"soft"`` (``softmax(z / temperature)``) or ``"hard"`` (sampled).
        uda: a ``UDA`` term for the teacher, or ``None``.
        vat: a ``metapl.VAT`` term for the teacher (on ``x_u``), or ``None``.
        student_view: the batch the student learns from, with the teacher's pseudo labels for
            it: ``"strong"`` (``x_u_strong`` when given, else ``x_u``: the paper's) or
            ``"weak"`` (``x_u``, also when ``x_u_strong`` is given for UDA).
        label_smoothing: for the teacher's supervised cross-entropy.
        compile: ``torch.compile`` the whole step (one graph).
        temperature: of the pseudo labels.
        ema_decay: keep ``ema_student``, an exponential moving average of the student's
            parameters and float buffers, for evaluation.
        h_baseline_decay: ``"first_order"`` only: subtract a moving average of ``h`` with this
            decay (the paper's control variate); ``None`` uses no moving average.
        log_prob_reduction: ``"first_order"`` only: ``"mean"`` averages the log-probability of
            the sampled labels over the batch (the paper's code), which makes the term 1/B_u of
            the score-function estimate of the gradient of the expected loss; ``"sum"`` is that
            estimate itself, on the scale of ``"exact"`` (for ablations comparing the two).
        fd_radius: ``"finite_difference"`` only: see ``metapl.meta_grad``.
        student_bn: the batch of the student's forward for its step on the pseudo labels:
            ``"joint"`` is ``cat(x_l, x_view)`` (the official code's and the PyTorch port's:
            BatchNorm batch and running statistics come from both; only the ``x_view`` rows
            enter the loss), ``"unlabeled"`` is ``x_view`` alone. Without BatchNorm (and
            without dropout) the two give the same step.
        lookahead_steps: K >= 1 student optimizer steps per MPL step on the same pseudo-labelled
            batch; the teacher's MPL gradient goes through all K (exactly for ``"exact"``; the
            score-function estimate ``"first_order"`` uses ``h = L_l(s_K) - L_l(s_0)`` with
            the labels sampled once). With ``meta_grad=None`` the student takes the same K
            steps (the matching baseline).
        mpl_weight: the MPL term's weight in the teacher's gradient, relative to its own
            losses (1.0: the paper's).

    Data parallel: when ``torch.distributed`` is initialized (e.g. under ``torchrun``), each
    process passes its share of the global batch. The student gradients (before the
    lookahead), the labeled-loss gradients and losses of the MPL term (first_order's h
    included), the teacher gradients and the BatchNorm statistics are averaged across
    processes, so N processes take the same steps as one process on the whole batch
    (BatchNorm normalises with per-process batch statistics, as DDP without SyncBatchNorm).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_optimizer: Optimizer,
        student_optimizer: Optimizer,
        meta_grad: str | None = "exact",
        pseudo_labels: str = "soft",
        uda: UDA | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
        *,
        temperature: float = 1.0,
        ema_decay: float | None = None,
        h_baseline_decay: float | None = None,
        fd_radius: float = 3e-4,
        log_prob_reduction: str = "mean",
        student_bn: str = "joint",
        lookahead_steps: int = 1,
        mpl_weight: float = 1.0,
        vat: VAT | None = None,
        student_view: str = "strong",
    ):
        _check_config(
            teacher,
            student,
            teacher_optimizer,
            student_optimizer,
            meta_grad,
            pseudo_labels,
            uda,
            vat,
            student_view,
            label_smoothing,
            temperature,
            ema_decay,
            h_baseline_decay,
            compile,
        )
        if (
            isinstance(lookahead_steps, bool)
            or not isinstance(lookahead_steps, int)
            or (lookahead_steps < 1)
        ):
            raise ValueError(f"lookahead_steps must be an int >= 1, got {lookahead_steps!r}")
        if not mpl_weight >= 0 or (meta_grad is None and mpl_weight != 1.0):
            raise ValueError(
                f"mpl_weight must be >= 0 and needs a meta_grad (there is no MPL term without "
                f"one), got {mpl_weight} with meta_grad={meta_grad!r}"
            )
        if log_prob_reduction not in ("mean", "sum"):
            raise ValueError(
                f"log_prob_reduction must be 'mean' (the paper's scale) or 'sum', got "
                f"{log_prob_reduction!r}"
            )
        if student_bn not in ("joint", "unlabeled"):
            raise ValueError(
                f"student_bn must be 'joint' (cat(x_l, x_u) through the student, the paper's "
                f"code) or 'unlabeled', got {student_bn!r}"
            )
        self.student_bn = student_bn
        self.teacher, self.student = teacher, student
        for module in (teacher, student):
            broadcast_module(module)  # identical replicas (a no-op in a single process)
        self.teacher_optimizer, self.student_optimizer = teacher_optimizer, student_optimizer
        self.meta_grad, self.pseudo_labels, self.uda = meta_grad, pseudo_labels, uda
        self.vat, self.student_view = vat, student_view
        self.label_smoothing, self.temperature = label_smoothing, temperature
        self.ema_decay = ema_decay
        self.h_baseline_decay = h_baseline_decay
        self.fd_radius = fd_radius
        self.log_prob_reduction = log_prob_reduction
        self.lookahead_steps, self.mpl_weight = lookahead_steps, mpl_weight
        self.teacher_state = teacher_optimizer.init(params_of(teacher))
        self.student_state = student_optimizer.init(params_of(student))
        device = next(teacher.parameters()).device
        self.counters = {
            "step": torch.zeros((), device=device),
            "h_baseline": torch.zeros((), device=device, dtype=next(student.parameters()).dtype),
        }
        self.ema_student = copy.deepcopy(student).eval() if ema_decay is not None else None
        self._num_classes: int | None = None  # of the teacher's logits, read by check_labels
        if self.ema_student is not None:
            self.ema_student.requires_grad_(False)
        self._step_fn = (
            torch.compile(self._pure_step, fullgraph=True) if compile else self._pure_step
        )

    @property
    def num_steps(self) -> int:
        return int(self.counters["step"])

    def check_labels(self, y: Tensor, x: Tensor) -> None:
        """Raise ValueError unless every label in ``y`` [N] is a class index of the teacher's
        logits, ``0 <= y < C``. C is read once from the teacher's output for ``x[:1]`` (model
        inputs; eval mode, no gradient) and kept. One host synchronisation."""
        if self._num_classes is None:
            was_training = self.teacher.training
            self.teacher.eval()
            with torch.no_grad():
                self._num_classes = int(self.teacher(x[:1]).shape[-1])
            self.teacher.train(was_training)
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
        self._check_batch(x_l, y_l, x_u, x_u_strong)
        x_m, y_m = self._check_mpl_batch(mpl_batch, x_l, y_l)
        if sync or y_l.device.type == "cpu" or self._num_classes is None:
            self.check_labels(y_l, x_l)
            if mpl_batch is not None:
                self.check_labels(y_m, x_m)
        self.teacher.train()
        self.student.train()
        ema = None
        if self.ema_student is not None:
            ema = (params_of(self.ema_student), buffers_of(self.ema_student))
        out = self._step_fn(
            params_of(self.teacher),
            buffers_of(self.teacher),
            params_of(self.student),
            buffers_of(self.student),
            self.teacher_state,
            self.student_state,
            self.counters,
            ema,
            x_l,
            y_l,
            x_u,
            x_u_strong,
            x_m,
            y_m,
        )
        (t_params, t_bufs, s_params, s_bufs, t_state, s_state, counters, ema, metrics) = out
        write_back(self.teacher, t_params, t_bufs)
        write_back(self.student, s_params, s_bufs)
        if self.ema_student is not None:
            write_back(self.ema_student, *ema)
        self.teacher_state, self.student_state, self.counters = t_state, s_state, counters
        return {k: float(v) for k, v in metrics.items()} if sync else metrics

    def _pure_step(
        self,
        t_params,
        t_bufs,
        s_params,
        s_bufs,
        t_state,
        s_state,
        counters,
        ema,
        x_l,
        y_l,
        x_u,
        x_us,
        x_m,
        y_m,
    ):
        """The whole step as a pure function (this is what ``compile=True`` compiles)."""
        step = counters["step"]
        reduce = all_reduce_mean if is_distributed() else None
        strong_view = x_us is not None and self.student_view == "strong"
        x_view = x_us if strong_view else x_u
        n_l, n_u = x_l.shape[0], x_u.shape[0]
        # the teacher's rows: x_l, then x_u and x_u_strong where the student's view, UDA or VAT
        # needs them
        with_x_u = not strong_view or self.uda is not None or self.vat is not None
        with_strong = strong_view or self.uda is not None
        parts = [x_l] + ([x_u] if with_x_u else []) + ([x_us] if with_strong else [])

        def teacher_losses(tp):
            logits, new_bufs = forward(self.teacher, tp, t_bufs, torch.cat(parts))
            logits_l, logits_u, logits_strong = logits[:n_l], logits[n_l : n_l + n_u], logits[-n_u:]
            z = logits_strong if strong_view else logits_u
            loss_sup = F.cross_entropy(logits_l, y_l, label_smoothing=self.label_smoothing)
            metrics = {"teacher/loss_sup": loss_sup.detach()}
            loss = loss_sup
            if self.uda is not None:
                loss_uda, mask = self.uda.loss(logits_u, logits_strong)
                weight = self.uda.weight_at(step.to(loss_uda.dtype))
                loss = loss + weight * loss_uda
                metrics.update(
                    {
                        "teacher/loss_uda": loss_uda.detach(),
                        "teacher/uda_mask": mask,
                        "teacher/uda_weight": weight,
                    }
                )
            if self.vat is not None:

                def logits_fn(x):
                    return forward_batch_stats(self.teacher, tp, t_bufs, x)

                loss_vat = self.vat.loss(logits_fn, x_u, logits_u)
                loss = loss + self.vat.weight * loss_vat
                metrics["teacher/loss_vat"] = loss_vat.detach()
            metrics["teacher/loss"] = loss.detach()
            return (loss, z), (new_bufs, metrics)

        (_, z), teacher_vjp, (t_bufs, metrics) = vjp(teacher_losses, t_params, has_aux=True)
        z = z.detach()

        def checked(logits):
            if logits.shape[-1] != z.shape[-1]:
                raise ValueError(
                    f"the student outputs {logits.shape[-1]} classes but the teacher "
                    f"{z.shape[-1]}; give both the same number of outputs"
                )
            return logits

        def student_on_view(sp, bufs):
            """The student's logits on x_view (its pseudo-label batch) and its new buffers."""
            if self.student_bn == "unlabeled":
                logits, new_bufs = forward(self.student, sp, bufs, x_view)
                return checked(logits), new_bufs
            logits, new_bufs = forward(self.student, sp, bufs, torch.cat([x_l, x_view]))
            return checked(logits)[n_l:], new_bufs

        if self.pseudo_labels == "soft":
            target = None

            def inner_loss(sp, labels, bufs):
                logits, new_bufs = student_on_view(sp, bufs)
                probs = torch.softmax(labels["z"] / self.temperature, dim=-1)
                return soft_cross_entropy(logits, probs), new_bufs
        else:
            target = _sample_categorical(z / self.temperature)

            def inner_loss(sp, labels, bufs):
                logits, new_bufs = student_on_view(sp, bufs)
                return F.cross_entropy(logits, target), new_bufs

        def outer_loss(sp, bufs):  # batch statistics, no running ones (it may run under vmap)
            return F.cross_entropy(checked(forward_batch_stats(self.student, sp, bufs, x_m)), y_m)

        def log_prob(labels):  # "mean": the paper's scale (1/B of the joint log-probability)
            log_p = F.log_softmax(labels["z"] / self.temperature, dim=-1)
            log_p = log_p.gather(-1, target[:, None])
            return log_p.mean() if self.log_prob_reduction == "mean" else log_p.sum()

        s_lr = self.student_optimizer.lr_at(s_state)
        if self.meta_grad is None:
            for k in range(self.lookahead_steps):  # running statistics advance at every step
                (s_grads, s_bufs), loss_k = _grad_aux_and_value(
                    inner_loss, s_params, {"z": z}, s_bufs
                )
                if k == 0:
                    loss_u = loss_k
                s_grads = reduce(s_grads) if reduce else s_grads
                s_params, s_state = self.student_optimizer.step(s_params, s_grads, s_state)
            dz = torch.zeros_like(z)
            metrics["student/loss_u"] = loss_u
        else:
            baseline = counters["h_baseline"] if self.h_baseline_decay is not None else 0.0
            method = _METHODS[self.meta_grad]
            options = {
                "finite_difference": {"fd_radius": self.fd_radius},
                "score_function": {"baseline": baseline, "log_prob": log_prob},
            }.get(method, {})
            res = compute_meta_grad(
                inner_loss,
                outer_loss,
                s_params,
                {"z": z},
                self.student_optimizer,
                s_state,
                steps=self.lookahead_steps,
                method=method,
                state=s_bufs,
                reduce=reduce,
                **options,
            )
            s_params, s_state, s_bufs, dz = (
                res.student_params,
                res.opt_state,
                res.state,
                res.teacher_grads["z"],
            )
            metrics["student/loss_l"] = res.outer_loss
            # Squared here; the whole batch's norm is taken after the mean across processes.
            metrics["mpl/grad_norm_logits"] = dz.square().sum()
            if res.h is not None:
                metrics["mpl/h"] = res.h
                if self.h_baseline_decay is not None:
                    metrics["mpl/h_baseline"] = counters["h_baseline"]
                    decay = self.h_baseline_decay
                    counters = {**counters, "h_baseline": decay * baseline + (1 - decay) * res.h}

        if self.mpl_weight != 1.0:
            dz = self.mpl_weight * dz
        (t_grads,) = teacher_vjp((torch.ones((), device=z.device, dtype=z.dtype), dz))
        if reduce:
            t_grads = reduce(t_grads)
            t_bufs, s_bufs = all_reduce_mean_floats(t_bufs), all_reduce_mean_floats(s_bufs)
            metrics = reduce(metrics)
        if "mpl/grad_norm_logits" in metrics:
            # Each process's dz is N x its rows of the one-process dz (its losses average over
            # B / N rows), so ||dz_full||^2 = mean_p ||dz_p||^2 / N.
            sq = metrics["mpl/grad_norm_logits"] / world_size()
            metrics["mpl/grad_norm_logits"] = torch.sqrt(sq)
        metrics["teacher/lr"] = torch.as_tensor(self.teacher_optimizer.lr_at(t_state))
        metrics["student/lr"] = torch.as_tensor(s_lr)
        t_params, t_state = self.teacher_optimizer.step(t_params, t_grads, t_state)
        if ema is not None:
            ema = _ema_update(ema, s_params, s_bufs, self.ema_decay)
        counters = {**counters, "step": step + 1}
        return t_params, t_bufs, s_params, s_bufs, t_state, s_state, counters, ema, metrics

    def _check_batch(self, x_l, y_l, x_u, x_u_strong) -> None:
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
        if self.uda is not None and x_u_strong is None:
            raise ValueError("UDA needs the strongly augmented view: pass x_u_strong")

    def _check_mpl_batch(self, mpl_batch, x_l: Tensor, y_l: Tensor) -> tuple[Tensor, Tensor]:
        """``mpl_batch`` checked, or ``(x_l, y_l)`` when it is None."""
        if mpl_batch is None:
            return x_l, y_l
        if self.meta_grad is None:
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
        return x_m, y_m

    def state_dict(self) -> dict:
        """Everything needed to resume training exactly (with the caller's RNG state)."""
        sd = {
            "teacher": self.teacher.state_dict(),
            "student": self.student.state_dict(),
            "teacher_state": self.teacher_state,
            "student_state": self.student_state,
            "counters": self.counters,
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
        self.teacher_state = _to(sd["teacher_state"], device)
        self.student_state = _to(sd["student_state"], device)
        self.counters = _to(sd["counters"], device)

    def finetune(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        optimizer: Optimizer,
        label_smoothing: float = 0.0,
        dropout: bool = False,
    ) -> list[float]:
        """Finetune the student on labeled batches after MPL (the paper's last phase; dropout
        off by default, as its code does): the EMA student when there is one (the model MPL
        reports), else the student. Both students then hold the finetuned model. Returns each
        step's loss."""
        from metapl.finetune import finetune

        final = self.ema_student if self.ema_student is not None else self.student
        losses = finetune(final, batches, optimizer, label_smoothing, dropout)
        other = self.student if final is self.ema_student else self.ema_student
        if other is not None:
            other.load_state_dict(final.state_dict())
        return losses


def _grad_aux_and_value(loss_fn, params, *args):
    """``((grads, aux), loss)`` of a ``loss_fn(params, *args) -> (loss, aux)``."""

    def with_value(p, *a):
        loss, aux = loss_fn(p, *a)
        return loss, (aux, loss.detach())

    grads, (aux, loss) = grad(with_value, has_aux=True)(params, *args)
    return (grads, aux), loss


def _sample_categorical(logits: Tensor) -> Tensor:
    """One class index per row of ``logits`` [B, C], sampled by the Gumbel-max trick in at
    least float32 (outside autocast): in bfloat16 the Gumbel noise loses its tails and rounding
    ties go to the lowest class, a visibly different distribution."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    with torch.autocast(logits.device.type, enabled=False):
        uniform = torch.rand_like(logits).clamp_(torch.finfo(logits.dtype).tiny, 1.0)
        return torch.argmax(logits - torch.log(-torch.log(uniform)), dim=-1)


def _ema_update(ema, params, buffers, decay):
    ema_params, ema_bufs = ema
    new_params = {k: decay * v + (1 - decay) * params[k] for k, v in ema_params.items()}
    new_bufs = {
        k: decay * v + (1 - decay) * buffers[k] if v.is_floating_point() else buffers[k]
        for k, v in ema_bufs.items()
    }
    return new_params, new_bufs


def _to(tree, device):
    if isinstance(tree, Tensor):
        return tree.to(device)
    return {k: _to(v, device) for k, v in tree.items()}


def _has_dropout(module: nn.Module) -> bool:
    dropouts = (
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.FeatureAlphaDropout,
    )
    return any(isinstance(m, dropouts) and m.p > 0 for m in module.modules())


def _check_label_shape(y: Tensor, x: Tensor, y_name: str, x_name: str) -> None:
    """``y`` must be integer class indices [N], one per row of ``x`` [N, ...]."""
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(
            f"{y_name} must be integer class indices of shape [{x.shape[0]}] (one per row of "
            f"{x_name}), got {y.dtype} of shape {tuple(y.shape)}"
        )


def _check_config(
    teacher,
    student,
    teacher_opt,
    student_opt,
    method,
    pseudo_labels,
    uda,
    vat,
    student_view,
    label_smoothing,
    temperature,
    ema_decay,
    h_baseline_decay,
    compile,
) -> None:
    if not (isinstance(teacher, nn.Module) and isinstance(student, nn.Module)):
        raise TypeError("teacher and student must be torch.nn.Module instances")
    if not (isinstance(teacher_opt, Optimizer) and isinstance(student_opt, Optimizer)):
        raise TypeError(
            "teacher_optimizer and student_optimizer must be metapl.optim optimizers "
            "(optim.sgd / adam / adamw), not torch.optim ones"
        )
    if method is not None and method not in _METHODS:
        raise ValueError(f"unknown meta_grad {method!r}; pass one of {tuple(_METHODS)} or None")
    if pseudo_labels not in ("soft", "hard"):
        raise ValueError(f"pseudo_labels must be 'soft' or 'hard', got {pseudo_labels!r}")
    if method in ("exact", "finite_difference") and pseudo_labels == "hard":
        raise ValueError(
            f"meta_grad={method!r} differentiates through the pseudo labels, which sampled hard "
            "labels are not: use pseudo_labels='soft', or meta_grad='first_order' for hard labels"
        )
    if method == "first_order" and pseudo_labels == "soft":
        raise ValueError(
            "meta_grad='first_order' is the score-function estimator for sampled labels: use "
            "pseudo_labels='hard', or meta_grad='exact' for soft labels"
        )
    if method == "finite_difference" and compile and _has_dropout(student):
        raise ValueError(
            "meta_grad='finite_difference' replays the student's dropout masks, which "
            "torch.compile cannot do: pass compile=False, use meta_grad='exact', or a student "
            "without dropout"
        )
    if uda is not None and not isinstance(uda, UDA):
        raise TypeError("uda must be a metapl.UDA(weight, temperature, threshold) or None")
    if vat is not None and not isinstance(vat, VAT):
        raise TypeError("vat must be a metapl.VAT(weight, epsilon) or None")
    if vat is not None and compile:
        # measured on torch 2.13: with a dropout student and meta_grad="exact" the compiled
        # step's VAT loss came out as exactly 0 (eager: the closed form of tests/test_vat)
        raise ValueError(
            "vat does not compile reliably (its power iteration differentiates with respect "
            "to the input inside the step): pass compile=False"
        )
    if student_view not in ("strong", "weak"):
        raise ValueError(
            f"student_view must be 'strong' (x_u_strong, the paper's) or 'weak' (x_u), got "
            f"{student_view!r}"
        )
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ema_decay is not None and not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay}")
    if h_baseline_decay is not None and (method != "first_order" or not 0 <= h_baseline_decay < 1):
        raise ValueError(
            "h_baseline_decay must be in [0, 1) and needs meta_grad='first_order'; "
            f"got {h_baseline_decay} with meta_grad={method!r}"
        )
