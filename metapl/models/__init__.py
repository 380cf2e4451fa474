"""Models for the MPL experiments: Wide ResNets (CIFAR, SVHN), ResNet-50 (ImageNet), an MLP;
a small byte-level GPT for meta-gradients through language-model training.

All are plain `nn.Module`s without in-place updates of parameters, so they run under
`torch.func.functional_call`, in channels_last memory format and under bf16 autocast.
"""

from collections.abc import Callable, Sequence

import einops
import torch
from torch import nn

from metapl.models.gpt import GPT, next_byte_loss
from metapl.models.resnet import ResNet50, resnet50
from metapl.models.wideresnet import WideResNet, wide_resnet28

__all__ = [
    "GPT",
    "MLP",
    "ResNet50",
    "WideResNet",
    "build_model",
    "next_byte_loss",
    "resnet50",
    "wide_resnet28",
]


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden width -> Dropout -> Linear.

    [N, *features] with prod(features) == in_features -> logits [N, num_classes].
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        layers += [nn.Dropout(dropout), nn.Linear(in_features, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(einops.rearrange(x, "n ... -> n (...)"))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "wrn28-2": lambda num_classes, **kw: wide_resnet28(2, num_classes, **kw),
    "wrn28-8": lambda num_classes, **kw: wide_resnet28(8, num_classes, **kw),
    "resnet50": lambda num_classes, **kw: resnet50(num_classes, **kw),
    "mlp": lambda num_classes, **kw: MLP(num_classes=num_classes, **kw),
}


def build_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Model by name: "wrn28-2", "wrn28-8" (kw: dropout, bn_momentum), "resnet50",
    "mlp" (kw: in_features, hidden, dropout)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; pass one of {sorted(_BUILDERS)}")
    return _BUILDERS[name](num_classes, **kw)
