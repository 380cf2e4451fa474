"""meta_grad(..., state=): BatchNorm running statistics carried through K steps, for every
method, checkpoint, truncation, vmap and compile, against a float64 plain-autograd unroll of a
module whose BatchNorm updates its own buffers in place (written here, without metapl)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from reference import (
    F64,
    REFERENCE,
    assert_close,
    detach,
    one_thread,  # noqa: F401 (autouse fixture)
    rel_err,
)
from torch import nn
from torch.func import functional_call, vmap

import metapl
from metapl import optim

STEPS = 7  # more than checkpoint's default 5: the reverse pass recomputes steps


def bn_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    # no bias before BatchNorm: its gradient would be exactly 0 (Adam's sqrt(v) at 0)
    net = nn.Sequential(
        nn.Linear(3, 6, bias=False), nn.BatchNorm1d(6, momentum=0.3), nn.Tanh(), nn.Linear(6, 2)
    )
    return net.to(F64).train()


def task(seed=0, n=10):
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(2 * n, 3, generator=gen, dtype=F64)
    y = torch.sin(x @ torch.randn(3, 2, generator=gen, dtype=F64))
    return x[:n], y[:n], x[n:], y[n:]


def params(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def buffers(net):
    return {k: v.detach().clone() for k, v in net.named_buffers()}


def everywhere(net, seed=0):
    """Meta parameters in the start (``theta``), the inner loss (per-example weights ``t``) and
    the optimizer (``log_lr``); the outer loss in eval mode reads the running statistics."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "theta": params(net),
        "t": 0.5 * torch.randn(10, generator=gen, dtype=F64),
        "log_lr": torch.tensor(-1.5, dtype=F64),
    }


def metapl_run(
    net,
    meta,
    data,
    steps=STEPS,
    method="exact",
    eval_outer=True,
    opt="sgd",
    evaluation=None,
    **kwargs,
):
    x_s, y_s, x_q, y_q = data
    evaluation = copy.deepcopy(net).eval() if evaluation is None else evaluation

    def inner(s, m, state):
        out = functional_call(net, {**s, **state}, (x_s,))
        per_example = (out - y_s).square().mean(-1)
        return (torch.sigmoid(m["t"]) * per_example).mean(), state

    def outer(s, state):
        model = evaluation if eval_outer else net
        return F.mse_loss(functional_call(model, {**s, **state}, (x_q,)), y_q)

    def optimizer(m):
        if opt == "sgd":
            return optim.sgd(m["log_lr"].exp(), momentum=0.5)
        return optim.adam(m["log_lr"].exp() / 10, betas=(0.8, 0.9))

    state = kwargs.pop("state", buffers(net))
    return metapl.meta_grad(
        inner,
        outer,
        lambda m: m["theta"],
        meta,
        optimizer,
        steps=steps,
        method=method,
        state=state,
        **kwargs,
    )


def reference(
    net, meta, data, steps=STEPS, eval_outer=True, opt="sgd", truncate=None, first_order=False
):
    """Plain autograd on a copy of ``net`` that updates its own buffers at every forward."""
    x_s, y_s, x_q, y_q = data
    model = copy.deepcopy(net)
    meta = {k: detach(v) for k, v in meta.items()}
    meta = {
        "theta": {k: v.clone().requires_grad_() for k, v in meta["theta"].items()},
        "t": meta["t"].clone().requires_grad_(),
        "log_lr": meta["log_lr"].clone().requires_grad_(),
    }
    lr = meta["log_lr"].exp()
    ref_opt = (
        REFERENCE["sgd"](lr, momentum=0.5)
        if opt == "sgd"
        else REFERENCE["adam"](lr / 10, betas=(0.8, 0.9))
    )
    s = dict(meta["theta"])
    state = ref_opt.init(s)
    first = steps - (truncate or steps)
    for k in range(steps):
        if k == first and first > 0:
            s, state = detach(s), detach(state)
            s = {n: v.requires_grad_() for n, v in s.items()}
        out = functional_call(model, s, (x_s,))
        loss = (torch.sigmoid(meta["t"]) * (out - y_s).square().mean(-1)).mean()
        g = torch.autograd.grad(loss, list(s.values()), create_graph=not first_order)
        s, state = ref_opt.step(s, dict(zip(s, g, strict=True)), state)
    statistics = buffers(model)
    if eval_outer:
        model.eval()
    loss = F.mse_loss(functional_call(model, s, (x_q,)), y_q)
    leaves = [*meta["theta"].values(), meta["t"], meta["log_lr"]]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    n = len(meta["theta"])
    expected = {
        "theta": dict(zip(meta["theta"], grads[:n], strict=True)),
        "t": grads[n],
        "log_lr": grads[n + 1],
    }
    return expected, detach(s), statistics, loss.detach()


