"""metapl.MPL against computations written by hand with plain torch.autograd.

Every reference here is independent of metapl: the models' forward passes, the losses, the
pseudo labels, the student lookahead and both optimizer updates are spelled out in this file
(only the Gumbel-max sampler, whose random stream cannot be re-derived otherwise, is shared;
``test_sampler_draws_from_the_softmax`` checks it on its own). Small float64 tanh MLPs make the
comparisons tight (1e-10).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from reference import ref_adamw
from torch import Tensor, nn
from torch.func import vmap

import metapl
from metapl import optim
from metapl.functional import forward, forward_batch_stats
from metapl.mpl import sample_categorical

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


# --------------------------------------------------------------------------- models and batches


def mlp(d_in=2, hidden=16, classes=3, *, seed=0, bn=False, dropout=0.0, dtype=F64) -> nn.Module:
    """Linear -> [BatchNorm1d] -> tanh -> [Dropout] -> Linear."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = [nn.Linear(d_in, hidden)]
        layers += [nn.BatchNorm1d(hidden, momentum=0.3)] if bn else []
        layers += [nn.Tanh()]
        layers += [nn.Dropout(dropout)] if dropout else []
        layers += [nn.Linear(hidden, classes)]
        return nn.Sequential(*layers).to(dtype)


def hand_mlp(p: dict[str, Tensor], x: Tensor) -> Tensor:
    """The training-mode forward of ``mlp()`` without dropout, written out."""
    h, last = x @ p["0.weight"].T + p["0.bias"], "2"
    if "1.weight" in p:  # BatchNorm1d: normalised with the statistics of this batch
        mean, var = h.mean(0), h.var(0, unbiased=False)
        h, last = (h - mean) / torch.sqrt(var + 1e-5) * p["1.weight"] + p["1.bias"], "3"
    return torch.tanh(h) @ p[f"{last}.weight"].T + p[f"{last}.bias"]


@dataclass
class Batch:
    x_l: Tensor
    y_l: Tensor
    x_u: Tensor
    x_us: Tensor | None
    mpl_batch: tuple[Tensor, Tensor] | None = None  # a separate labeled batch for the MPL signal

    def x_view(self, student_view: str = "strong") -> Tensor:  # what the student trains on
        return self.x_us if self.x_us is not None and student_view == "strong" else self.x_u

    def args(self):
        return self.x_l, self.y_l, self.x_u, self.x_us


def make_batch(seed=0, n_l=8, n_u=12, d=2, classes=3, strong=True, dtype=F64, n_mpl=0) -> Batch:
    gen = torch.Generator().manual_seed(1000 + seed)
    x_u = torch.randn(n_u, d, generator=gen, dtype=dtype)
    batch = Batch(
        x_l=torch.randn(n_l, d, generator=gen, dtype=dtype) + 0.5,  # other stats than x_u
        y_l=torch.randint(0, classes, (n_l,), generator=gen),
        x_u=x_u,
        x_us=x_u + 0.5 * torch.randn(n_u, d, generator=gen, dtype=dtype) if strong else None,
    )
    if n_mpl:
        batch.mpl_batch = (
            torch.randn(n_mpl, d, generator=gen, dtype=dtype) - 0.5,
            torch.randint(0, classes, (n_mpl,), generator=gen),
        )
    return batch


