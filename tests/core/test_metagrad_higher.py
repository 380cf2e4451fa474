"""metapl.meta_grad(method="exact") against `higher` (facebookresearch/higher), the reference
implementation of differentiable torch.optim loops, on nn.Module teacher and student."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import (
    F64,
    assert_close,
    one_thread,  # noqa: F401 (autouse fixture)
)
from torch.func import functional_call

import metapl
from metapl import optim

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    higher = pytest.importorskip("higher")

# higher's DifferentiableAdam differs from torch.optim.Adam in where eps goes. It computes
#     p - lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps),
# torch computes
#     p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)          (bc_i = 1 - beta_i^t),
# i.e. higher is torch with eps replaced by eps / sqrt(bc2_t), a different eps at every step.
# metapl follows torch. With eps = 0 both are the same function, so the comparison uses eps = 0
# (second moments here are far from 0). test_higher_adam_eps_placement checks this explanation.
# Adam with eps = 0 at K = 1 is sign descent, whose meta-gradient is exactly 0, so Adam is
# compared at K = 2, 3 here and at K = 1 (eps > 0) in test_higher_adam_eps_placement.
CASES = {
    "sgd-momentum": (
        torch.optim.SGD,
        optim.sgd,
        {"lr": 0.3, "momentum": 0.9, "weight_decay": 0.01},
    ),
    "adam": (torch.optim.Adam, optim.adam, {"lr": 0.05, "eps": 0.0, "weight_decay": 0.01}),
}


def setup(seed=0):
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    student = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x_u, x_l = torch.randn(8, 4, dtype=F64), torch.randn(6, 4, dtype=F64)
    return teacher.to(F64), student.to(F64), x_u, x_l, torch.randint(0, 3, (6,))


def soft_ce(student_logits, teacher_logits):
    return -(teacher_logits.softmax(-1) * student_logits.log_softmax(-1)).sum(-1).mean()


def with_higher(torch_opt, hyper, steps, seed=0):
    teacher, student, x_u, x_l, y_l = setup(seed)
    opt = torch_opt(student.parameters(), **hyper)
    with higher.innerloop_ctx(student, opt, copy_initial_weights=True) as (fstudent, diffopt):
        for _ in range(steps):
            diffopt.step(soft_ce(fstudent(x_u), teacher(x_u)))
        outer = F.cross_entropy(fstudent(x_l), y_l)
        grads = torch.autograd.grad(outer, list(teacher.parameters()))
        new_student = [p.detach() for p in fstudent.parameters()]
    return named(teacher, grads), named(student, new_student), outer.detach()


def named(module, tensors):
    return {k: v for (k, _), v in zip(module.named_parameters(), tensors, strict=True)}


def with_metapl(metapl_opt, hyper, steps, seed=0):
    teacher, student, x_u, x_l, y_l = setup(seed)

    def inner_loss(s, t):
        return soft_ce(functional_call(student, s, (x_u,)), functional_call(teacher, t, (x_u,)))

    def outer_loss(s):
        return F.cross_entropy(functional_call(student, s, (x_l,)), y_l)

    return metapl.meta_grad(
        inner_loss,
        outer_loss,
        dict(student.named_parameters()),
        dict(teacher.named_parameters()),
        metapl_opt(**hyper),
        steps=steps,
    )


@pytest.mark.parametrize(
    ("case", "steps"),
    [("sgd-momentum", 1), ("sgd-momentum", 2), ("sgd-momentum", 3), ("adam", 2), ("adam", 3)],
)
def test_exact_matches_higher(case, steps):
    torch_opt, metapl_opt, hyper = CASES[case]
    grads, student, outer = with_higher(torch_opt, hyper, steps)
    res = with_metapl(metapl_opt, hyper, steps)
    assert max(g.abs().max() for g in grads.values()) > 1e-3
    assert_close(res.meta_grads, grads, rtol=1e-9, atol=1e-12)
    assert_close(res.student_params, student, rtol=1e-12, atol=1e-14)
    assert res.outer_loss.item() == pytest.approx(outer.item(), rel=1e-12)


def test_higher_adam_eps_placement():
    """One step of higher's Adam with eps = e equals torch's (and metapl's) Adam with
    eps = e / sqrt(1 - beta2), and differs from it with eps = e."""
    hyper = {"lr": 0.05, "eps": 1e-3}
    grads, student, _ = with_higher(torch.optim.Adam, hyper, steps=1)
    moved = with_metapl(optim.adam, {**hyper, "eps": 1e-3 / math.sqrt(1 - 0.999)}, steps=1)
    assert_close(moved.meta_grads, grads, rtol=1e-9, atol=1e-12)
    assert_close(moved.student_params, student, rtol=1e-12, atol=1e-14)
    same_eps = with_metapl(optim.adam, hyper, steps=1)
    assert not torch.allclose(same_eps.meta_grads["0.weight"], grads["0.weight"], rtol=1e-3)


def maml_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x_s, x_q = torch.randn(10, 1, dtype=F64), torch.randn(10, 1, dtype=F64)
    return model.to(F64), x_s, torch.sin(2 * x_s), x_q, torch.sin(2 * x_q)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_matches_higher_without_copying_initial_weights(steps):
    """MAML: higher differentiates into the model's own weights (copy_initial_weights=False);
    metapl takes the start as a function of the meta parameters."""
    model, x_s, y_s, x_q, y_q = maml_setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(x_s), y_s))
        outer = F.mse_loss(fmodel(x_q), y_q)
        expected = named(model, torch.autograd.grad(outer, list(model.parameters())))

    def inner(s, m):
        return F.mse_loss(functional_call(model, s, (x_s,)), y_s)

    def outer_loss(s):
        return F.mse_loss(functional_call(model, s, (x_q,)), y_q)

    theta = {k: v.detach() for k, v in model.named_parameters()}
    res = metapl.meta_grad(
        inner, outer_loss, lambda m: m, theta, optim.sgd(0.1, momentum=0.5), steps=steps
    )
    assert max(g.abs().max() for g in expected.values()) > 1e-3
    assert_close(res.meta_grads, expected, rtol=1e-10, atol=1e-13)
    assert res.outer_loss.item() == pytest.approx(outer.item(), rel=1e-12)


def test_learned_learning_rate_matches_higher_override():
    """A learned learning rate: higher's ``override={'lr': [tensor]}`` against metapl's
    optimizer as a function of the meta parameters."""
    model, x_s, y_s, x_q, y_q = maml_setup(seed=1)
    lr = torch.tensor(0.2, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x_s), y_s))
        (expected,) = torch.autograd.grad(F.mse_loss(fmodel(x_q), y_q), [lr])

    def inner(s, m):
        return F.mse_loss(functional_call(model, s, (x_s,)), y_s)

    def outer_loss(s):
        return F.mse_loss(functional_call(model, s, (x_q,)), y_q)

    start = {k: v.detach() for k, v in model.named_parameters()}
    res = metapl.meta_grad(
        inner,
        outer_loss,
        start,
        {"lr": lr.detach()},
        lambda m: optim.sgd(m["lr"], momentum=0.9),
        steps=3,
    )
    assert expected.abs() > 1e-3
    assert res.meta_grads["lr"].item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("checkpoint", [None, True])
def test_batchnorm_maml_through_more_steps_than_checkpoint_keeps(checkpoint):
    """MAML on a BatchNorm network, K=7: higher's functional module updates its copy of the
    running statistics in place at every step; metapl carries them as state= (and recomputes
    steps with checkpoint=True)."""
    torch.manual_seed(3)
    net = (
        torch.nn.Sequential(
            torch.nn.Linear(4, 8, bias=False),
            torch.nn.BatchNorm1d(8),
            torch.nn.Tanh(),
            torch.nn.Linear(8, 3),
        )
        .to(F64)
        .train()
    )
    x_s, x_q = torch.randn(12, 4, dtype=F64), torch.randn(12, 4, dtype=F64)
    y_s, y_q = torch.randint(0, 3, (12,)), torch.randint(0, 3, (12,))
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in net.named_buffers()}

    res = metapl.meta_grad(
        lambda s, m, st: (F.cross_entropy(functional_call(net, {**s, **st}, (x_s,)), y_s), st),
        lambda s, st: F.cross_entropy(functional_call(net, {**s, **st}, (x_q,)), y_q),
        lambda m: m,
        theta,
        optim.sgd(0.3, momentum=0.5),
        steps=7,
        state=buffers,
        checkpoint=checkpoint,
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
        for _ in range(7):
            diffopt.step(F.cross_entropy(fnet(x_s), y_s))
        statistics = {k: v.detach().clone() for k, v in fnet.named_buffers()}
        query = F.cross_entropy(fnet(x_q), y_q)
        grads = torch.autograd.grad(query, list(net.parameters()))
    assert_close(res.meta_grads, dict(zip(theta, grads, strict=True)), rtol=1e-10, atol=1e-13)
    assert_close(res.state, statistics, rtol=1e-12, atol=1e-14)
    assert int(statistics["1.num_batches_tracked"]) == 7
