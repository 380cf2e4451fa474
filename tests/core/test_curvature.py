"""Forward-over-reverse curvature (``metapl.Exact(curvature="forward")``): each step's
second-order products from one jvp of the inner gradient, equal to reverse-over-reverse in
float64. The shared cases (every meta path, BatchNorm, Adam and SGD, trees, vmap, compile)
are parametrized over both curvatures in test_metagrad_general / _state / _trees and
test_compile; these are the cases only forward mode raises."""

import pytest
import torch
import torch.nn.functional as F
from reference import (
    ALL_PATHS_SIZES,
    F64,
    all_paths_data,
    assert_close,
    init_mlp,
    mlp,
    one_thread,  # noqa: F401 (autouse fixture)
    rel_err,
)
from torch import nn
from torch.func import functional_call

import metapl
from metapl import optim
from metapl.models import GPT, next_byte_loss

FORWARD = metapl.Exact(curvature="forward")


def cnn_maml(seed=0):
    """MAML with a BatchNorm CNN (5-way, 8x8 images): the start is the meta parameters, the
    running statistics are the carried state, the outer loss reads them in eval mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),  # a bias before BatchNorm has no gradient
        nn.BatchNorm2d(4, momentum=0.5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 5),
    ).to(F64)
    evaluation = nn.Sequential(*net).eval()  # shares the modules' code, in eval mode
    gen = torch.Generator().manual_seed(seed)
    x_s, x_q = torch.randn(10, 1, 8, 8, generator=gen, dtype=F64).chunk(2)
    y_s, y_q = torch.arange(5), torch.arange(5)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    state = {k: v.detach().clone() for k, v in net.named_buffers()}

    def inner(s, m, st):
        return F.cross_entropy(functional_call(net.train(), {**s, **st}, (x_s,)), y_s), st

    def outer(s, st):
        return F.cross_entropy(functional_call(evaluation, {**s, **st}, (x_q,)), y_q)

    return inner, outer, theta, state


@pytest.mark.parametrize(
    "opt", [optim.sgd(0.3, momentum=0.9), optim.adam(0.05)], ids=["sgd", "adam"]
)
@pytest.mark.parametrize("checkpoint", [None, True])
def test_batchnorm_cnn_maml(opt, checkpoint):
    inner, outer, theta, state = cnn_maml()

    def run(curvature):
        method = metapl.Exact(checkpoint=checkpoint, curvature=curvature)
        return metapl.meta_grad(
            inner, outer, lambda m: m, theta, opt, steps=4, method=method, state=state
        )

    reverse, forward = run("reverse"), run("forward")
    assert_close(forward.meta_grads, reverse.meta_grads, rtol=1e-10, atol=1e-13)
    assert_close(forward.state, reverse.state, rtol=0, atol=0)
    assert min(g.abs().max() for g in reverse.meta_grads.values()) > 1e-4


def test_a_detached_value_is_a_constant_to_both_curvatures():
    """Meta-Weight-Net: example weights from a scorer of the *detached* per-example losses.
    Forward mode, like reverse mode, takes the detached losses as constants, so the Hessian
    it differentiates is symmetric and the two agree; finite differences, which move the
    losses with the student, do not (test_metagrad_general)."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(10, n_u=12)
    theta = init_mlp(ALL_PATHS_SIZES, gen)
    scorer = {"v": torch.randn(3, generator=gen, dtype=F64), "c": torch.tensor(0.1, dtype=F64)}

    def inner(s, m):
        losses = F.cross_entropy(mlp(s, x_u), y_u, reduction="none")
        features = torch.stack([losses, losses.square(), losses.sqrt()], -1).detach()
        return (torch.sigmoid(features @ m["v"] + m["c"]) * losses).mean()

    def outer(s):
        return F.cross_entropy(mlp(s, x_l), y_l)

    def run(method):
        return metapl.meta_grad(
            inner, outer, theta, scorer, optim.adam(0.05), steps=3, method=method
        )

    reverse, forward = run("exact"), run(FORWARD)
    assert_close(forward.meta_grads, reverse.meta_grads, rtol=1e-10, atol=1e-13)
    assert rel_err(run(metapl.FiniteDifference(radius=1e-6)).meta_grads, reverse.meta_grads) > 1


DROPOUT_NET = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(F64)


def dropout_problem():
    gen = torch.Generator().manual_seed(3)
    s = {k: v.detach() for k, v in DROPOUT_NET.named_parameters()}
    m = {"z": torch.randn(12, 3, generator=gen, dtype=F64)}
    x_u, x_l = (
        torch.randn(12, 4, generator=gen, dtype=F64),
        torch.randn(6, 4, generator=gen, dtype=F64),
    )
    y_l = torch.arange(6) % 3

    def inner(s_, m_):
        logits = functional_call(DROPOUT_NET, s_, (x_u,))
        return -(torch.softmax(m_["z"], -1) * torch.log_softmax(logits, -1)).sum(-1).mean()

    def outer(s_):
        return F.cross_entropy(functional_call(DROPOUT_NET, s_, (x_l,)), y_l)

    return inner, outer, s, m


