"""One MPL step as a pure function of the state and a batch: what ``torch.compile`` fuses.

1. The teacher runs once, in training mode, on ``cat(x_l, x_u, x_u_strong)`` (the parts it
   needs). Its own loss is cross-entropy on the labeled batch (with label smoothing) plus, with
   ``uda``, the UDA consistency loss between its sharpened, confidence-masked prediction on
   ``x_u`` and its prediction on ``x_u_strong``; with ``vat``, the VAT loss on ``x_u``.
2. Its logits ``z`` on the student's view (``x_u_strong``, else ``x_u``; ``x_u`` with
   ``student_view="weak"``) become pseudo labels: ``softmax(z / temperature)`` ("soft") or a
   sample from it ("hard").
3. The student takes ``lookahead_steps`` (K) optimizer steps on the pseudo labels of this one
   batch. Those steps are the lookahead of the meta-gradient *and* the student's real update:
   their gradients are computed once.
4. The MPL term: the gradient of the updated student's labeled cross-entropy (on the MPL
   batch, by default ``(x_l, y_l)``) with respect to ``z`` (``metapl.meta_grad`` with the
   logits as the meta parameters, through all K steps), times ``mpl_weight``, pushed through
   the teacher together with its own loss in a single backward pass (one VJP).

BatchNorm: the teacher's running statistics advance once per step, from its forward on the
concatenated batch; the student's once per optimizer step (carried through
``meta_grad(..., state=)``), from its forward on ``cat(x_l, x_view)`` (``student_bn="joint"``:
the official code's; the loss is on the ``x_view`` rows only) or on ``x_view`` alone
(``"unlabeled"``). The student's forward on the MPL batch after its steps uses batch
statistics and leaves the running statistics alone. Dropout is active in every forward, except
in that last one with ``mpl_dropout=False`` (the student in eval mode, BatchNorm still on the
batch's statistics): then the MPL term draws no random numbers, and the step draws exactly the
ones the step without an MPL term (``meta_grad=None``) draws.

Data parallel: ``reduce`` averages a flat dict of tensors across processes (e.g.
``metapl.distributed.all_reduce_mean``). The student gradients before each lookahead step, the
labeled-loss gradients and losses of the MPL term (the score function's ``h`` included), the
teacher gradients, the BatchNorm statistics and the metrics are averaged, so N processes, each
with its share of the batch, take the steps one process takes on the whole batch (BatchNorm
normalises with per-process batch statistics, as DDP without SyncBatchNorm).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vjp

from metapl.functional import forward, forward_batch_stats, reduce_float_buffers, soft_cross_entropy
from metapl.metagrad import meta_grad
from metapl.mpl.config import MPLConfig
from metapl.mpl.losses import sample_categorical
from metapl.mpl.state import MPLState, Net, ema_update

__all__ = ["Batch", "mpl_step"]

Metrics = dict[str, Tensor]
Reduce = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class Batch(NamedTuple):
    """One step's data: labeled ``(x_l [B_l, ...], y_l [B_l])``, unlabeled ``x_u [B_u, ...]``
    with its strongly augmented view ``x_u_strong``, and the labeled batch ``(x_mpl, y_mpl)``
    the updated student is scored on for the MPL signal (None: ``(x_l, y_l)``)."""

    x_l: Tensor
    y_l: Tensor
    x_u: Tensor
    x_u_strong: Tensor | None = None
    x_mpl: Tensor | None = None
    y_mpl: Tensor | None = None


def mpl_step(
    config: MPLConfig, state: MPLState, batch: Batch, reduce: Reduce | None = None
) -> tuple[MPLState, Metrics]:
    """One MPL step: the new state and the step's metrics (0-d tensors)."""
    z, teacher_vjp, t_buffers, metrics = _teacher_forward(config, state.teacher, batch, state.step)
    student, dz, h_baseline, student_metrics = _student_update(
        config, state.student, z, batch, state.h_baseline, reduce
    )
    metrics |= student_metrics
    (t_grads,) = teacher_vjp(
        (torch.ones((), device=z.device, dtype=z.dtype), config.mpl_weight * dz)
    )
    if reduce is not None:
        t_grads, metrics = reduce(t_grads), reduce(metrics)
        t_buffers = reduce_float_buffers(reduce, t_buffers)
        student = student._replace(buffers=reduce_float_buffers(reduce, student.buffers))
    if "mpl/grad_rms_logits" in metrics:
        metrics["mpl/grad_rms_logits"] = torch.sqrt(metrics["mpl/grad_rms_logits"])
    metrics["teacher/lr"] = torch.as_tensor(config.teacher_optimizer.lr_at(state.teacher.opt))
    metrics["student/lr"] = torch.as_tensor(config.student_optimizer.lr_at(state.student.opt))
    t_params, t_opt = config.teacher_optimizer.step(
        state.teacher.params, t_grads, state.teacher.opt
    )
    ema = state.ema
    if ema is not None:
        ema = ema_update(ema, student, config.ema_decay)
    teacher = Net(t_params, t_buffers, t_opt)
    return MPLState(teacher, student, ema, state.step + 1, h_baseline), metrics


