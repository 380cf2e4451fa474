import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from metapl.models import (
    GPT,
    MLP,
    ResNet50,
    WideResNet,
    build_model,
    next_byte_loss,
    resnet50,
    wide_resnet28,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def wrn_param_count(depth: int, k: int, num_classes: int) -> int:
    """Count derived by hand from the architecture (FixMatch / MPL WRN): 3x3 stem to 16
    channels; 3 groups of (depth - 4) / 6 blocks with widths 16k, 32k, 64k; a block has BN(cin),
    3x3 conv cin->cout, BN(cout), 3x3 conv cout->cout, and a 1x1 shortcut where cin != cout;
    then BN, linear with bias. Convs have no bias; BN has weight and bias."""
    n = (depth - 4) // 6
    total, cin = 3 * 16 * 9, 16
    for cout in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            c = cin if i == 0 else cout
            total += 2 * c + c * cout * 9 + 2 * cout + cout * cout * 9
            total += c * cout if c != cout else 0
        cin = cout
    return total + 2 * cin + cin * num_classes + num_classes


def test_wrn28_2_has_the_fixmatch_parameter_count():
    # 1,467,610 is the count of FixMatch's / MPL's WRN-28-2 for 10 classes ("1.47M").
    assert wrn_param_count(28, 2, 10) == 1_467_610
    assert n_params(WideResNet(28, 2, 10)) == 1_467_610
    assert n_params(wide_resnet28(8, 100)) == wrn_param_count(28, 8, 100)


def test_resnet50_fallback_has_torchvisions_parameter_count():
    assert n_params(ResNet50(1000)) == 25_557_032
    assert n_params(ResNet50(10)) == 25_557_032 - 2048 * 990 - 990


def test_resnet50_matches_torchvision_state_dict_when_available():
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except (ImportError, RuntimeError, OSError):
        pytest.skip("torchvision does not import here")
    ours = {k: v.shape for k, v in ResNet50(7).state_dict().items()}
    theirs = {k: v.shape for k, v in tv_resnet50(weights=None, num_classes=7).state_dict().items()}
    assert ours == theirs
    assert isinstance(resnet50(7), type(tv_resnet50()))


def test_resnet50_forward_shape():
    model = resnet50(10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth=27)


def test_bn_momentum_is_pytorch_convention():
    # TF decay 0.99 == PyTorch momentum 0.01: running = 0.99 * running + 0.01 * batch mean.
    model = WideResNet(10, 1, bn_momentum=0.01)
    x = torch.randn(4, 3, 8, 8)
    model.train()(x)
    bn = model.groups[0][0].bn1
    expected = 0.01 * model.stem(x).mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-7)
    assert bn.momentum == 0.01


def test_dropout_sits_before_the_classifier():
    model = WideResNet(10, 1, num_classes=3, dropout=0.3)
    assert model.dropout.p == 0.3
    assert list(model.children())[-2:] == [model.dropout, model.fc]


def test_build_model_names():
    assert n_params(build_model("wrn28-2", 10)) == 1_467_610
    assert n_params(build_model("wrn28-8", 100)) == wrn_param_count(28, 8, 100)
    assert isinstance(build_model("wrn28-2", 10, dropout=0.2).dropout, nn.Dropout)
    mlp = build_model("mlp", 2, in_features=5, hidden=(8,))
    assert mlp(torch.randn(3, 5)).shape == (3, 2)
    with pytest.raises(ValueError, match="wrn28-2"):
        build_model("wrn16-4", 10)


def test_mlp_flattens_and_maps_shapes():
    mlp = MLP(3 * 4 * 4, hidden=(16, 16), num_classes=6, dropout=0.1)
    assert mlp(torch.randn(2, 3, 4, 4)).shape == (2, 6)


SMALL_MODELS = [
    lambda: WideResNet(10, 1, num_classes=5, dropout=0.1),
    lambda: MLP(3 * 8 * 8, hidden=(16,), num_classes=5, dropout=0.1),
]


@pytest.mark.parametrize("make", SMALL_MODELS)
def test_functional_call_matches_module_and_has_second_derivatives(make):
    torch.manual_seed(0)
    model = make().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])
    torch.testing.assert_close(functional_call(model, {**params, **buffers}, x), model(x))

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, {**p, **buffers}, x), y)

    def grad_norm(p):
        return sum((g**2).sum() for g in grad(loss)(p).values())

    second = grad(grad_norm)(params)  # grad of grad, as meta-gradients need
    assert all(torch.isfinite(v).all() for v in second.values())
    assert any(v.abs().sum() > 0 for v in second.values())


@pytest.mark.parametrize("make", [*SMALL_MODELS, lambda: WideResNet(28, 2)])
def test_channels_last_matches_contiguous(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = WideResNet(10, 1, num_classes=4).train()
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().logsumexp(1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gpt_is_causal_and_counts_its_parameters():
    torch.manual_seed(0)
    model = GPT(context=8, layers=2, width=16, heads=4)
    # embedding 256x16 (shared with the output), positions 8x16; per block two LayerNorms,
    # qkv 16->48, out 16->16, MLP 16->64->16; a final LayerNorm
    block = 2 * 32 + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 64 + 64) + (64 * 16 + 16)
    assert n_params(model) == 256 * 16 + 8 * 16 + 2 * block + 32
    x = torch.randint(0, 256, (3, 8))
    logits = model(x)
    assert logits.shape == (3, 8, 256)
    changed = x.clone()
    changed[:, 5:] = (x[:, 5:] + 1) % 256  # later bytes cannot change earlier predictions
    torch.testing.assert_close(model(changed)[:, :5], logits[:, :5])
    assert not torch.allclose(model(changed)[:, 5:], logits[:, 5:])
    loss = next_byte_loss(logits, x)
    expected = torch.nn.functional.cross_entropy(logits[1, :-1], x[1, 1:])
    assert loss.shape == (3,) and torch.allclose(loss[1], expected)
    with pytest.raises(ValueError, match="exceed the context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_gpt_attention_has_forward_and_reverse_second_derivatives():
    """The math path of scaled_dot_product_attention: jvp of the gradient equals its vjp
    (the Hessian is symmetric) in float64; the fused CPU kernel has neither."""
    torch.manual_seed(0)
    model = GPT(context=8, layers=1, width=16, heads=2).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randint(0, 256, (2, 8))
    gradient = grad(lambda p: next_byte_loss(functional_call(model, p, (x,)), x).mean())
    a = {k: torch.randn_like(v) for k, v in params.items()}
    forward = torch.func.jvp(gradient, (params,), (a,))[1]
    reverse = torch.func.vjp(gradient, params)[1](a)[0]
    for k in params:
        torch.testing.assert_close(forward[k], reverse[k], rtol=1e-10, atol=1e-12)