@pytest.mark.parametrize(
    "compile", [False, pytest.param(True, marks=pytest.mark.slow, id="True")]
)  # compile=True with forward curvature stays in the fast set in test_metagrad_state
def test_dropout_masks_are_replayed_for_the_products(compile):
    """The jvp of a step evaluates its inner loss again: with the step's own dropout masks,
    eager and under meta_grad(compile=True) (which replays them around the compiled graph)."""
    inner, outer, s, m = dropout_problem()
    torch._dynamo.reset()

    def run(method, seed=0, **kw):
        torch.manual_seed(seed)
        return metapl.meta_grad(
            inner, outer, s, m, optim.sgd(0.5), steps=3, method=method, **kw
        ).meta_grads

    expected = run("exact")
    got = run(metapl.Exact(checkpoint=True, curvature="forward"), compile=compile)
    assert_close(got, expected, rtol=1e-10, atol=1e-13)
    assert rel_err(run("exact", seed=1), expected) > 1e-2  # other masks: the masks matter


def test_the_transformer_inner_loop():
    """A GPT student on a mixture of two sources, the mixing logits as meta parameters."""
    torch.manual_seed(0)
    model = GPT(context=12, layers=2, width=16, heads=2).to(F64)
    student = {k: v.detach() for k, v in model.named_parameters()}
    tokens = torch.randint(0, 256, (3, 4, 12))  # K=3 steps of 4 sequences, 2 per source
    target = torch.randint(0, 256, (4, 12))

    def inner(s, m, batch):
        losses = next_byte_loss(functional_call(model, s, (batch,)), batch).view(2, 2).mean(1)
        return (torch.softmax(m["w"], 0) * losses).sum()

    def outer(s):
        return next_byte_loss(functional_call(model, s, (target,)), target).mean()

    def run(method):
        return metapl.meta_grad(
            inner,
            outer,
            student,
            {"w": torch.tensor([0.3, -0.2], dtype=F64)},
            optim.adam(1e-2),
            steps=3,
            method=method,
            inner_batches=tokens,
        )

    reverse, forward = run("exact"), run(FORWARD)
    assert_close(forward.meta_grads, reverse.meta_grads, rtol=1e-10, atol=1e-13)
    assert reverse.meta_grads["w"].abs().max() > 1e-5


@pytest.mark.parametrize(("checkpoint", "recomputed"), [(True, 3), (2, 2), (False, 0)])
def test_the_kept_steps_keep_their_gradient(checkpoint, recomputed):
    """K=4: the forward pass evaluates the inner loss 4 times, the reverse pass once per step
    for its jvp and once more for each step whose gradient was not kept."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(2)
    theta = init_mlp(ALL_PATHS_SIZES, gen)
    calls = []

    def inner(s, m):
        calls.append(None)
        return F.cross_entropy(mlp(s, x_u), y_u)

    def outer(s):
        return F.cross_entropy(mlp(s, x_l), y_l)

    method = metapl.Exact(checkpoint=checkpoint, curvature="forward")
    res = metapl.meta_grad(inner, outer, lambda m: m, theta, optim.sgd(0.3), steps=4, method=method)
    assert len(calls) == 4 + 4 + recomputed
    reverse = metapl.meta_grad(inner, outer, lambda m: m, theta, optim.sgd(0.3), steps=4)
    assert_close(res.meta_grads, reverse.meta_grads, rtol=1e-10, atol=1e-13)


def test_what_forward_mode_cannot_differentiate_is_named():
    """The fused CPU attention kernel has no forward-mode formula (nor a double backward), and
    F.mse_loss's fails inside torch 2.13 ("ZeroTensors are immutable"): one error each,
    naming the cause and curvature='reverse'."""
    q = torch.randn(1, 1, 4, 2)
    y = torch.randn(1, 1, 4, 2)

    def attention(s, m):
        x = q * s["a"] + m["b"]
        return F.scaled_dot_product_attention(x, x, x, is_causal=True).square().sum()

    def mse(s, m):
        return F.mse_loss(q * s["a"] + m["b"], y)

    for inner, cause in [
        (attention, "_scaled_dot_product_flash_attention_for_cpu"),
        (mse, "ZeroTensors are immutable"),
    ]:
        with pytest.raises(
            NotImplementedError,
            match=f"curvature='forward' could not differentiate .*{cause}.*curvature='reverse'",
        ):
            metapl.meta_grad(
                inner,
                lambda s: s["a"].square().sum(),
                {"a": torch.ones(())},
                {"b": torch.zeros(())},
                optim.sgd(0.1),
                method=FORWARD,
            )


def test_curvature_options_are_checked():
    gen, x_u, y_u, x_l, y_l = all_paths_data(2)
    theta = init_mlp(ALL_PATHS_SIZES, gen)
    args = (
        lambda s, m: F.cross_entropy(mlp(s, x_u), y_u),
        lambda s: F.cross_entropy(mlp(s, x_l), y_l),
        lambda m: m,
        theta,
        optim.sgd(0.1),
    )
    with pytest.raises(ValueError, match="curvature must be 'reverse' .* or 'forward'"):
        metapl.Exact(curvature="fwd")
    with pytest.raises(
        ValueError, match="curvature is only used by method='exact', not 'first_order'"
    ):
        metapl.meta_grad(*args, method="first_order", curvature="forward")
    with pytest.raises(ValueError, match=r"set it on the spec \(e.g. Exact\(curvature=...\)\)"):
        metapl.meta_grad(*args, method=metapl.Exact(), curvature="forward")
    by_keyword = metapl.meta_grad(*args, curvature="forward")
    assert_close(by_keyword.meta_grads, metapl.meta_grad(*args, method=FORWARD).meta_grads, 0, 0)
