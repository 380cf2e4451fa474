"""Wide ResNet (Zagoruyko & Komodakis, 2016) as used by FixMatch, UDA and MPL on CIFAR / SVHN.

WRN-28-2 has 1,467,610 parameters for 10 classes: stem conv 432, groups 70,112 + 279,488 +
1,116,032, final BN 256, classifier 1,290 (see tests/data/test_models.py).

Pre-activation blocks (BN -> LeakyReLU -> conv). Where a block changes shape, the 1x1 shortcut
takes the activated input like the main branch (Zagoruyko's and MPL's official code; the
FixMatch PyTorch port instead feeds the raw input to both branches of the later groups).
"""

import einops
import torch
from torch import nn


class _WideBlock(nn.Module):
    """Pre-activation basic block: [N, cin, H, W] -> [N, cout, H/stride, W/stride]."""

    def __init__(self, cin: int, cout: int, stride: int, bn_momentum: float, slope: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(slope)
        reshape = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if reshape else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        h = self.conv2(self.act(self.bn2(h)))
        return residual + h


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 images: [N, 3, H, W] -> logits [N, num_classes].

    ``bn_momentum`` follows PyTorch (running = (1 - m) * running + m * batch), so TF's
    ``decay=0.99`` (MPL's setting) is ``bn_momentum=0.01``; FixMatch's decay 0.999 is 0.001.
    ``dropout`` is applied to the pooled features right before the classifier (MPL's
    ``dense_dropout_rate``: 0.2 for CIFAR-10 WRN-28-2). The defaults follow FixMatch; MPL's
    official code uses ``leaky_relu_slope=0.2`` and BatchNorm eps 1e-3 (PyTorch's is 1e-5).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        dropout: float = 0.0,
        bn_momentum: float = 0.01,
        leaky_relu_slope: float = 0.1,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (e.g. 28), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        groups = []
        for g in range(3):
            blocks = [
                _WideBlock(
                    widths[g] if i == 0 else widths[g + 1],
                    widths[g + 1],
                    (1 if g == 0 else 2) if i == 0 else 1,
                    bn_momentum,
                    leaky_relu_slope,
                )
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.act = nn.LeakyReLU(leaky_relu_slope)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights(leaky_relu_slope)

    def _init_weights(self, slope: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, slope, "fan_out", "leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.groups(self.stem(x))))
        h = einops.reduce(h, "n c h w -> n c", "mean")
        return self.fc(self.dropout(h))


def wide_resnet28(
    widen_factor: int = 2, num_classes: int = 10, dropout: float = 0.0, bn_momentum: float = 0.01
) -> WideResNet:
    """WRN-28-k (k=2: CIFAR-10 / SVHN in MPL; k=8: CIFAR-100)."""
    return WideResNet(28, widen_factor, num_classes, dropout, bn_momentum)