def _views(config: MPLConfig, batch: Batch) -> tuple[bool, Tensor]:
    """Whether the student learns from the strong view, and that view."""
    strong = batch.x_u_strong is not None and config.student_view == "strong"
    return strong, batch.x_u_strong if strong else batch.x_u


def _teacher_forward(config: MPLConfig, teacher: Net, batch: Batch, step: Tensor):
    """The teacher's own losses and its logits ``z`` on the student's view: ``(z, vjp, new
    buffers, metrics)``, where ``vjp((1, dz))`` is the gradient of its loss plus ``<dz, z>``."""
    x_l, x_u, x_us = batch.x_l, batch.x_u, batch.x_u_strong
    strong, _ = _views(config, batch)
    n_l, n_u = x_l.shape[0], x_u.shape[0]
    # the teacher's rows: x_l, then x_u and x_u_strong where the student's view, UDA or VAT
    # needs them
    with_x_u = not strong or config.uda is not None or config.vat is not None
    with_strong = strong or config.uda is not None
    parts = [x_l] + ([x_u] if with_x_u else []) + ([x_us] if with_strong else [])

    def losses(params):
        logits, new_buffers = forward(config.teacher, params, teacher.buffers, torch.cat(parts))
        logits_l, logits_u, logits_strong = logits[:n_l], logits[n_l : n_l + n_u], logits[-n_u:]
        loss = F.cross_entropy(logits_l, batch.y_l, label_smoothing=config.label_smoothing)
        metrics = {"teacher/loss_sup": loss.detach()}
        if config.uda is not None:
            loss_uda, mask = config.uda.loss(logits_u, logits_strong)
            weight = config.uda.weight_at(step.to(loss_uda.dtype))
            loss = loss + weight * loss_uda
            metrics |= {
                "teacher/loss_uda": loss_uda.detach(),
                "teacher/uda_mask": mask,
                "teacher/uda_weight": weight,
            }
        if config.vat is not None:

            def logits_fn(x):
                return forward_batch_stats(config.teacher, params, teacher.buffers, x)

            loss_vat = config.vat.loss(logits_fn, x_u, logits_u)
            loss = loss + config.vat.weight * loss_vat
            metrics["teacher/loss_vat"] = loss_vat.detach()
        metrics["teacher/loss"] = loss.detach()
        return (loss, logits_strong if strong else logits_u), (new_buffers, metrics)

    (_, z), teacher_vjp, (new_buffers, metrics) = vjp(losses, teacher.params, has_aux=True)
    return z.detach(), teacher_vjp, new_buffers, metrics