def params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def buffers(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def leaves(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in tree.items()}


def detach(tree):
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: detach(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(detach(v) for v in tree)
    return tree


def assert_tree_close(got, expected, rtol=1e-10, atol=1e-12, path="") -> None:
    """Leafwise comparison of nested dicts of tensors / numbers (same keys required)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), f"{path}: expected a dict, got {type(got).__name__}"
        assert sorted(got) == sorted(expected), f"{path}: keys {sorted(got)} != {sorted(expected)}"
        for k in expected:
            assert_tree_close(got[k], expected[k], rtol, atol, f"{path}/{k}")
        return
    got = torch.as_tensor(got).detach().to(F64)
    expected = torch.as_tensor(expected).detach().to(F64)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")


def assert_tree_equal(got, expected, path="") -> None:
    """Bitwise equality of nested dicts of tensors."""
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), f"{path}: keys {sorted(got)} != {sorted(expected)}"
        for k in expected:
            assert_tree_equal(got[k], expected[k], f"{path}/{k}")
        return
    assert torch.equal(got, expected), f"{path} differs"


def assert_metrics(got: dict[str, float], expected: dict[str, Tensor | float], rel=1e-10):
    missing = sorted(set(expected) - set(got))
    assert not missing, f"metrics {missing} missing from {sorted(got)}"
    for k, v in expected.items():
        assert got[k] == pytest.approx(float(v), rel=rel, abs=1e-12), k


# --------------------------------------------------------------------------- hand references


def hand_sgd(lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD's update (dampening 0); the zero buffer reproduces ``buf = d`` at step 0."""

    def init(p):
        return {"step": 0, "momentum": {k: torch.zeros_like(v) for k, v in p.items()}}

    def step(p, g, state):
        new_p, bufs = {}, {}
        for k in p:
            d = g[k] + weight_decay * p[k]
            bufs[k] = momentum * state["momentum"][k] + d
            d = d + momentum * bufs[k] if nesterov else bufs[k]
            new_p[k] = p[k] - lr * d
        return new_p, {"step": state["step"] + 1, "momentum": bufs}

    return init, step


# name: (metapl optimizer, hand optimizer) with the same hyperparameters
OPTIMIZERS = {
    "momentum": lambda: (
        optim.sgd(0.5, momentum=0.9, weight_decay=5e-3),
        hand_sgd(0.5, momentum=0.9, weight_decay=5e-3),
    ),
    "nesterov": lambda: (
        optim.sgd(0.2, momentum=0.8, nesterov=True, weight_decay=1e-3),
        hand_sgd(0.2, momentum=0.8, nesterov=True, weight_decay=1e-3),
    ),
    # eps=1e-2: with a tiny eps one Adam step is sign descent and hides gradient errors
    "adamw": lambda: (
        optim.adamw(0.05, eps=1e-2, weight_decay=0.01),
        ref_adamw(0.05, eps=1e-2, weight_decay=0.01),
    ),
}


@dataclass
class Config:
    meta_grad: str | None = "exact"
    pseudo_labels: str = "soft"
    uda: metapl.UDA | None = None
    label_smoothing: float = 0.0
    temperature: float = 0.7
    teacher_opt: str = "nesterov"
    student_opt: str = "momentum"
    h_baseline_decay: float | None = None
    student_bn: str = "joint"
    student_view: str = "strong"
    extra: dict = field(default_factory=dict)

    def mpl(self, teacher, student, **kwargs) -> metapl.MPL:
        kwargs = {**self.extra, **kwargs}
        if self.h_baseline_decay is not None:
            kwargs["h_baseline_decay"] = self.h_baseline_decay
        return metapl.MPL(
            teacher,
            student,
            OPTIMIZERS[self.teacher_opt]()[0],
            OPTIMIZERS[self.student_opt]()[0],
            meta_grad=self.meta_grad,
            pseudo_labels=self.pseudo_labels,
            uda=self.uda,
            label_smoothing=self.label_smoothing,
            temperature=self.temperature,
            student_bn=self.student_bn,
            student_view=self.student_view,
            **kwargs,
        )


def smoothed_ce(logits: Tensor, y: Tensor, eps: float) -> Tensor:
    """Cross-entropy against ``(1 - eps) one_hot(y) + eps / C``."""
    log_p = torch.log_softmax(logits, dim=-1)
    nll = -log_p.gather(1, y[:, None]).squeeze(1)
    return ((1 - eps) * nll - eps * log_p.mean(-1)).mean()


def hand_teacher_loss(tp, batch: Batch, cfg: Config, step: int):
    """The teacher's own loss and its logits ``z`` on the student's view, from one forward."""
    x_view = batch.x_view(cfg.student_view)
    on_weak = x_view is batch.x_u  # then the rows are x_l, x_u (the view), x_u_strong (UDA's)
    parts = [batch.x_l] + ([batch.x_u] if cfg.uda and not on_weak else []) + [x_view]
    logits = hand_mlp(tp, torch.cat(parts + ([batch.x_us] if cfg.uda and on_weak else [])))
    n_l, n_u = len(batch.x_l), len(batch.x_u)
    loss_sup = smoothed_ce(logits[:n_l], batch.y_l, cfg.label_smoothing)
    metrics = {"teacher/loss_sup": loss_sup}
    loss = loss_sup
    if cfg.uda:
        u = cfg.uda
        weak, strong = logits[n_l : n_l + n_u].detach(), logits[-n_u:]
        q = torch.softmax(weak / u.temperature, dim=-1)
        confidence = q if u.mask_on == "sharpened" else torch.softmax(weak, dim=-1)
        mask = (confidence.max(-1).values >= u.threshold).to(F64)
        loss_uda = (mask * -(q * torch.log_softmax(strong, dim=-1)).sum(-1)).mean()
        weight = u.weight * min(1.0, (step + 1) / u.ramp_steps) if u.ramp_steps else u.weight
        loss = loss + weight * loss_uda
        metrics |= {
            "teacher/loss_uda": loss_uda,
            "teacher/uda_mask": mask.mean(),
            "teacher/uda_weight": weight,
        }
    metrics["teacher/loss"] = loss
    return loss, logits[n_l : n_l + n_u] if on_weak else logits[-n_u:], metrics


def hand_step(t, s, t_state, s_state, batch: Batch, cfg: Config, step: int, seed=None, h_b=0.0):
    """One MPL step by hand. Returns new (t, s, t_state, s_state), the metrics, new baseline."""
    t_init, t_opt = OPTIMIZERS[cfg.teacher_opt]()[1]
    s_init, s_opt = OPTIMIZERS[cfg.student_opt]()[1]
    t_state = t_init(t) if t_state is None else t_state
    s_state = s_init(s) if s_state is None else s_state
    tp, sp = leaves(t), leaves(s)
    loss_t, z, metrics = hand_teacher_loss(tp, batch, cfg, step)
    x_m, y_m = batch.mpl_batch or (batch.x_l, batch.y_l)
    labeled_ce = lambda p: F.cross_entropy(hand_mlp(p, x_m), y_m)  # noqa: E731
    if cfg.pseudo_labels == "soft":
        probs = torch.softmax(z / cfg.temperature, dim=-1)
        if cfg.meta_grad is None:
            probs = probs.detach()
        pseudo_loss = lambda lg: -(probs * torch.log_softmax(lg, dim=-1)).sum(-1).mean()  # noqa: E731
    else:
        torch.manual_seed(seed)
        y_hat = sample_categorical(z.detach() / cfg.temperature)
        pseudo_loss = lambda lg: F.cross_entropy(lg, y_hat)  # noqa: E731
    exact = cfg.meta_grad == "exact"
    new_s = sp  # K lookahead steps on the same batch, unrolled with plain autograd
    for k in range(cfg.extra.get("lookahead_steps", 1)):
        if cfg.student_bn == "joint":  # one forward on cat(x_l, x_view); the loss on its rows
            x_lv = torch.cat([batch.x_l, batch.x_view(cfg.student_view)])
            logits_u = hand_mlp(new_s, x_lv)[len(batch.x_l) :]
        else:
            logits_u = hand_mlp(new_s, batch.x_view(cfg.student_view))
        loss_k = pseudo_loss(logits_u)
        if k == 0:
            loss_u = loss_k
        g_s = torch.autograd.grad(loss_k, list(new_s.values()), create_graph=exact)
        new_s, s_state = s_opt(new_s, dict(zip(sp, g_s, strict=True)), s_state)
    weight = cfg.extra.get("mpl_weight", 1.0)
    total = loss_t
    if cfg.meta_grad is None:
        metrics["student/loss_u"] = loss_u
    elif exact:
        loss_l = labeled_ce(new_s)  # depends on the teacher through the pseudo labels
        (dz,) = torch.autograd.grad(loss_l, z, retain_graph=True)
        metrics |= {
            "student/loss_l": loss_l,
            "mpl/grad_rms_logits": (dz * dz.shape[0]).norm(dim=-1).square().mean().sqrt(),
        }
        total = total + weight * loss_l
    else:  # first_order: (L_l(s') - L_l(s) - baseline) * grad mean_i log p_T(y_hat_i)
        loss_l = labeled_ce(new_s)
        h = (loss_l - labeled_ce(sp)).detach()
        log_p = torch.log_softmax(z / cfg.temperature, dim=-1).gather(1, y_hat[:, None])
        log_p = log_p.sum() if cfg.extra.get("log_prob_reduction") == "sum" else log_p.mean()
        total = total + weight * (h - h_b) * log_p
        metrics |= {"student/loss_l": loss_l, "mpl/h": h}
        if cfg.h_baseline_decay is not None:
            metrics["mpl/h_baseline"] = h_b
            h_b = cfg.h_baseline_decay * h_b + (1 - cfg.h_baseline_decay) * h
    g_t = torch.autograd.grad(total, list(tp.values()))
    new_t, t_state = t_opt(tp, dict(zip(tp, g_t, strict=True)), t_state)
    out = detach((new_t, new_s, t_state, s_state, metrics))
    return (*out, h_b)


def run_both(cfg: Config, steps=2, strong=True, seeds=(11, 12, 13), bn=False, n_mpl=0):
    """``steps`` MPL steps and the same steps by hand; returns both trajectories' ends."""
    teacher, student = mlp(seed=1, bn=bn), mlp(seed=2, bn=bn)
    t, s = params(teacher), params(student)
    mpl = cfg.mpl(teacher, student)
    t_state = s_state = None
    h_b = 0.0
    for k in range(steps):
        batch = make_batch(seed=k, strong=strong, n_mpl=n_mpl)
        torch.manual_seed(seeds[k])
        got = mpl.step(*batch.args(), mpl_batch=batch.mpl_batch)
        t, s, t_state, s_state, expected, h_b = hand_step(
            t, s, t_state, s_state, batch, cfg, k, seed=seeds[k], h_b=h_b
        )
        assert_metrics(got, expected)
    return mpl, (t, s, t_state, s_state, h_b)


def assert_matches_hand(mpl: metapl.MPL, hand, rtol=1e-10, atol=1e-12):
    t, s, t_state, s_state, _ = hand
    assert_tree_close(params(mpl.teacher), t, rtol, atol, "teacher")
    assert_tree_close(params(mpl.student), s, rtol, atol, "student")
    assert_tree_close(mpl.state.teacher.opt, t_state, rtol, atol, "teacher_state")
    assert_tree_close(mpl.state.student.opt, s_state, rtol, atol, "student_state")


def uda_for(threshold_split=True, **kwargs) -> metapl.UDA:
    """A UDA term whose confidence threshold masks about half of the first unlabeled batch."""
    with torch.no_grad():
        conf = torch.softmax(mlp(seed=1)(make_batch(0).x_u), dim=-1).amax(-1).sort().values
    mid = len(conf) // 2
    threshold = float(conf[mid - 1] + conf[mid]) / 2 if threshold_split else 0.0
    return metapl.UDA(threshold=threshold, **kwargs)


# --------------------------------------------------------------------------- 1. exact


@pytest.mark.parametrize("teacher_opt", ["nesterov", "adamw"])
def test_exact_soft_step_equals_hand_computation(teacher_opt):
    cfg = Config(meta_grad="exact", teacher_opt=teacher_opt)
    mpl, hand = run_both(cfg, steps=1)
    assert_matches_hand(mpl, hand)
    # the MPL term is a real part of the teacher's gradient: without it the teacher differs
    no_mpl = Config(meta_grad=None, teacher_opt=teacher_opt)
    _, hand_no_mpl = run_both(no_mpl, steps=1)
    assert (hand[0]["2.weight"] - hand_no_mpl[0]["2.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("strong", [True, False], ids=["x_u_strong", "x_u_only"])
def test_exact_two_steps_equal_hand_computation(strong):
    """The second step starts from non-zero momentum buffers and a step counter of 1."""
    cfg = Config(meta_grad="exact", label_smoothing=0.1, teacher_opt="adamw")
    mpl, hand = run_both(cfg, steps=2, strong=strong)
    assert_matches_hand(mpl, hand)
    assert mpl.num_steps == 2


def test_exact_with_uda_and_label_smoothing_equals_hand_computation():
    uda = uda_for(weight=0.3, temperature=0.4, ramp_steps=3)  # 0.3 / 3: not exact in float32
    cfg = Config(meta_grad="exact", uda=uda, label_smoothing=0.2)
    teacher, student = mlp(seed=1), mlp(seed=2)
    mpl = cfg.mpl(teacher, student)
    batch = make_batch(0)
    got = mpl.step(*batch.args())
    assert got["teacher/uda_weight"] == pytest.approx(0.3 * 1 / 3, rel=1e-12)  # (0 + 1) / ramp
    assert 0 < got["teacher/uda_mask"] < 1  # the mask actually selects
    mpl, hand = run_both(cfg, steps=2)  # step 1 ramps to (1 + 1) / 3
    assert_matches_hand(mpl, hand)


def test_uda_mask_on_the_sharpened_prediction_equals_hand_computation():
    """mask_on="sharpened" (the official MPL code): the threshold applies to q = softmax(z / T),
    which is more confident than softmax(z), so more examples pass than with the default."""
    uda = uda_for(weight=0.5, temperature=0.4, mask_on="sharpened")
    cfg = Config(meta_grad="exact", uda=uda)
    mpl, hand = run_both(cfg, steps=2)
    assert_matches_hand(mpl, hand)
    unsharpened = Config(meta_grad="exact", uda=uda_for(weight=0.5, temperature=0.4))
    first = cfg.mpl(mlp(seed=1), mlp(seed=2)).step(*make_batch(0).args())
    default = unsharpened.mpl(mlp(seed=1), mlp(seed=2)).step(*make_batch(0).args())
    assert first["teacher/uda_mask"] > default["teacher/uda_mask"]


@pytest.mark.parametrize("student_bn", ["joint", "unlabeled"])
@pytest.mark.parametrize("method", ["exact", "exact-forward", "first_order"])
def test_step_with_batchnorm_equals_hand_computation(method, student_bn):
    """With BatchNorm the teacher normalises over the whole concatenated batch (so its pseudo
    labels depend on x_l too, and so does the MPL gradient); the student's pseudo-label step
    normalises over cat(x_l, x_view) ("joint") or x_view alone; its labeled loss after the step
    uses the labeled batch's own statistics."""
    hard = method == "first_order"
    cfg = Config(
        meta_grad=method.removesuffix("-forward"),
        pseudo_labels="hard" if hard else "soft",
        temperature=1.5,
        uda=uda_for(ramp_steps=3),
        label_smoothing=0.1,
        teacher_opt="adamw",
        h_baseline_decay=0.8 if hard else None,
        student_bn=student_bn,
        extra={"curvature": "forward"} if method == "exact-forward" else {},
    )
    mpl, hand = run_both(cfg, steps=2, bn=True)
    assert_matches_hand(mpl, hand)


def test_student_bn_choice_changes_the_step_with_batchnorm_only():
    batch = make_batch(0)
    steps = {}
    for bn in (False, True):
        for choice in ("joint", "unlabeled"):
            mpl = Config(student_bn=choice).mpl(mlp(seed=1, bn=bn), mlp(seed=2, bn=bn))
            mpl.step(*batch.args())
            steps[bn, choice] = params(mpl.student)
    assert_tree_close(steps[False, "joint"], steps[False, "unlabeled"], **TIGHT)
    diff = (steps[True, "joint"]["0.weight"] - steps[True, "unlabeled"]["0.weight"]).abs().max()
    assert diff > 1e-4
    with pytest.raises(ValueError, match="student_bn must be 'joint'"):
        Config(student_bn="both").mpl(mlp(seed=1), mlp(seed=2))


WEAK_VIEW = {
    "exact_uda_bn": (
        Config(
            meta_grad="exact",
            uda=uda_for(weight=0.7),
            student_view="weak",
            student_bn="unlabeled",
            teacher_opt="adamw",
        ),
        True,
    ),
    "first_order_uda": (
        Config(
            meta_grad="first_order",
            pseudo_labels="hard",
            uda=uda_for(),
            student_view="weak",
            h_baseline_decay=0.8,
        ),
        False,
    ),
    "no_meta_grad_uda_bn": (
        Config(meta_grad=None, uda=uda_for(weight=1.5), student_view="weak"),
        True,
    ),
}


@pytest.mark.parametrize("name", sorted(WEAK_VIEW))
def test_student_on_the_weak_view_equals_hand_computation(name):
    """student_view="weak": the teacher still sees x_u_strong for UDA (one forward on
    cat(x_l, x_u, x_u_strong)), but its pseudo labels and the student's steps are on x_u."""
    cfg, bn = WEAK_VIEW[name]
    mpl, hand = run_both(cfg, steps=2, bn=bn)
    assert_matches_hand(mpl, hand)
    on_strong = Config(**{**cfg.__dict__, "student_view": "strong"})
    _, hand_on_strong = run_both(on_strong, steps=2, bn=bn)
    assert (hand[1]["0.weight"] - hand_on_strong[1]["0.weight"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="student_view must be 'strong'"):
        Config(student_view="clean").mpl(mlp(seed=1), mlp(seed=2))


# --------------------------------------------------------------------------- 2. finite difference


@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "batchnorm"])
def test_finite_difference_step_approximates_exact(bn):
    batch = make_batch(0)
    teacher, student = mlp(seed=1, bn=bn), mlp(seed=2, bn=bn)
    cfg = Config(uda=uda_for(), label_smoothing=0.1, teacher_opt="momentum")
    runs = {}
    for name, method, radius in [
        ("exact", "exact", 1e-2),
        ("fd", "finite_difference", 1e-6),
        ("coarse", "finite_difference", 0.5),
    ]:
        cfg.meta_grad = method
        mpl = cfg.mpl(copy.deepcopy(teacher), copy.deepcopy(student), fd_radius=radius)
        runs[name] = (mpl, mpl.step(*batch.args()))
    (exact, m_exact), (fd, m_fd), (coarse, _) = runs["exact"], runs["fd"], runs["coarse"]
    # the teacher's gradient is its momentum buffer after one step
    g_exact, g_fd = exact.state.teacher.opt["momentum"], fd.state.teacher.opt["momentum"]
    assert_tree_close(g_fd, g_exact, rtol=1e-6, atol=1e-9, path="teacher grad")
    assert_tree_close(params(fd.teacher), params(exact.teacher), rtol=1e-8, atol=1e-10)
    # the student's step does not depend on the method
    assert_tree_close(params(fd.student), params(exact.student), **TIGHT)
    assert_tree_close(buffers(fd.student), buffers(exact.student), **TIGHT)
    assert_tree_close(buffers(fd.teacher), buffers(exact.teacher), **TIGHT)
    for k in ("student/loss_l", "teacher/loss", "mpl/grad_rms_logits"):
        assert m_fd[k] == pytest.approx(m_exact[k], rel=1e-6), k
    # fd_radius reaches the difference: a coarse radius is visibly less accurate
    err = lambda g: max((g[k] - g_exact[k]).abs().max().item() for k in g)  # noqa: E731
    assert err(coarse.state.teacher.opt["momentum"]) > 100 * err(g_fd)


def test_finite_difference_with_student_dropout_does_not_scale_with_one_over_radius():
    norms = []
    for radius in (1e-2, 1e-4):
        cfg = Config(meta_grad="finite_difference")
        mpl = cfg.mpl(mlp(seed=1), mlp(seed=2, dropout=0.3), fd_radius=radius)
        torch.manual_seed(0)
        norms.append(mpl.step(*make_batch(0).args())["mpl/grad_rms_logits"])
    assert norms[1] == pytest.approx(norms[0], rel=1e-2)


# --------------------------------------------------------------------------- 3. first order


def test_sampler_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], dtype=F64).expand(40000, 4)
    torch.manual_seed(0)
    freq = torch.bincount(sample_categorical(logits), minlength=4).to(F64) / len(logits)
    p = torch.softmax(logits[0], dim=-1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / len(logits)).sqrt().max()


def test_first_order_log_prob_sum_equals_hand_computation():
    """log_prob_reduction="sum": the score-function estimate on the scale of exact (B_u times
    the paper's batch mean)."""
    cfg = Config(meta_grad="first_order", pseudo_labels="hard", extra={"log_prob_reduction": "sum"})
    mpl, hand = run_both(cfg, steps=2)
    assert_matches_hand(mpl, hand)
    _, hand_mean = run_both(Config(meta_grad="first_order", pseudo_labels="hard"), steps=2)
    assert (hand[0]["2.weight"] - hand_mean[0]["2.weight"]).abs().max() > 1e-4


def test_sampler_draws_in_float32_under_bfloat16_autocast():
    """bfloat16 Gumbel noise cut the tails and tied to the lowest class: the frequencies of a
    +4 logit gap were off by ~10 standard errors (total variation 0.003 on 400k draws)."""
    logits = torch.tensor([[4.0, 0.0, 0.0]]).expand(400_000, 3)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sample_categorical(logits.to(torch.bfloat16))
    freq = torch.bincount(y, minlength=3).to(F64) / len(y)
    p = torch.softmax(logits[0].to(F64), dim=-1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / len(y)).sqrt().max()


@pytest.mark.parametrize("decay", [None, 0.7], ids=["no_baseline", "moving_average"])
def test_first_order_step_equals_its_formula(decay):
    cfg = Config(
        meta_grad="first_order",
        pseudo_labels="hard",
        temperature=2.0,
        h_baseline_decay=decay,
        label_smoothing=0.1,
        teacher_opt="momentum",
    )
    mpl, hand = run_both(cfg, steps=3)  # the baseline is non-zero from the second step on
    assert_matches_hand(mpl, hand)
    h_b = hand[-1]
    if decay is None:
        assert float(mpl.state.h_baseline) == 0.0
    else:
        assert abs(float(h_b)) > 1e-6
        assert float(mpl.state.h_baseline) == pytest.approx(float(h_b), rel=1e-10)


def test_first_order_samples_at_the_temperature():
    """The formula test is only sharp if the temperature changes the samples it reproduces."""
    z = hand_mlp(params(mlp(seed=1)), make_batch(0).x_us)
    torch.manual_seed(11)
    at_t = sample_categorical(z / 2.0)
    torch.manual_seed(11)
    assert not torch.equal(at_t, sample_categorical(z))


def test_first_order_sign_by_enumeration():
    """Averaged over the sampled label, MPL's first-order teacher gradient is the gradient of the
    expected labeled loss of the updated student, E_y[L_l(s'(y))] (so the sign is right)."""
    torch.manual_seed(0)
    batch = make_batch(0, n_u=1)
    teacher, student = mlp(seed=1), mlp(seed=2)
    t0 = params(teacher)
    temperature = 1.5
    z = hand_mlp(t0, batch.x_us)
    seeds = {}  # a seed that samples each class
    for seed in range(10000):
        torch.manual_seed(seed)
        seeds.setdefault(int(sample_categorical(z / temperature)), seed)
        if len(seeds) == 3:
            break
    expected_sum, mpl_avg = 0.0, None
    tp = leaves(t0)
    p = torch.softmax(hand_mlp(tp, batch.x_us) / temperature, dim=-1)[0]
    g_sup = dict(
        zip(
            tp,
            torch.autograd.grad(
                F.cross_entropy(hand_mlp(tp, batch.x_l), batch.y_l), list(tp.values())
            ),
            strict=True,
        )
    )
    for c, seed in seeds.items():
        mpl = metapl.MPL(
            copy.deepcopy(teacher),
            copy.deepcopy(student),
            optim.sgd(0.1, momentum=0.5),
            optim.sgd(1.0),
            meta_grad="first_order",
            pseudo_labels="hard",
            temperature=temperature,
        )
        torch.manual_seed(seed)
        loss_l = mpl.step(*batch.args())["student/loss_l"]  # L_l(s'(c))
        expected_sum = expected_sum + p[c] * loss_l
        g_mpl = {k: mpl.state.teacher.opt["momentum"][k] - g_sup[k] for k in tp}
        p_c = p[c].detach()
        mpl_avg = {k: (mpl_avg[k] if mpl_avg else 0) + p_c * g_mpl[k] for k in tp}
    g_expected = torch.autograd.grad(expected_sum, list(tp.values()))
    g_expected = dict(zip(tp, g_expected, strict=True))
    assert max(g.abs().max() for g in g_expected.values()) > 1e-4
    assert_tree_close(mpl_avg, g_expected, rtol=1e-8, atol=1e-12)


MPL_BATCH = {
    "exact": Config(meta_grad="exact", teacher_opt="adamw"),
    "exact_uda_bn_joint": Config(meta_grad="exact", uda=uda_for(weight=0.7)),
    "exact_forward_curvature_uda_bn": Config(
        meta_grad="exact",
        uda=uda_for(weight=0.7, ramp_steps=3),
        temperature=1.5,
        teacher_opt="adamw",
        extra={"curvature": "forward"},
    ),
    "first_order": Config(
        meta_grad="first_order", pseudo_labels="hard", temperature=2.0, h_baseline_decay=0.7
    ),
}


@pytest.mark.parametrize("name", sorted(MPL_BATCH))
def test_separate_mpl_batch_equals_hand_computation(name):
    """``step(..., mpl_batch=(x, y))`` scores the updated student on (x, y) instead of
    (x_l, y_l) (6 rows against 8, other statistics) for the MPL signal; the teacher's own loss
    and the joint BatchNorm batch keep x_l."""
    cfg, bn = MPL_BATCH[name], name.endswith("bn_joint")
    mpl, hand = run_both(cfg, steps=2, bn=bn, n_mpl=6)
    assert_matches_hand(mpl, hand)
    _, hand_default = run_both(cfg, steps=2, bn=bn)  # the batch reaches the teacher
    assert max((hand[0][k] - hand_default[0][k]).abs().max() for k in hand[0]) > 1e-4


# --------------------------------------------------------------------------- 4. no MPL term


@pytest.mark.parametrize(
    "cfg",
    [
        Config(meta_grad=None, uda=uda_for(weight=1.5), label_smoothing=0.1),
        Config(meta_grad=None, pseudo_labels="hard", temperature=2.0, teacher_opt="adamw"),
    ],
    ids=["soft_uda", "hard"],
)
def test_no_meta_grad_step_equals_hand_computation(cfg):
    mpl, hand = run_both(cfg, steps=2)
    assert_matches_hand(mpl, hand)


# --------------------------------------------------------------------------- 5. K lookahead steps


LOOKAHEAD = {
    "exact": Config(meta_grad="exact", label_smoothing=0.1, teacher_opt="adamw"),
    "exact_uda_bn": Config(
        meta_grad="exact",
        uda=uda_for(weight=0.7, ramp_steps=3),
        temperature=1.5,
        teacher_opt="adamw",
    ),
    "exact_forward_curvature_uda_bn": Config(
        meta_grad="exact",
        uda=uda_for(weight=0.7, ramp_steps=3),
        temperature=1.5,
        teacher_opt="adamw",
        extra={"curvature": "forward"},
    ),
    "first_order": Config(
        meta_grad="first_order", pseudo_labels="hard", temperature=2.0, h_baseline_decay=0.7
    ),
    "first_order_uda": Config(
        meta_grad="first_order",
        pseudo_labels="hard",
        uda=uda_for(weight=0.5),
        extra={"log_prob_reduction": "sum"},
    ),
    "no_meta_grad_uda": Config(meta_grad=None, uda=uda_for(weight=1.5)),
}


@pytest.mark.parametrize("name", sorted(LOOKAHEAD))
def test_lookahead_steps_equal_hand_unroll(name):
    """K=2 (and 3) student steps on the same pseudo-labelled batch, with the teacher's gradient
    through all of them, against plain autograd unrolled by hand in float64; the momentum
    buffers carry over between the K steps and across MPL steps."""
    for k in (2, 3) if name == "exact" else (2,):
        cfg = copy.deepcopy(LOOKAHEAD[name])
        cfg.extra = {**cfg.extra, "lookahead_steps": k}
        mpl, hand = run_both(cfg, steps=2, bn=name.endswith("bn"))
        assert_matches_hand(mpl, hand)
    # K reaches the result: one lookahead step gives another student (and, through the MPL
    # term, another teacher)
    _, hand_1 = run_both(LOOKAHEAD[name], steps=2, bn=name.endswith("bn"))
    for net in (1,) if cfg.meta_grad is None else (0, 1):
        assert max((hand[net][k] - hand_1[net][k]).abs().max() for k in hand[net]) > 1e-4


def test_lookahead_finite_difference_approximates_exact():
    batch = make_batch(0)
    teacher, student = mlp(seed=1), mlp(seed=2)
    grads = {}
    for method in ("exact", "finite_difference"):
        cfg = Config(
            meta_grad=method,
            uda=uda_for(),
            teacher_opt="momentum",
            extra={"lookahead_steps": 2, "fd_radius": 1e-6},
        )
        mpl = cfg.mpl(copy.deepcopy(teacher), copy.deepcopy(student))
        mpl.step(*batch.args())
        grads[method] = mpl.state.teacher.opt["momentum"]  # the teacher's gradient after one step
    assert_tree_close(grads["finite_difference"], grads["exact"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["exact", "finite_difference", "first_order", None])
def test_one_lookahead_step_and_unit_weight_are_the_default_bitwise(method):
    hard = method == "first_order"
    cfg = Config(
        meta_grad=method,
        pseudo_labels="hard" if hard else "soft",
        uda=uda_for(),
        h_baseline_decay=0.9 if hard else None,
    )
    runs = []
    for extra in ({}, {"lookahead_steps": 1, "mpl_weight": 1.0}):
        torch.manual_seed(0)
        mpl = cfg.mpl(mlp(seed=1, bn=True, dropout=0.2), mlp(seed=2, bn=True, dropout=0.2), **extra)
        runs.append((mpl, [mpl.step(*make_batch(k).args()) for k in range(2)]))
    (a, metrics_a), (b, metrics_b) = runs
    assert metrics_a == metrics_b
    for net in ("teacher", "student"):
        assert_tree_equal(params(getattr(a, net)), params(getattr(b, net)), net)
        assert_tree_equal(buffers(getattr(a, net)), buffers(getattr(b, net)), net)


@pytest.mark.parametrize(
    ("cfg", "weight"),
    [
        (Config(meta_grad="exact", uda=uda_for()), 0.3),
        (Config(meta_grad="first_order", pseudo_labels="hard", h_baseline_decay=0.7), 3.0),
        (Config(meta_grad="exact"), 0.0),
    ],
    ids=["exact_uda", "first_order", "exact_zero"],
)
def test_mpl_weight_scales_the_term_as_by_hand(cfg, weight):
    cfg.extra = {"mpl_weight": weight, "lookahead_steps": 2}
    mpl, hand = run_both(cfg, steps=2)
    assert_matches_hand(mpl, hand)


# --------------------------------------------------------------------------- 5b. mpl_dropout


def hand_student(p: dict[str, Tensor], x: Tensor, mask: Tensor | None) -> Tensor:
    """``mlp(bn=True, dropout=p)``'s training-mode forward with the dropout ``mask`` (already
    scaled by 1 / (1 - p); None: no dropout), written out."""
    h = x @ p["0.weight"].T + p["0.bias"]
    mean, var = h.mean(0), h.var(0, unbiased=False)
    h = torch.tanh((h - mean) / torch.sqrt(var + 1e-5) * p["1.weight"] + p["1.bias"])
    return (h if mask is None else h * mask) @ p["4.weight"].T + p["4.bias"]


@pytest.mark.parametrize("mpl_dropout", [True, False])
def test_mpl_dropout_equals_hand_computation(mpl_dropout):
    """The MPL signal's forward draws the second dropout mask (True) or none (False): eval
    mode, BatchNorm still on the batch's statistics."""
    lr_t, lr_s, drop, seed = 0.3, 0.5, 0.5, 7
    teacher, student = mlp(seed=1), mlp(seed=2, bn=True, dropout=drop)
    t, s = leaves(params(teacher)), leaves(params(student))
    mpl = metapl.MPL(teacher, student, optim.sgd(lr_t), optim.sgd(lr_s), mpl_dropout=mpl_dropout)
    batch = make_batch(0)
    torch.manual_seed(seed)
    mpl.step(*batch.args())

    torch.manual_seed(seed)  # the draws in the step's order: the lookahead's, the signal's
    n_l, n_u = len(batch.x_l), len(batch.x_u)
    mask = torch.empty(n_l + n_u, 16, dtype=F64).bernoulli_(1 - drop) / (1 - drop)
    mask_signal = torch.empty(n_l, 16, dtype=F64).bernoulli_(1 - drop) / (1 - drop)
    logits = hand_mlp(t, torch.cat([batch.x_l, batch.x_us]))
    z = logits[n_l:]
    loss_u = soft_ce(hand_student(s, torch.cat([batch.x_l, batch.x_us]), mask)[n_l:], z)
    g_s = torch.autograd.grad(loss_u, list(s.values()), create_graph=True)
    new_s = {k: v - lr_s * g for (k, v), g in zip(s.items(), g_s, strict=True)}
    signal = hand_student(new_s, batch.x_l, mask_signal if mpl_dropout else None)
    total = F.cross_entropy(logits[:n_l], batch.y_l) + F.cross_entropy(signal, batch.y_l)
    g_t = torch.autograd.grad(total, list(t.values()))
    new_t = {k: v - lr_t * g for (k, v), g in zip(t.items(), g_t, strict=True)}
    assert_tree_close(params(mpl.teacher), detach(new_t), **TIGHT, path="teacher")
    assert_tree_close(params(mpl.student), detach(new_s), **TIGHT, path="student")


def soft_ce(logits: Tensor, z: Tensor) -> Tensor:
    return -(torch.softmax(z, -1) * torch.log_softmax(logits, -1)).sum(-1).mean()


@pytest.mark.parametrize(
    ("extra", "options"),
    [({}, {}), ({"lookahead_steps": 2}, {}), ({}, {"curvature": "forward"})],
    ids=["exact", "exact_k2", "exact_forward"],
)
def test_mpl_term_at_weight_zero_without_dropout_is_the_baseline_run_bitwise(extra, options):
    """Without dropout in the MPL signal the term draws no random numbers: at weight 0 the
    run is the ``meta_grad=None`` run bit for bit over many steps, with dropout students and
    the global RNG seeded once. With the signal's dropout (the default) it is not."""

    def run(**kwargs):
        torch.manual_seed(0)
        t, s = mlp(seed=1, bn=True, dropout=0.3), mlp(seed=2, bn=True, dropout=0.3)
        mpl = Config(meta_grad=kwargs.pop("meta_grad"), uda=uda_for(), extra=extra).mpl(
            t, s, **kwargs
        )
        for k in range(4):
            mpl.step(*make_batch(k).args())
        return params(mpl.teacher) | params(mpl.student)

    baseline = run(meta_grad=None)
    paired = run(meta_grad="exact", mpl_weight=0.0, mpl_dropout=False, **options)
    assert_tree_equal(paired, baseline)
    other_stream = run(meta_grad="exact", mpl_weight=0.0, **options)
    assert any(not torch.equal(other_stream[k], baseline[k]) for k in baseline)


def test_mpl_dropout_changes_nothing_without_dropout_layers():
    runs = []
    for mpl_dropout in (True, False):
        torch.manual_seed(0)
        mpl = Config(uda=uda_for()).mpl(
            mlp(seed=1, bn=True), mlp(seed=2, bn=True), mpl_dropout=mpl_dropout
        )
        metrics = [mpl.step(*make_batch(k).args()) for k in range(2)]
        runs.append((params(mpl.teacher) | params(mpl.student), metrics))
    assert runs[0][1] == runs[1][1]
    assert_tree_equal(runs[0][0], runs[1][0])


# --------------------------------------------------------------------------- 6. determinism


def dropout_run(seed: int, steps=3) -> metapl.MPL:
    teacher, student = mlp(seed=1, dropout=0.3), mlp(seed=2, dropout=0.3)
    cfg = Config(meta_grad="first_order", pseudo_labels="hard", h_baseline_decay=0.9)
    mpl = cfg.mpl(teacher, student)
    torch.manual_seed(seed)
    for k in range(steps):
        mpl.step(*make_batch(k).args())
    return mpl


def test_same_seed_is_bitwise_reproducible_and_another_seed_is_not():
    a, b, c = dropout_run(0), dropout_run(0), dropout_run(1)
    for net in ("teacher", "student"):
        assert_tree_equal(params(getattr(a, net)), params(getattr(b, net)), net)
        p_a, p_c = params(getattr(a, net)), params(getattr(c, net))
        assert any(not torch.equal(p_a[k], p_c[k]) for k in p_a), net


# --------------------------------------------------------------------------- 7. state_dict


@pytest.mark.parametrize("method", ["exact", "first_order"])
@pytest.mark.parametrize("via_file", [False, True], ids=["in_memory", "torch_save"])
def test_state_dict_round_trip_resumes_bitwise(method, via_file, tmp_path):
    hard = method == "first_order"

    def build(seed_shift=0):
        cfg = Config(
            meta_grad=method,
            pseudo_labels="hard" if hard else "soft",
            uda=uda_for(ramp_steps=10),
            teacher_opt="adamw",
            h_baseline_decay=0.9 if hard else None,
        )
        teacher = mlp(seed=1 + seed_shift, bn=True, dropout=0.2)
        student = mlp(seed=2 + seed_shift, bn=True, dropout=0.2)
        return cfg.mpl(teacher, student, ema_decay=0.8)

    def run(mpl, ks):
        return [mpl.step(*make_batch(k).args()) for k in ks]

    torch.manual_seed(0)
    a = build()
    run(a, range(3))
    sd, rng = a.state_dict(), torch.get_rng_state()
    if via_file:
        torch.save(sd, tmp_path / "mpl.pt")
        sd = torch.load(tmp_path / "mpl.pt", weights_only=True)
    metrics_a = run(a, range(3, 5))

    b = build(seed_shift=10)  # other initial weights: everything must come from the state_dict
    assert not torch.equal(params(b.teacher)["0.weight"], params(a.teacher)["0.weight"])
    b.load_state_dict(sd)
    torch.set_rng_state(rng)
    metrics_b = run(b, range(3, 5))

    assert metrics_a == metrics_b
    for net in ("teacher", "student", "ema_student"):
        assert_tree_equal(getattr(b, net).state_dict(), getattr(a, net).state_dict(), net)
    assert_tree_equal(b.state.teacher.opt, a.state.teacher.opt, "teacher_state")
    assert_tree_equal(b.state.student.opt, a.state.student.opt, "student_state")
    assert_tree_equal(_counters(b), _counters(a), "counters")
    assert b.num_steps == 5


def leaf_specs(tree, path=""):
    if isinstance(tree, dict):
        return {p: v for k, sub in tree.items() for p, v in leaf_specs(sub, f"{path}/{k}").items()}
    return {path: (tree.dtype, tuple(tree.shape), tree.device)}


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_step_state_keeps_its_dtypes_and_shapes(dtype):
    """What the step threads from one call to the next must keep its dtype and shape (under
    ``compile=True`` a change recompiles the step)."""
    cfg = Config(
        meta_grad="first_order",
        pseudo_labels="hard",
        h_baseline_decay=0.9,
        uda=uda_for(ramp_steps=3),
        teacher_opt="adamw",
    )
    mpl = cfg.mpl(mlp(seed=1, bn=True, dtype=dtype), mlp(seed=2, bn=True, dtype=dtype))
    state = lambda: {"t": mpl.state.teacher.opt, "s": mpl.state.student.opt, "c": _counters(mpl)}  # noqa: E731
    before = leaf_specs(state())
    for k in range(2):
        mpl.step(*make_batch(k, dtype=dtype).args())
        assert leaf_specs(state()) == before


def test_state_dict_is_a_snapshot():
    mpl = Config().mpl(mlp(seed=1), mlp(seed=2))
    sd = mpl.state_dict()
    before = copy.deepcopy(sd)
    mpl.step(*make_batch(0).args())
    assert_tree_equal(sd["teacher"], before["teacher"], "teacher")
    assert_tree_equal(sd["student_state"], before["student_state"], "student_state")


def test_load_state_dict_with_mismatched_ema_option_raises():
    sd = Config().mpl(mlp(seed=1), mlp(seed=2), ema_decay=0.9).state_dict()
    with pytest.raises(ValueError, match="ema_decay"):
        Config().mpl(mlp(seed=1), mlp(seed=2)).load_state_dict(sd)


# --------------------------------------------------------------------------- 8. BatchNorm


def bn_update(running: tuple[Tensor, Tensor], h: Tensor, momentum: float):
    """torch's BatchNorm running-statistics update from a batch of activations h [B, C]."""
    mean, var = running
    return (1 - momentum) * mean + momentum * h.mean(0), (1 - momentum) * var + momentum * h.var(0)


BN_CASES = {
    "exact": ("exact", "soft"),
    "finite_difference": ("finite_difference", "soft"),
    "first_order": ("first_order", "hard"),
    "none": (None, "soft"),
}


@pytest.mark.parametrize("student_bn", ["joint", "unlabeled"])
@pytest.mark.parametrize("case", list(BN_CASES))
@pytest.mark.parametrize("with_uda", [True, False], ids=["uda", "no_uda"])
def test_batchnorm_running_stats_advance_once_from_the_right_batches(case, with_uda, student_bn):
    """The teacher's statistics come from cat(x_l, [x_u,] x_us); the student's from
    cat(x_l, x_us) with student_bn="joint" (the paper's code), from x_us with "unlabeled"."""
    method, labels = BN_CASES[case]
    teacher, student = mlp(seed=1, bn=True), mlp(seed=2, bn=True)
    t0, s0 = params(teacher), params(student)
    t_bufs0, s_bufs0 = buffers(teacher), buffers(student)
    cfg = Config(
        meta_grad=method,
        pseudo_labels=labels,
        uda=uda_for() if with_uda else None,
        student_bn=student_bn,
    )
    mpl = cfg.mpl(teacher, student)
    batch = make_batch(0)
    torch.manual_seed(0)
    mpl.step(*batch.args())

    first = lambda p, x: x @ p["0.weight"].T + p["0.bias"]  # noqa: E731
    parts = [batch.x_l] + ([batch.x_u] if with_uda else []) + [batch.x_us]
    t_mean, t_var = bn_update(
        (t_bufs0["1.running_mean"], t_bufs0["1.running_var"]), first(t0, torch.cat(parts)), 0.3
    )
    student_batch = torch.cat([batch.x_l, batch.x_us]) if student_bn == "joint" else batch.x_us
    s_mean, s_var = bn_update(
        (s_bufs0["1.running_mean"], s_bufs0["1.running_var"]), first(s0, student_batch), 0.3
    )
    t_bufs, s_bufs = buffers(mpl.teacher), buffers(mpl.student)
    torch.testing.assert_close(t_bufs["1.running_mean"], t_mean, **TIGHT)
    torch.testing.assert_close(t_bufs["1.running_var"], t_var, **TIGHT)
    torch.testing.assert_close(s_bufs["1.running_mean"], s_mean, **TIGHT)
    torch.testing.assert_close(s_bufs["1.running_var"], s_var, **TIGHT)
    assert int(t_bufs["1.num_batches_tracked"]) == 1
    assert int(s_bufs["1.num_batches_tracked"]) == 1
    # discriminative: the other choice would have given other student statistics
    other = batch.x_us if student_bn == "joint" else torch.cat([batch.x_l, batch.x_us])
    wrong, _ = bn_update(
        (s_bufs0["1.running_mean"], s_bufs0["1.running_var"]), first(s0, other), 0.3
    )
    assert (wrong - s_mean).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["exact", "finite_difference", "first_order", "none"])
def test_batchnorm_student_statistics_advance_at_every_lookahead_step(case):
    """lookahead_steps=2: the student's statistics advance twice, from its forward at s_0 and
    at s_1 (carried through meta_grad's state=), each on cat(x_l, x_us)."""
    method, labels = BN_CASES[case]
    teacher, student = mlp(seed=1, bn=True), mlp(seed=2, bn=True)
    s0, s_bufs0 = params(student), buffers(student)
    batch = make_batch(0)
    after = {}
    for k in (1, 2):
        cfg = Config(meta_grad=method, pseudo_labels=labels, extra={"lookahead_steps": k})
        mpl = cfg.mpl(copy.deepcopy(teacher), copy.deepcopy(student))
        torch.manual_seed(0)
        mpl.step(*batch.args())
        after[k] = mpl
    s1 = params(after[1].student)  # the first of the two lookahead steps is K=1's only step
    first = lambda p, x: x @ p["0.weight"].T + p["0.bias"]  # noqa: E731
    x = torch.cat([batch.x_l, batch.x_us])
    running = (s_bufs0["1.running_mean"], s_bufs0["1.running_var"])
    for p in (s0, s1):
        running = bn_update(running, first(p, x), 0.3)
    got = buffers(after[2].student)
    torch.testing.assert_close(got["1.running_mean"], running[0], **TIGHT)
    torch.testing.assert_close(got["1.running_var"], running[1], **TIGHT)
    assert int(got["1.num_batches_tracked"]) == 2
    assert int(buffers(after[2].teacher)["1.num_batches_tracked"]) == 1  # once per MPL step


def test_forward_batch_stats_equals_forward_mutates_nothing_and_runs_under_vmap():
    """The student's labeled forward after its steps (the MPL signal) tracks no statistics,
    so the score-function engine can evaluate L(s_0) and L(s_K) in one vmap under compile."""
    net = mlp(seed=2, bn=True).train()
    p, b, x = params(net), buffers(net), make_batch(0).x_l
    expected, _ = forward(net, p, b, x)
    torch.testing.assert_close(forward_batch_stats(net, p, b, x), expected, rtol=0, atol=0)
    assert_tree_equal(buffers(net), b, "buffers")
    pair = {k: torch.stack([v, 1.1 * v]) for k, v in p.items()}
    both = vmap(lambda q: forward_batch_stats(net, q, b, x))(pair)
    torch.testing.assert_close(both[0], expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="Batch norm got a batched tensor"):
        vmap(lambda q: forward(net, q, b, x)[0])(pair)


def test_batchnorm_student_trains_on_x_u_without_strong_view():
    student = mlp(seed=2, bn=True)
    s0, bufs0 = params(student), buffers(student)
    mpl = Config(student_bn="unlabeled").mpl(mlp(seed=1, bn=True), student)
    batch = make_batch(0, strong=False)
    mpl.step(*batch.args())
    h = batch.x_u @ s0["0.weight"].T + s0["0.bias"]
    mean, _ = bn_update((bufs0["1.running_mean"], bufs0["1.running_var"]), h, 0.3)
    torch.testing.assert_close(buffers(mpl.student)["1.running_mean"], mean, **TIGHT)


# --------------------------------------------------------------------------- 9. EMA


def test_ema_student_is_the_moving_average_of_the_student():
    decay = 0.8
    student = mlp(seed=2, bn=True)
    mpl = Config().mpl(mlp(seed=1, bn=True), student, ema_decay=decay)
    ema = {**params(student), **buffers(student)}
    for k in range(2):
        mpl.step(*make_batch(k).args())
        new = {**params(mpl.student), **buffers(mpl.student)}
        ema = {
            n: decay * v + (1 - decay) * new[n] if v.is_floating_point() else new[n]
            for n, v in ema.items()
        }
        got = {**params(mpl.ema_student), **buffers(mpl.ema_student)}
        assert_tree_close(got, ema, **TIGHT)
    assert int(got["1.num_batches_tracked"]) == 2
    assert not mpl.ema_student.training
    assert (got["0.weight"] - new["0.weight"]).abs().max() > 1e-4  # it is not the student


# --------------------------------------------------------------------------- 10. errors


class _Wrong:
    """Builds an MPL with one bad argument (good defaults otherwise)."""

    @staticmethod
    def build(**kwargs):
        args = {
            "teacher": mlp(seed=1),
            "student": mlp(seed=2),
            "teacher_optimizer": optim.sgd(0.1),
            "student_optimizer": optim.sgd(0.1),
        }
        args.update(kwargs)
        return metapl.MPL(**args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"meta_grad": "exact", "pseudo_labels": "hard"}, ValueError, "pseudo_labels='soft'"),
        ({"meta_grad": "finite_difference", "pseudo_labels": "hard"}, ValueError, "'first_order'"),
        ({"meta_grad": "first_order", "pseudo_labels": "soft"}, ValueError, "pseudo_labels='hard'"),
        ({"meta_grad": "second_order"}, ValueError, "unknown meta_grad 'second_order'"),
        ({"pseudo_labels": "sharp"}, ValueError, "'soft' or 'hard'"),
        (
            {"meta_grad": "first_order", "pseudo_labels": "hard", "h_baseline_decay": 1.5},
            ValueError,
            r"h_baseline_decay must be in \[0, 1\)",
        ),
        ({"label_smoothing": 1.0}, ValueError, "label_smoothing"),
        ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"ema_decay": 1.0}, ValueError, "ema_decay"),
        ({"uda": {"weight": 1.0}}, TypeError, "metapl.UDA"),
        ({"teacher": lambda x: x}, TypeError, "nn.Module"),
        ({"lookahead_steps": 0}, ValueError, "lookahead_steps must be an int >= 1"),
        ({"lookahead_steps": 2.0}, ValueError, "lookahead_steps must be an int >= 1"),
        ({"lookahead_steps": True}, ValueError, "lookahead_steps must be an int >= 1"),
        ({"mpl_weight": -1.0}, ValueError, "mpl_weight must be >= 0"),
        ({"mpl_weight": 2.0, "meta_grad": None}, ValueError, "needs a meta_grad"),
        ({"mpl_dropout": "no"}, ValueError, "mpl_dropout must be True or False"),
        ({"mpl_dropout": False, "meta_grad": None}, ValueError, "False needs a meta_grad"),
        ({"curvature": "fwd"}, ValueError, "curvature must be 'reverse' .* or 'forward'"),
        (
            {"curvature": "forward", "meta_grad": "finite_difference"},
            ValueError,
            "curvature='forward' is an option of meta_grad='exact', not 'finite_difference'",
        ),
    ],
)
def test_bad_config_raises_a_helpful_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        _Wrong.build(**kwargs)