CASES = {
    "exact": {},
    "exact, checkpoint=True": {"checkpoint": True},
    "exact, checkpoint=3": {"checkpoint": 3},
    "exact, checkpoint=False": {"checkpoint": False},
    "exact, reverse pass": {"reduce": lambda tree: tree},
    "exact, reverse pass, checkpoint=True": {"reduce": lambda tree: tree, "checkpoint": True},
    "exact, adam": {"opt": "adam"},
    "exact, train-mode outer": {"eval_outer": False},
    "exact, forward curvature": {"curvature": "forward"},
    "exact, forward curvature, checkpoint=True": {"curvature": "forward", "checkpoint": True},
    "exact, forward curvature, checkpoint=False": {"curvature": "forward", "checkpoint": False},
    "exact, forward curvature, adam": {"curvature": "forward", "opt": "adam"},
    "exact, forward curvature, train-mode outer": {"curvature": "forward", "eval_outer": False},
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_carries_batchnorm_statistics_through_every_step(case):
    kwargs = dict(CASES[case])
    ref_kwargs = {k: kwargs.pop(k) for k in ("opt", "eval_outer") if k in kwargs}
    net = bn_net()
    meta, data = everywhere(net), task()
    before_module, state = buffers(net), buffers(net)
    state_before = copy.deepcopy(state)
    res = metapl_run(net, meta, data, state=state, **ref_kwargs, **kwargs)
    expected, s, statistics, loss = reference(net, meta, data, **ref_kwargs)
    assert_close(res.meta_grads, expected, rtol=1e-10, atol=1e-13)
    assert_close(res.student_params, s, rtol=1e-12, atol=1e-14)
    assert_close(res.state, statistics, rtol=1e-12, atol=1e-14)
    assert int(res.state["1.num_batches_tracked"]) == STEPS  # once per step, not per evaluation
    assert res.outer_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    # nothing of the caller's is mutated: neither the state given nor the module's buffers
    assert_close(state, state_before, rtol=0, atol=0)
    assert_close(buffers(net), before_module, rtol=0, atol=0)
    # every path carries a signal, and the statistics matter to the outer loss
    assert min(flat_abs_max(g) for g in res.meta_grads.values()) > 1e-6


def flat_abs_max(tree):
    return max(v.abs().max().item() for v in (tree.values() if isinstance(tree, dict) else [tree]))


def test_the_statistics_reach_the_outer_loss():
    """Discriminative: the reference without the carried statistics (the start's) differs."""
    net = bn_net()
    meta, data = everywhere(net), task()
    res = metapl_run(net, meta, data)
    stale = metapl_run(net, meta, data, steps=1)  # the statistics of one step, not seven
    assert rel_err(res.state, stale.state) > 1e-2
    frozen = copy.deepcopy(net)
    frozen[1].momentum = 0.0  # running statistics that never move
    expected, *_ = reference(frozen, meta, data)
    assert rel_err(res.meta_grads, expected) > 1e-3


@pytest.mark.parametrize("truncate", [1, 3])
def test_truncated_exact_with_state(truncate):
    net = bn_net(1)
    meta, data = everywhere(net, 1), task(1)
    res = metapl_run(net, meta, data, truncate=truncate)
    expected, _, statistics, _ = reference(net, meta, data, truncate=truncate)
    assert_close(res.meta_grads, expected, rtol=1e-10, atol=1e-13)
    assert_close(res.state, statistics, rtol=1e-12, atol=1e-14)


def test_first_order_with_state():
    net = bn_net(2)
    meta, data = everywhere(net, 2), task(2)
    res = metapl_run(net, meta, data, method="first_order")
    expected, _, statistics, _ = reference(net, meta, data, first_order=True)
    assert_close(res.meta_grads, expected, rtol=1e-10, atol=1e-13)
    assert_close(res.state, statistics, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("checkpoint", [None, True])
def test_finite_difference_with_state(checkpoint):
    net = bn_net(3)
    meta, data = everywhere(net, 3), task(3)
    res = metapl_run(
        net, meta, data, method="finite_difference", fd_radius=1e-6, checkpoint=checkpoint
    )
    expected, _, statistics, _ = reference(net, meta, data)
    assert rel_err(res.meta_grads, expected) < 1e-7
    assert_close(res.state, statistics, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "method", ["exact", metapl.Exact(curvature="forward"), "first_order", "finite_difference"]
)
def test_vmap_one_state_per_task_equals_a_loop(method):
    net = bn_net(4)
    meta = everywhere(net, 4)
    tasks = [task(i) for i in range(3)]
    data = [torch.stack(parts) for parts in zip(*tasks, strict=True)]
    # one state per task: each task starts from its own statistics
    states = [buffers(net) for _ in tasks]
    for i, st in enumerate(states):
        st["1.running_mean"] += 0.1 * i
    stacked = {k: torch.stack([st[k] for st in states]) for k in states[0]}

    def one(x_s, y_s, x_q, y_q, state):
        res = metapl_run(net, meta, (x_s, y_s, x_q, y_q), method=method, state=state)
        return res.meta_grads, res.state

    grads, new_states = vmap(one)(*data, stacked)
    for i, t in enumerate(tasks):
        loop = metapl_run(net, meta, t, method=method, state=states[i])
        assert_close(index(grads, i), loop.meta_grads, rtol=1e-10, atol=1e-12)
        assert_close(index(new_states, i), loop.state, rtol=1e-12, atol=1e-14)


def index(tree, i):
    return {k: index(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


def test_vmap_with_one_shared_state_names_the_fix():
    net = bn_net(4)
    meta = everywhere(net, 4)
    data = [torch.stack(parts) for parts in zip(task(0), task(1), strict=True)]
    shared = buffers(net)
    with pytest.raises(ValueError, match="pass one state per task"):
        vmap(lambda *d: metapl_run(net, meta, d, state=shared).meta_grads)(*data)


@pytest.mark.parametrize("curvature", ["reverse", "forward"])
def test_compile_true_with_state_equals_eager(curvature):
    """meta_grad(compile=True): the step graphs take the state as an input."""
    torch._dynamo.reset()
    net = bn_net(5)
    meta, data = everywhere(net, 5), task(5)
    eager = metapl_run(net, meta, data, steps=3)  # reverse curvature
    compiled = metapl_run(net, meta, data, steps=3, compile=True, curvature=curvature)
    assert_close(compiled.meta_grads, eager.meta_grads, rtol=1e-10, atol=1e-13)
    assert_close(compiled.state, eager.state, rtol=1e-12, atol=1e-14)


@pytest.mark.slow  # compiles the whole 7-step unroll
def test_torch_compile_of_a_stateful_call_equals_eager():
    torch._dynamo.reset()
    net = bn_net(6)
    meta, data = everywhere(net, 6), task(6)
    evaluation = copy.deepcopy(net).eval()  # outside: dynamo cannot deepcopy a module
    eager = metapl_run(net, meta, data, evaluation=evaluation)
    compiled = torch.compile(
        lambda m: metapl_run(net, m, data, evaluation=evaluation), fullgraph=True
    )(meta)
    assert_close(compiled.meta_grads, eager.meta_grads, rtol=1e-10, atol=1e-13)
    assert_close(compiled.state, eager.state, rtol=1e-12, atol=1e-14)


def test_score_function_compares_the_start_and_the_end_with_their_states():
    """h = outer(s_K, state_K) - outer(s_0, state_0): both with the statistics of that
    student (the outer loss in eval mode reads them)."""
    net = bn_net(7)
    x_s, y_s, x_q, y_q = task(7)
    evaluation = copy.deepcopy(net).eval()
    targets = torch.randint(0, 2, (10,))
    teacher = {"z": torch.randn(10, 2, dtype=F64)}

    def inner(s, m, state):
        out = functional_call(net, {**s, **state}, (x_s,))
        return F.cross_entropy(out, targets), state

    def outer(s, state):
        return F.cross_entropy(functional_call(evaluation, {**s, **state}, (x_q,)), y_q.argmax(-1))

    def log_prob(m):
        return F.log_softmax(m["z"], -1).gather(-1, targets[:, None]).sum()

    s0, state0 = params(net), buffers(net)
    res = metapl.meta_grad(
        inner,
        outer,
        s0,
        teacher,
        optim.sgd(0.2),
        steps=3,
        method="score_function",
        log_prob=log_prob,
        state=state0,
    )
    h = outer(res.student_params, res.state) - outer(s0, state0)
    assert res.h.item() == pytest.approx(h.item(), rel=1e-12)
    assert int(res.state["1.num_batches_tracked"]) == 3
    z = teacher["z"].clone().requires_grad_()
    (score,) = torch.autograd.grad(log_prob({"z": z}), [z])
    torch.testing.assert_close(res.meta_grads["z"], h * score, rtol=1e-12, atol=1e-14)


def test_implicit_reads_the_final_state():
    """implicit: the outer loss sees the state after the unroll (here a constant offset the
    inner loss carries forward unchanged, against a closed form)."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(20, 3, generator=gen, dtype=F64), torch.randn(20, generator=gen, dtype=F64)
    meta = {"log_lam": torch.tensor(0.2, dtype=F64)}
    offset = {"b": torch.tensor(0.7, dtype=F64)}

    def inner(s, m, state):
        return ((x @ s - y).square().mean() / 2 + m["log_lam"].exp() / 2 * s.square().sum(), state)

    def outer(s, state):
        return (x @ s + state["b"] - 1.0).square().mean()

    res = metapl.meta_grad(
        inner,
        outer,
        torch.zeros(3, dtype=F64),
        meta,
        optim.sgd(0.5),
        steps=300,
        method="implicit",
        state=offset,
    )
    m = meta["log_lam"].clone().requires_grad_()
    solution = torch.linalg.solve(x.T @ x / 20 + m.exp() * torch.eye(3, dtype=F64), x.T @ y / 20)
    (expected,) = torch.autograd.grad(outer(solution, offset), [m])
    torch.testing.assert_close(res.meta_grads["log_lam"], expected, rtol=1e-9, atol=1e-12)
    assert res.state["b"] == 0.7


def test_state_errors_name_the_fix():
    net = bn_net()
    meta, data = everywhere(net), task()
    x_s = data[0]
    with pytest.raises(ValueError, match=r"with state=, inner_loss must return \(loss, new_state"):
        metapl.meta_grad(
            lambda s, m, st: functional_call(net, {**s, **st}, (x_s,)).sum(),
            lambda s, st: s["3.bias"].sum(),
            params(net),
            {"t": meta["t"]},
            optim.sgd(0.1),
            state=buffers(net),
        )
    with pytest.raises(ValueError, match="the state inner_loss returns must have the same keys"):
        metapl.meta_grad(
            lambda s, m, st: ((s["3.bias"] * m["t"][:2]).sum(), {"x": st}),
            lambda s, st: s["3.bias"].sum(),
            params(net),
            {"t": meta["t"]},
            optim.sgd(0.1),
            state=buffers(net),
        )
    with pytest.raises(TypeError, match=r"inner_loss must take \(student, meta, state\)"):
        metapl.meta_grad(
            lambda s, m: s["3.bias"].sum(),
            lambda s, st: s["3.bias"].sum(),
            params(net),
            {"t": meta["t"]},
            optim.sgd(0.1),
            state=buffers(net),
        )
    with pytest.raises(TypeError, match=r"outer_loss must take \(student, state\) or"):
        metapl.meta_grad(
            lambda s, m, st: (s["3.bias"].sum(), st),
            lambda s: s["3.bias"].sum(),
            params(net),
            {"t": meta["t"]},
            optim.sgd(0.1),
            state=buffers(net),
        )
    with pytest.raises(ValueError, match="has_aux=True and state= do not combine"):
        metapl_run(net, meta, data, has_aux=True)
    with pytest.raises(TypeError, match="state must be a dict of tensors"):
        metapl_run(net, meta, data, state={"mean": [0.0, 1.0]})


def test_an_empty_state_is_a_stateless_module():
    net = nn.Sequential(nn.Linear(3, 2)).to(F64)
    meta = {
        "theta": params(net),
        "t": torch.zeros(10, dtype=F64),
        "log_lr": torch.tensor(-1.0, dtype=F64),
    }
    res = metapl_run(net, meta, task(), eval_outer=False)
    assert res.state == {}
    assert math.isfinite(res.outer_loss.item())