def _student_update(
    config: MPLConfig, student: Net, z: Tensor, batch: Batch, h_baseline: Tensor, reduce
) -> tuple[Net, Tensor, Tensor, Metrics]:
    """The student's K steps on the pseudo labels of ``z`` and the MPL term ``dz`` (d of its
    labeled loss after the steps / d z; zeros without a meta_grad): ``(student, dz,
    h_baseline, metrics)``."""
    _, x_view = _views(config, batch)
    x_l, n_l = batch.x_l, batch.x_l.shape[0]
    x_m = batch.x_l if batch.x_mpl is None else batch.x_mpl
    y_m = batch.y_l if batch.y_mpl is None else batch.y_mpl
    model = config.student

    def logits_on_view(params, buffers):
        if config.student_bn == "unlabeled":
            return forward(model, params, buffers, x_view)
        logits, new_buffers = forward(model, params, buffers, torch.cat([x_l, x_view]))
        return logits[n_l:], new_buffers

    target = sample_categorical(z / config.temperature) if config.pseudo_labels == "hard" else None

    def inner_loss(params, labels, buffers):
        logits, new_buffers = logits_on_view(params, buffers)
        if target is not None:
            return F.cross_entropy(logits, target), new_buffers
        return soft_cross_entropy(
            logits, torch.softmax(labels["z"] / config.temperature, -1)
        ), new_buffers

    def outer_loss(params, buffers):  # batch statistics, no running ones
        logits = forward_batch_stats(config.student_scorer, params, buffers, x_m)
        return F.cross_entropy(logits, y_m)

    def log_prob(labels):  # "mean": the paper's scale (1/B of the joint log-probability)
        log_p = F.log_softmax(labels["z"] / config.temperature, dim=-1).gather(-1, target[:, None])
        return log_p.mean() if config.log_prob_reduction == "mean" else log_p.sum()

    if config.meta_grad is None:
        params, buffers, opt = student
        for k in range(config.lookahead_steps):  # running statistics advance at every step
            grads, (buffers, loss) = grad(_with_value(inner_loss), has_aux=True)(
                params, {"z": z}, buffers
            )
            if k == 0:
                loss_u = loss
            grads = reduce(grads) if reduce is not None else grads
            params, opt = config.student_optimizer.step(params, grads, opt)
        return (
            Net(params, buffers, opt),
            torch.zeros_like(z),
            h_baseline,
            {"student/loss_u": loss_u},
        )

    sampled = config.samples_labels
    baseline = h_baseline if sampled and config.h_baseline_decay is not None else 0.0
    options = {
        "exact": {"curvature": config.curvature},
        "finite_difference": {"fd_radius": config.fd_radius},
        "score_function": {"baseline": baseline, "log_prob": log_prob},
    }.get(config.meta_grad, {})
    res = meta_grad(
        inner_loss,
        outer_loss,
        student.params,
        {"z": z},
        config.student_optimizer,
        student.opt,
        steps=config.lookahead_steps,
        method=config.meta_grad,
        state=student.buffers,
        reduce=reduce,
        **options,
    )
    dz = res.meta_grads["z"]
    # the root mean square over the rows of the per-example gradient B * dz_i: the same for
    # any batch size and number of processes (the square root is taken after the mean)
    metrics = {
        "student/loss_l": res.outer_loss,
        "mpl/grad_rms_logits": (dz * dz.shape[0]).square().sum(-1).mean(),
    }
    if res.h is not None:
        metrics["mpl/h"] = res.h
        if config.h_baseline_decay is not None:
            metrics["mpl/h_baseline"] = h_baseline
            h_baseline = (
                config.h_baseline_decay * h_baseline + (1 - config.h_baseline_decay) * res.h
            )
    return Net(res.student_params, res.state, res.opt_state), dz, h_baseline, metrics


def _with_value(loss_fn):
    """``loss_fn(*args) -> (loss, aux)`` as ``(loss, (aux, detached loss))`` for ``grad``."""

    def fn(*args):
        loss, aux = loss_fn(*args)
        return loss, (aux, loss.detach())

    return fn