@pytest.mark.parametrize(
    "options",
    [{"meta_grad": "finite_difference"}, {"meta_grad": "exact", "curvature": "forward"}],
    ids=["finite_difference", "forward_curvature"],
)
def test_compiled_replays_reject_a_student_with_dropout(options):
    with pytest.raises(ValueError, match="replays the student's dropout masks"):
        _Wrong.build(**options, compile=True, student=mlp(seed=2, dropout=0.3))


def test_torch_optim_optimizer_is_rejected():
    teacher = mlp(seed=1)
    with pytest.raises(TypeError, match="metapl.optim optimizers"):
        _Wrong.build(teacher=teacher, teacher_optimizer=torch.optim.SGD(teacher.parameters(), 0.1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": -1.0}, "weight >= 0"),
        ({"temperature": 0.0}, "temperature > 0"),
        ({"threshold": 1.5}, "threshold <= 1"),
        ({"ramp_steps": -1}, "ramp_steps"),
    ],
)
def test_bad_uda_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        metapl.UDA(**kwargs)


def _batch_with(**changes):
    b = make_batch(0)
    args = {"x_l": b.x_l, "y_l": b.y_l, "x_u": b.x_u, "x_u_strong": b.x_us}
    return {**args, **changes}


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"y_l": torch.zeros(5, dtype=torch.long)}, ValueError, r"y_l must be .* shape \[8\]"),
        ({"y_l": torch.zeros(8, dtype=F64)}, ValueError, "integer class indices"),
        ({"y_l": torch.zeros(8, 3, dtype=torch.long)}, ValueError, "y_l must be integer"),
        ({"x_u_strong": torch.zeros(11, 2, dtype=F64)}, ValueError, "x_u_strong must be a view"),
        (
            {"x_u": torch.zeros(12, 3, dtype=F64), "x_u_strong": None},
            ValueError,
            "same example shape",
        ),
        ({"x_l": [[0.0, 1.0]]}, TypeError, "must be tensors"),
        (
            {"y_l": torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])},
            ValueError,
            r"class indices 0\.\.2 \(the teacher has 3 outputs\), got label 3",
        ),
        ({"y_l": torch.tensor([0, 1, 2, -1, 0, 1, 2, 0])}, ValueError, "got label -1"),
    ],
)
def test_bad_batch_raises_and_changes_nothing(changes, error, match):
    mpl = Config().mpl(mlp(seed=1), mlp(seed=2))
    t0 = params(mpl.teacher)
    with pytest.raises(error, match=match):
        mpl.step(**_batch_with(**changes))
    assert_tree_equal(params(mpl.teacher), t0, "teacher")
    assert mpl.num_steps == 0


