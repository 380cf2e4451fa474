"""The rows of compare.py: one problem each, written once per library that can express it.

A cell is ``ROWS[row].build[peer](n)``: it builds the problem at size ``n`` and returns ``run``,
a function of no arguments that computes the meta-gradient and returns it as a list of tensors
in one order for every library (the parameters' order), so that the driver can check each
peer's numbers against metapl's before timing. Libraries are imported inside the builders:
a cell's process imports only its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _tasks import (
    LR_STUDENT,
    MAML_LR,
    MAML_STEPS,
    MOMENTUM,
    RIDGE_ITERATIONS,
    higher_bn_maml,
    higher_long,
    higher_maml,
    import_higher,
    long_problem,
    make_batch,
    maml_model,
    metapl_bn_maml,
    metapl_long,
    metapl_maml,
    metapl_ridge,
    mlp,
    ridge_problem,
    sinusoid_tasks,
    torchopt_long,
    torchopt_ridge,
)
from torch import Tensor, nn
from torch.func import functional_call

import metapl
from metapl import optim
from metapl.functional import soft_cross_entropy
from metapl.models import GPT
from metapl.models.gpt import next_byte_loss

Run = Callable[[], list[Tensor]]
Build = Callable[[int], Run]
FORWARD = {"curvature": "forward"}  # the metapl-forward variant of every exact row


@dataclass(frozen=True)
class Row:
    """``title`` formatted with the size ``n``; ``sizes``: (full run, --quick); ``build``: the
    peers that express the row; ``cannot``: why the others do not; ``tol``: the largest
    relative L2 difference from metapl's gradient a peer may show."""

    title: str
    sizes: tuple[int, int]
    build: dict[str, Build]
    cannot: dict[str, str] = field(default_factory=dict)
    tol: float = 1e-4


def params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


def import_torchopt():
    import torchopt

    return torchopt


def _stacked(per_task: list) -> list[Tensor]:
    """Per-task gradient tuples -> one tensor per parameter, tasks first."""
    return [torch.stack(gs) for gs in zip(*per_task, strict=True)]


# --------------------------------------------------------------------------- MAML sinusoid


def maml_metapl(tasks: int, **kwargs) -> Run:
    """One task eagerly; several under torch.func.vmap."""
    model = maml_model()
    theta, data = params(model), sinusoid_tasks(tasks)
    task_grad = metapl_maml(model, **kwargs)
    if tasks == 1:
        one = tuple(t[0] for t in data)
        return lambda: list(task_grad(theta, *one).values())
    batched = torch.func.vmap(task_grad, in_dims=(None, 0, 0, 0, 0))
    return lambda: list(batched(theta, *data).values())


def maml_higher(tasks: int) -> Run:
    data = sinusoid_tasks(tasks)
    task_grad = higher_maml(maml_model())
    return lambda: _stacked([task_grad(*(t[i] for t in data)) for i in range(tasks)])


def torchopt_task_grad(model: nn.Module, steps: int, lr: float, loss: Callable) -> Callable:
    """MAML's per-task gradient with torchopt.MetaSGD: the gradient w.r.t. the module's
    parameters before the steps, which are restored afterwards."""
    torchopt = import_torchopt()
    start = list(model.parameters())

    def task_grad(x_s, y_s, x_q, y_q):
        snapshot = torchopt.extract_state_dict(model)
        opt = torchopt.MetaSGD(model, lr=lr)
        for _ in range(steps):
            opt.step(loss(model(x_s), y_s))
        grads = torch.autograd.grad(loss(model(x_q), y_q), start)
        torchopt.recover_state_dict(model, snapshot)
        return grads

    return task_grad


def maml_torchopt(tasks: int) -> Run:
    data = sinusoid_tasks(tasks)
    task_grad = torchopt_task_grad(maml_model(), MAML_STEPS, MAML_LR, F.mse_loss)
    return lambda: _stacked([task_grad(*(t[i] for t in data)) for i in range(tasks)])


# --------------------------------------------------------------------------- BatchNorm CNN MAML

