"""metapl.VAT against closed forms for a linear softmax model (float64), and inside MPL."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metapl
from metapl import optim

B, D, C = 4, 6, 5


def _linear(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    return w, b, x


def _hessians(w, b, x):
    """H_i = W^T (diag(p_i) - p_i p_i^T) W [B, D, D]: the Hessian in r of KL(p(x_i) || p(x_i
    + r)) at r = 0 for logits W x + b."""
    p = torch.softmax(x @ w.T + b, -1)
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return w.T @ fisher @ w


def _kl(p_logits, q_logits):
    p = torch.softmax(p_logits, -1)
    return (p * (F.log_softmax(p_logits, -1) - F.log_softmax(q_logits, -1))).sum(-1).mean()


def test_power_iterations_find_the_top_eigenvector_of_the_kl_hessian():
    w, b, x = _linear()
    vat = metapl.VAT(epsilon=0.5, power_iterations=40)
    r = vat.perturbation(lambda x: x @ w.T + b, x, x @ w.T + b)
    assert torch.allclose(r.norm(dim=1), torch.full((B,), 0.5, dtype=torch.float64))
    for r_i, h_i in zip(r, _hessians(w, b, x), strict=True):
        top = torch.linalg.eigh(h_i).eigenvectors[:, -1]
        assert abs(torch.dot(r_i / 0.5, top)) == pytest.approx(1.0, abs=1e-8)


def test_one_power_iteration_is_one_hessian_product():
    """r = epsilon * H d / |H d| for the random unit d (to O(xi)), and the loss is the KL at x + r
    with gradients through the perturbed forward only."""
    w, b, x = _linear(1)
    vat = metapl.VAT(weight=2.0, epsilon=1.5)
    torch.manual_seed(0)
    grads, loss = torch.func.grad_and_value(
        lambda p: vat.loss(lambda x: x @ p["w"].T + p["b"], x, x @ p["w"].T + p["b"])
    )({"w": w, "b": b})
    torch.manual_seed(0)
    d = torch.randn(B, D, dtype=torch.float64)
    hd = torch.einsum("bij,bj->bi", _hessians(w, b, x), d)
    r = 1.5 * hd / hd.norm(dim=1, keepdim=True)
    p_logits = x @ w.T + b
    w_ref = w.clone().requires_grad_(True)
    b_ref = b.clone().requires_grad_(True)
    ref = _kl(p_logits, (x + r) @ w_ref.T + b_ref)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grads["w"], w_ref.grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads["b"], b_ref.grad, rtol=1e-6, atol=1e-12)


def test_mpl_adds_the_weighted_vat_loss_to_the_teachers_gradient():
    """No MPL term: the teacher's SGD step is -lr * grad(CE + weight * VAT), VAT in closed form
    on x_u; its perturbed forwards leave the teacher's BatchNorm statistics alone."""
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(D, C)).double()
    student = nn.Linear(D, C).double()
    w, b = teacher[0].weight.detach().clone(), teacher[0].bias.detach().clone()
    x_l, y_l = torch.randn(3, D, dtype=torch.float64), torch.tensor([0, 2, 4])
    x_u = torch.randn(B, D, dtype=torch.float64)
    mpl = metapl.MPL(
        teacher,
        student,
        optim.sgd(0.1),
        optim.sgd(0.1),
        meta_grad=None,
        vat=metapl.VAT(weight=0.7, epsilon=0.3),
    )
    torch.manual_seed(5)
    metrics = mpl.step(x_l, y_l, x_u)

    torch.manual_seed(5)
    d = torch.randn(B, D, dtype=torch.float64)
    hd = torch.einsum("bij,bj->bi", _hessians(w, b, x_u), d)
    r = 0.3 * hd / hd.norm(dim=1, keepdim=True)
    w_ref, b_ref = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    vat = _kl(x_u @ w.T + b, (x_u + r) @ w_ref.T + b_ref)
    loss = F.cross_entropy(x_l @ w_ref.T + b_ref, y_l) + 0.7 * vat
    loss.backward()
    assert metrics["teacher/loss_vat"] == pytest.approx(vat.item(), rel=1e-6)
    torch.testing.assert_close(
        teacher[0].weight.detach(), w - 0.1 * w_ref.grad, rtol=1e-7, atol=1e-12
    )
    torch.testing.assert_close(
        teacher[0].bias.detach(), b - 0.1 * b_ref.grad, rtol=1e-7, atol=1e-12
    )


def test_vat_forwards_do_not_touch_the_teachers_running_statistics():
    def run(vat):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, C))
        mpl = metapl.MPL(
            teacher, nn.Linear(D, C), optim.sgd(0.1), optim.sgd(0.1), meta_grad="exact", vat=vat
        )
        gen = torch.Generator().manual_seed(1)
        x_l, x_u = torch.randn(3, D, generator=gen), torch.randn(B, D, generator=gen)
        mpl.step(x_l, torch.tensor([0, 1, 2]), x_u)
        return dict(teacher.named_buffers())

    with_vat, without = run(metapl.VAT()), run(None)
    for name, buf in without.items():
        assert torch.equal(with_vat[name], buf), name


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(epsilon=0.0),
        dict(xi=-1.0),
        dict(weight=-1.0),
        dict(power_iterations=0),
        dict(power_iterations=True),
        dict(power_iterations=1.5),
    ],
)
def test_bad_vat_settings_are_errors(kwargs):
    with pytest.raises(ValueError, match="VAT needs|power_iterations"):
        metapl.VAT(**kwargs)


def test_mpl_refuses_a_vat_that_is_not_a_vat_and_vat_under_compile():
    nets = nn.Linear(2, 2), nn.Linear(2, 2), optim.sgd(0.1), optim.sgd(0.1)
    with pytest.raises(TypeError, match="metapl.VAT"):
        metapl.MPL(*nets, vat=2.0)
    with pytest.raises(ValueError, match="pass compile=False"):
        metapl.MPL(*nets, vat=metapl.VAT(), compile=True)