@pytest.mark.parametrize("sync", [True, False])
def test_labels_are_checked_on_every_step_on_the_cpu(sync):
    mpl = Config().mpl(mlp(seed=1), mlp(seed=2))
    mpl.step(**_batch_with(), sync=sync)
    t0 = params(mpl.teacher)
    with pytest.raises(ValueError, match="got label 7"):
        mpl.step(**_batch_with(y_l=torch.full((8,), 7)), sync=sync)
    assert_tree_equal(params(mpl.teacher), t0, "teacher")
    assert mpl.num_steps == 1


@pytest.mark.parametrize(
    ("meta_grad", "mpl_batch", "error", "match"),
    [
        (
            "exact",
            (torch.zeros(4, 2, dtype=F64), torch.zeros(3, dtype=torch.long)),
            ValueError,
            r"mpl_batch's labels must be .* shape \[4\]",
        ),
        (
            "exact",
            (torch.zeros(4, 2, dtype=F64), torch.zeros(4, dtype=F64)),
            ValueError,
            "integer class indices",
        ),
        (
            "exact",
            (torch.zeros(4, 3, dtype=F64), torch.zeros(4, dtype=torch.long)),
            ValueError,
            r"x_l's example shape \(2,\)",
        ),
        ("exact", (torch.zeros(4, 2, dtype=F64), torch.full((4,), 3)), ValueError, "got label 3"),
        ("exact", torch.zeros(4, 2, dtype=F64), TypeError, "pair of tensors"),
        (
            None,
            (torch.zeros(4, 2, dtype=F64), torch.zeros(4, dtype=torch.long)),
            ValueError,
            "mpl_batch needs a meta_grad",
        ),
    ],
)
def test_bad_mpl_batch_raises_and_changes_nothing(meta_grad, mpl_batch, error, match):
    mpl = Config(meta_grad=meta_grad).mpl(mlp(seed=1), mlp(seed=2))
    t0 = params(mpl.teacher)
    with pytest.raises(error, match=match):
        mpl.step(**_batch_with(), mpl_batch=mpl_batch)
    assert_tree_equal(params(mpl.teacher), t0, "teacher")
    assert mpl.num_steps == 0