WAYS, QUERY_PER_CLASS, IMAGE = 5, 3, 28


def bn_cnn() -> nn.Module:
    """Two conv-BatchNorm-ReLU-pool blocks of 16 channels, a linear head to 5 classes."""
    torch.manual_seed(0)
    blocks = []
    for c_in in (1, 16):
        blocks += [
            nn.Conv2d(c_in, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(16 * (IMAGE // 4) ** 2, WAYS)).train()


def few_shot_task() -> tuple[Tensor, ...]:
    """A 5-way 1-shot task of random images: 5 support and 15 query examples."""
    gen = torch.Generator().manual_seed(1)
    y_s, y_q = torch.arange(WAYS), torch.arange(WAYS).repeat(QUERY_PER_CLASS)
    x_s = torch.randn(WAYS, 1, IMAGE, IMAGE, generator=gen)
    x_q = x_s[y_q] + 0.5 * torch.randn(len(y_q), 1, IMAGE, IMAGE, generator=gen)
    return x_s, y_s, x_q, y_q


def bn_maml_metapl(steps: int, **kwargs) -> Run:
    model = bn_cnn()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    task_grad = metapl_bn_maml(model, steps, F.cross_entropy, **kwargs)
    task = few_shot_task()
    return lambda: list(task_grad(params(model), buffers, *task).values())


def bn_maml_higher(steps: int) -> Run:
    task_grad, task = higher_bn_maml(bn_cnn(), steps, F.cross_entropy), few_shot_task()
    return lambda: list(task_grad(*task))


def bn_maml_torchopt(steps: int) -> Run:
    """torchopt's module updates its running statistics in place: reset before every call."""
    model = bn_cnn()
    start = {k: v.clone() for k, v in model.named_buffers()}
    task_grad = torchopt_task_grad(model, steps, MAML_LR, F.cross_entropy)
    task = few_shot_task()

    def run():
        for k, b in model.named_buffers():
            b.copy_(start[k])
        return list(task_grad(*task))

    return run


# --------------------------------------------------------------------------- Meta-Weight-Net

MWN_LR, MWN_HIDDEN, MWN_META_BATCH = 0.1, 100, 100


def mwn_problem(batch: int) -> tuple:
    """A classifier MLP 64-256-10 on a batch with 40% flipped labels, Meta-Weight-Net (MLP
    1-100-1, sigmoid) mapping each example's (detached) loss to its weight, a clean meta
    batch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    wnet = nn.Sequential(nn.Linear(1, MWN_HIDDEN), nn.ReLU(), nn.Linear(MWN_HIDDEN, 1))
    gen = torch.Generator().manual_seed(1)
    x, x_m = torch.randn(batch, 64, generator=gen), torch.randn(MWN_META_BATCH, 64, generator=gen)
    y, y_m = torch.randint(0, 10, (batch,), generator=gen), torch.randint(0, 10, (100,))
    flip = torch.rand(batch, generator=gen) < 0.4
    y = torch.where(flip, torch.randint(0, 10, (batch,), generator=gen), y)
    return net, wnet, x, y, x_m, y_m


def weighted_loss(logits: Tensor, y: Tensor, weigh: Callable[[Tensor], Tensor]) -> Tensor:
    """Meta-Weight-Net's inner loss: per-example losses weighted by weigh(detached losses)."""
    losses = F.cross_entropy(logits, y, reduction="none")
    weights = torch.sigmoid(weigh(losses.detach().unsqueeze(1))).squeeze(1)
    return (weights * losses).mean()


def mwn_metapl(batch: int, **kwargs) -> Run:
    net, wnet, x, y, x_m, y_m = mwn_problem(batch)
    opt = optim.sgd(MWN_LR, momentum=MOMENTUM)

    def inner(s, m):
        return weighted_loss(functional_call(net, s, (x,)), y, functools.partial(_call, wnet, m))

    def outer(s):
        return F.cross_entropy(functional_call(net, s, (x_m,)), y_m)

    def run():
        return list(
            metapl.meta_grad(
                inner, outer, params(net), params(wnet), opt, **kwargs
            ).meta_grads.values()
        )

    return run


def _call(module: nn.Module, p: dict[str, Tensor], x: Tensor) -> Tensor:
    return functional_call(module, p, (x,))


def mwn_higher(batch: int) -> Run:
    higher = import_higher()
    net, wnet, x, y, x_m, y_m = mwn_problem(batch)
    opt = torch.optim.SGD(net.parameters(), lr=MWN_LR, momentum=MOMENTUM)

    def run():
        with higher.innerloop_ctx(net, opt) as (fnet, diffopt):
            diffopt.step(weighted_loss(fnet(x), y, wnet))
            return list(torch.autograd.grad(F.cross_entropy(fnet(x_m), y_m), wnet.parameters()))

    return run


def mwn_torchopt(batch: int) -> Run:
    torchopt = import_torchopt()
    net, wnet, x, y, x_m, y_m = mwn_problem(batch)

    def run():
        snapshot = torchopt.extract_state_dict(net)
        opt = torchopt.MetaSGD(net, lr=MWN_LR, momentum=MOMENTUM)
        opt.step(weighted_loss(net(x), y, wnet))
        grads = torch.autograd.grad(F.cross_entropy(net(x_m), y_m), wnet.parameters())
        torchopt.recover_state_dict(net, snapshot)
        return list(grads)

    return run


# --------------------------------------------------------------------------- learned lr, K steps


def long_metapl(steps: int, **kwargs) -> Run:
    run = metapl_long(*long_problem(steps), **kwargs)
    return lambda: [run()]


def long_higher(steps: int) -> Run:
    run = higher_long(*long_problem(steps))
    return lambda: [run()]


def long_torchopt(steps: int) -> Run:
    run = torchopt_long(*long_problem(steps))
    if isinstance(run, str):
        raise RuntimeError(run)
    return lambda: [run()]


# --------------------------------------------------------------------------- iMAML ridge


def ridge_metapl(_: int) -> Run:
    run = metapl_ridge(*ridge_problem())
    return lambda: list(run())


NEUMANN_STEP = 0.5


class _Holder(nn.Module):
    """A module whose parameters are the given tensors (betty's problems hold modules)."""

    def __init__(self, **tensors: Tensor):
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t.clone()))


def ridge_betty(_: int) -> Run:
    """betty: the lower problem holds w at the closed-form solution (SGD with lr 0 keeps it
    there) and takes the implicit hypergradient by betty's Neumann series (RIDGE_ITERATIONS
    terms at step 0.5: converged far below 1e-6 here, the Hessian's eigenvalues lie in about
    [0.7, 2.5]); the upper problem holds (theta, log lam) and records its gradient in betty's
    grad_callback hook; one Engine.run of one iteration per call. betty's "cg" does not
    converge on this problem (0.34 relative error after 1 iteration, 0.70 after 20, 4.8 after
    100): its update of the search direction uses the previous residual."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    meta, inner_loss, solve, outer_loss = ridge_problem()
    batches = [(torch.zeros(1),)]  # the losses read no batch; betty's problems need a loader

    class Lower(ImplicitProblem):
        def training_step(self, batch):
            upper = self.upper.module
            return inner_loss(self.module.w, upper.theta, upper.log_lam)

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            return outer_loss(self.lower.module.w)

        def grad_callback(self):
            self.grads = [p.grad.detach().clone() for p in self.trainable_parameters()]

    w = _Holder(w=solve(meta["theta"], meta["log_lam"]))
    m = _Holder(theta=meta["theta"], log_lam=meta["log_lam"])
    lower = Lower(
        name="lower",
        module=w,
        optimizer=torch.optim.SGD(w.parameters(), lr=0.0),
        train_data_loader=batches,
        config=Config(
            type="neumann", neumann_iterations=RIDGE_ITERATIONS, neumann_alpha=NEUMANN_STEP
        ),
    )
    upper = Upper(
        name="upper",
        module=m,
        optimizer=torch.optim.SGD(m.parameters(), lr=0.0),
        train_data_loader=batches,
        config=Config(),
    )
    engine = Engine(
        problems=[upper, lower],
        config=EngineConfig(train_iters=1),
        dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
    )

    def run():
        engine.run()
        return upper.grads

    return run


def ridge_torchopt(_: int) -> Run:
    run = torchopt_ridge(*ridge_problem())
    if isinstance(run, str):
        raise RuntimeError(run)
    return lambda: list(run())


# --------------------------------------------------------------------------- MPL step


def mpl_problem() -> tuple:
    """meta_step.py's problem: teacher and student MLPs 64-256-256-10, 64 labeled + 448
    unlabeled examples, the student's SGD(momentum 0.9) lookahead from zero momentum."""
    x_l, y_l, x_u, _ = make_batch(torch.device("cpu"))
    return mlp(1), mlp(2), x_l, y_l, x_u


def mpl_metapl(_: int, **kwargs) -> Run:
    """The teacher's gradient of one MPL step: through the student's lookahead on its pseudo
    labels (the MPL term) plus its own supervised loss (the outer loss's meta path)."""
    teacher, student, x_l, y_l, x_u = mpl_problem()
    opt = optim.sgd(LR_STUDENT, momentum=MOMENTUM)

    def inner(s, t):
        pseudo = F.softmax(functional_call(teacher, t, (x_u,)), dim=-1)
        return soft_cross_entropy(functional_call(student, s, (x_u,)), pseudo)

    def outer(s, t):
        mpl = F.cross_entropy(functional_call(student, s, (x_l,)), y_l)
        return mpl + F.cross_entropy(functional_call(teacher, t, (x_l,)), y_l)

    def run():
        res = metapl.meta_grad(inner, outer, params(student), params(teacher), opt, **kwargs)
        return list(res.meta_grads.values())

    return run


def mpl_higher(_: int) -> Run:
    higher = import_higher()
    teacher, student, x_l, y_l, x_u = mpl_problem()
    opt = torch.optim.SGD(student.parameters(), lr=LR_STUDENT, momentum=MOMENTUM)

    def run():
        with higher.innerloop_ctx(student, opt) as (fs, diffopt):
            diffopt.step(soft_cross_entropy(fs(x_u), F.softmax(teacher(x_u), dim=-1)))
            loss = F.cross_entropy(fs(x_l), y_l) + F.cross_entropy(teacher(x_l), y_l)
            return list(torch.autograd.grad(loss, teacher.parameters()))

    return run


def mpl_torchopt(_: int) -> Run:
    torchopt = import_torchopt()
    teacher, student, x_l, y_l, x_u = mpl_problem()

    def run():
        snapshot = torchopt.extract_state_dict(student)
        opt = torchopt.MetaSGD(student, lr=LR_STUDENT, momentum=MOMENTUM)
        opt.step(soft_cross_entropy(student(x_u), F.softmax(teacher(x_u), dim=-1)))
        loss = F.cross_entropy(student(x_l), y_l) + F.cross_entropy(teacher(x_l), y_l)
        grads = torch.autograd.grad(loss, teacher.parameters())
        torchopt.recover_state_dict(student, snapshot)
        return list(grads)

    return run


# --------------------------------------------------------------------------- GPT data mixing

SOURCES, PER_SOURCE, CLEAN, WARM_STEPS = 4, 4, 8, 3
GPT_LR = {"sgd": 0.1, "adam": 1e-3}
# Adam's weight decay gives every parameter a nonzero gradient (the last position's embedding
# has none from the loss: sqrt(v) = 0 there has no derivative), and WARM_STEPS real steps before
# the lookahead give it a second moment (the first Adam step is lr * sign(g): flat).
GPT_DECAY = {"sgd": 0.0, "adam": 1e-2}


def gpt_problem(context: int) -> tuple:
    """metapl.models.GPT (2 layers, width 64) on 4 sources of 4 byte sequences each: source k
    draws its bytes from a window of 64 values starting at 32 k (the clean target: source 1's
    window); the meta parameters are one mixing logit per source."""
    torch.manual_seed(0)
    model = GPT(context=context, layers=2, width=64, heads=4)
    gen = torch.Generator().manual_seed(1)
    start = 32 * torch.arange(SOURCES).repeat_interleave(PER_SOURCE)[:, None]
    tokens = start + torch.randint(0, 64, (SOURCES * PER_SOURCE, context), generator=gen)
    clean = 32 + torch.randint(0, 64, (CLEAN, context), generator=gen)
    source = torch.arange(SOURCES).repeat_interleave(PER_SOURCE)
    return model, tokens, clean, source


def mixed_loss(logits: Tensor, tokens: Tensor, source: Tensor, mixing: Tensor) -> Tensor:
    """The inner loss: each sequence's next-byte loss weighted by softmax(mixing)[its source]
    (a weighted mean over sources of the per-source mean loss)."""
    weights = torch.softmax(mixing, 0)[source] / PER_SOURCE
    return (weights * next_byte_loss(logits, tokens)).sum()


def gpt_metapl(context: int, opt_name: str, **kwargs) -> Run:
    """The lookahead starts after WARM_STEPS plain steps at uniform mixing (Adam: its state)."""
    model, tokens, clean, source = gpt_problem(context)
    opt = getattr(optim, opt_name)(GPT_LR[opt_name], weight_decay=GPT_DECAY[opt_name])
    meta = {"mixing": torch.zeros(SOURCES)}

    def inner(s, m):
        return mixed_loss(functional_call(model, s, (tokens,)), tokens, source, m["mixing"])

    def outer(s):
        return next_byte_loss(functional_call(model, s, (clean,)), clean).mean()

    start, state = params(model), opt.init(params(model))
    for _ in range(WARM_STEPS):
        start, state = opt.step(start, torch.func.grad(inner)(start, meta), state)

    def run():
        res = metapl.meta_grad(inner, outer, start, meta, opt, opt_state=state, **kwargs)
        return list(res.meta_grads.values())

    return run


def _warm(model: nn.Module, opt_name: str, tokens: Tensor, source: Tensor) -> torch.optim.Optimizer:
    """A torch.optim optimizer over ``model`` after WARM_STEPS steps at uniform mixing."""
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[opt_name]
    opt = cls(model.parameters(), lr=GPT_LR[opt_name], weight_decay=GPT_DECAY[opt_name])
    for _ in range(WARM_STEPS):
        opt.zero_grad()
        mixed_loss(model(tokens), tokens, source, torch.zeros(SOURCES)).backward()
        opt.step()
    return opt


def gpt_higher(context: int, opt_name: str) -> Run:
    """higher's differentiable optimizer starts from the torch.optim optimizer's state."""
    higher = import_higher()
    model, tokens, clean, source = gpt_problem(context)
    opt = _warm(model, opt_name, tokens, source)

    def run():
        mixing = torch.zeros(SOURCES, requires_grad=True)
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            diffopt.step(mixed_loss(fmodel(tokens), tokens, source, mixing))
            loss = next_byte_loss(fmodel(clean), clean).mean()
            return list(torch.autograd.grad(loss, [mixing]))

    return run


def gpt_torchopt(context: int, opt_name: str) -> Run:
    """torchopt's MetaSGD / MetaAdam: WARM_STEPS steps, then torchopt.stop_gradient on the
    module and the optimizer; every call restores both."""
    torchopt = import_torchopt()
    model, tokens, clean, source = gpt_problem(context)
    cls = {"sgd": torchopt.MetaSGD, "adam": torchopt.MetaAdam}[opt_name]
    opt = cls(model, lr=GPT_LR[opt_name], weight_decay=GPT_DECAY[opt_name])
    for _ in range(WARM_STEPS):
        opt.step(mixed_loss(model(tokens), tokens, source, torch.zeros(SOURCES)))
    torchopt.stop_gradient(model)
    torchopt.stop_gradient(opt)

    def run():
        mixing = torch.zeros(SOURCES, requires_grad=True)
        net_state = torchopt.extract_state_dict(model)
        opt_state = torchopt.extract_state_dict(opt)
        opt.step(mixed_loss(model(tokens), tokens, source, mixing))
        grads = torch.autograd.grad(next_byte_loss(model(clean), clean).mean(), [mixing])
        torchopt.recover_state_dict(model, net_state)
        torchopt.recover_state_dict(opt, opt_state)
        return list(grads)

    return run


# --------------------------------------------------------------------------- the rows

L2L = "learn2learn"
BETTY_UNROLL = (
    "betty's hypergradients are implicit or approximate (darts, neumann, cg, reinforce), "
    "taken after the lower level's step; it has no exact gradient through the unrolled steps"
)


def _exact(build: Callable, higher: Build, torchopt: Build, **fixed) -> dict[str, Build]:
    """The peers of an exact row: metapl (reverse curvature, its default), metapl forward,
    higher and torchopt."""
    return {
        "metapl": functools.partial(build, **fixed),
        "metapl forward": functools.partial(build, **fixed, **FORWARD),
        "higher": functools.partial(higher, **fixed),
        "torchopt": functools.partial(torchopt, **fixed),
    }


ROWS: dict[str, Row] = {
    "maml-1": Row(
        "MAML sinusoid, 1 task, K=5",
        (1, 1),
        _exact(maml_metapl, maml_higher, maml_torchopt),
        {"betty": BETTY_UNROLL},
    ),
    "maml-tasks": Row(
        "MAML sinusoid, {n} tasks, K=5 (metapl: vmap; peers: a loop)",
        (25, 5),
        _exact(maml_metapl, maml_higher, maml_torchopt),
        {"betty": BETTY_UNROLL},
    ),
    "maml-bn": Row(
        "MAML, BatchNorm CNN, 5-way 1-shot, K={n}",
        (10, 2),
        _exact(bn_maml_metapl, bn_maml_higher, bn_maml_torchopt),
        {"betty": BETTY_UNROLL},
        tol=1e-3,
    ),
    "mwn": Row(
        "Meta-Weight-Net step, batch {n}, SGD(momentum 0.9) lookahead",
        (128, 32),
        _exact(mwn_metapl, mwn_higher, mwn_torchopt),
        {
            "betty": "betty's Meta-Weight-Net takes the darts approximation (finite differences "
            "after the lookahead), not the exact one-step gradient"
        },
    ),
    "lr-100": Row(
        "learned learning rate, K={n}, batch 128 per step",
        (100, 10),
        _exact(long_metapl, long_higher, long_torchopt),
        {"betty": BETTY_UNROLL},
        tol=1e-3,
    ),
    "lr-400": Row(
        "learned learning rate, K={n}, batch 128 per step",
        (400, 20),
        _exact(long_metapl, long_higher, long_torchopt),
        {"betty": BETTY_UNROLL},
        tol=1e-3,
    ),
    "imaml": Row(
        "iMAML ridge regression, n=500, d=100 (implicit; betty: Neumann, others: CG)",
        (0, 0),
        {"metapl": ridge_metapl, "torchopt": ridge_torchopt, "betty": ridge_betty},
        {
            "metapl forward": "curvature is an option of the exact method; this row is implicit",
            "higher": "higher has no implicit differentiation (it only unrolls)",
        },
    ),
    "mpl": Row(
        "MPL step, teacher gradient, MLPs 64-256-256-10",
        (0, 0),
        _exact(mpl_metapl, mpl_higher, mpl_torchopt),
        {
            "betty": "betty's MPL-style problems take darts / neumann / cg approximations, not "
            "the exact lookahead gradient"
        },
    ),
    "gpt-sgd": Row(
        "GPT data mixing, context {n}, SGD lookahead after 3 steps",
        (64, 16),
        _exact(gpt_metapl, gpt_higher, gpt_torchopt, opt_name="sgd"),
        {"betty": BETTY_UNROLL},
    ),
    "gpt-adam": Row(
        "GPT data mixing, context {n}, Adam lookahead after 3 steps",
        (64, 16),
        _exact(gpt_metapl, gpt_higher, gpt_torchopt, opt_name="adam"),
        {"betty": BETTY_UNROLL},
        tol=1e-3,
    ),
}