def test_uda_without_strong_view_raises():
    mpl = Config(uda=metapl.UDA()).mpl(mlp(seed=1), mlp(seed=2))
    with pytest.raises(ValueError, match="pass x_u_strong"):
        mpl.step(**_batch_with(x_u_strong=None))


def test_student_with_other_number_of_classes_raises_and_changes_nothing():
    mpl = Config().mpl(mlp(seed=1), mlp(seed=2, classes=4))
    t0, s0 = params(mpl.teacher), params(mpl.student)
    with pytest.raises(ValueError, match="student outputs 4 classes but the teacher 3"):
        mpl.step(**_batch_with())
    assert_tree_equal(params(mpl.teacher), t0, "teacher")
    assert_tree_equal(params(mpl.student), s0, "student")


# --------------------------------------------------------------------------- 11. finetune


def test_finetune_without_dropout():
    """As the paper's code finetunes: with dropout=False the finetuned student equals the same
    network without its dropout layer finetuned alike; dropout=True keeps it (and the result
    differs). Dropout is back on afterwards."""
    batches = [(b.x_l, b.y_l) for b in map(make_batch, range(3))]
    opt = optim.sgd(0.3, momentum=0.9)
    finetuned = {}
    for dropout in (False, True):
        student = mlp(seed=2, dropout=0.5)
        metapl.finetune(student, batches, opt, dropout=dropout)
        assert student.training and student[2].training
        finetuned[dropout] = params(student)
    plain = mlp(seed=2)  # the same weights, no dropout layer
    metapl.finetune(plain, batches, opt)
    renamed = {k.replace("3.", "2.", 1): v for k, v in finetuned[False].items()}
    assert_tree_close(renamed, params(plain), **TIGHT)
    assert not torch.allclose(finetuned[True]["3.weight"], finetuned[False]["3.weight"])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_finetune_equals_torch_optim_sgd(label_smoothing):
    """MPL's last phase, ``metapl.finetune`` on the EMA student of an MPL run, is SGD with
    cross-entropy step for step (running statistics included)."""
    mpl = Config().mpl(mlp(seed=1, bn=True), mlp(seed=2, bn=True), ema_decay=0.9)
    for k in range(2):  # finetuning starts from an MPL-trained student (EMA != student)
        mpl.step(*make_batch(k).args())
    final = mpl.ema_student.requires_grad_(True)
    reference = copy.deepcopy(final)
    batches = [(b.x_l, b.y_l) for b in map(make_batch, range(2, 6))]

    losses = metapl.finetune(
        final,
        batches,
        optim.sgd(0.3, momentum=0.9, nesterov=True, weight_decay=1e-3),
        label_smoothing=label_smoothing,
    )

    opt = torch.optim.SGD(
        reference.parameters(), 0.3, momentum=0.9, nesterov=True, weight_decay=1e-3
    )
    reference.train()
    expected = []
    for x, y in batches:
        opt.zero_grad()
        loss = smoothed_ce(reference(x), y, label_smoothing)
        loss.backward()
        opt.step()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-10)
    assert_tree_close(params(final), params(reference), **TIGHT)
    assert_tree_close(buffers(final), buffers(reference), **TIGHT)


def _counters(mpl) -> dict:
    return {"step": mpl.state.step, "h_baseline": mpl.state.h_baseline}


# --------------------------------------------------------------------------- method names


def test_the_method_decides_the_labels_and_the_baseline():
    """ "score_function" and the paper's "first_order" are one estimator with sampled labels by
    default; a baseline decay is the score function's alone (the other methods have no h), so
    one recipe serves every method and leaves exact's step unchanged."""
    runs = {}
    for name, kwargs in {
        "first_order": {"meta_grad": "first_order", "h_baseline_decay": 0.9},
        "score_function": {"meta_grad": "score_function", "h_baseline_decay": 0.9},
        "exact": {"meta_grad": "exact"},
        "exact_with_decay": {"meta_grad": "exact", "h_baseline_decay": 0.9},
    }.items():
        torch.manual_seed(0)
        mpl = metapl.MPL(mlp(seed=1), mlp(seed=2), optim.sgd(0.1), optim.sgd(0.1), **kwargs)
        for k in range(2):
            mpl.step(*make_batch(k).args())
        runs[name] = (mpl, params(mpl.teacher))
    assert runs["first_order"][0].config.pseudo_labels == "hard"
    assert runs["first_order"][0].config.meta_grad == "score_function"
    assert runs["exact"][0].config.pseudo_labels == "soft"
    assert_tree_equal(runs["first_order"][1], runs["score_function"][1], "teacher")
    assert_tree_equal(runs["exact"][1], runs["exact_with_decay"][1], "teacher")
    assert float(runs["exact_with_decay"][0].state.h_baseline) == 0.0


def test_mpl_step_is_pure_and_is_what_the_wrapper_runs():
    """``mpl_step(config, state, batch)`` returns the state ``MPL.step`` leaves in the modules
    (BatchNorm, EMA and a score-function baseline included) and mutates none of its inputs."""
    kwargs = dict(meta_grad="score_function", h_baseline_decay=0.9, ema_decay=0.5)
    nets = lambda: (mlp(seed=1, bn=True), mlp(seed=2, bn=True))  # noqa: E731
    wrapper = metapl.MPL(*nets(), optim.sgd(0.1, momentum=0.9), optim.adam(0.01), **kwargs)
    pure = metapl.MPL(*nets(), optim.sgd(0.1, momentum=0.9), optim.adam(0.01), **kwargs)
    state = pure.state
    before = copy.deepcopy(state)
    for k in range(2):
        b = make_batch(k)
        torch.manual_seed(k)
        wrapper.step(*b.args())
        torch.manual_seed(k)
        state, metrics = metapl.mpl_step(pure.config, state, metapl.mpl.Batch(*b.args()))

    def leaves(tree):
        return [x for x in torch.utils._pytree.tree_leaves(tree) if x is not None]

    assert all(map(torch.equal, leaves(pure.state), leaves(before)))  # inputs untouched
    assert len(leaves(state)) == len(leaves(wrapper.state)) > 20
    assert all(map(torch.equal, leaves(state), leaves(wrapper.state)))
    assert float(state.step) == 2 and float(state.h_baseline) != 0
    assert set(metrics) >= {"teacher/loss", "student/loss_l", "mpl/h", "mpl/grad_rms_logits"}
