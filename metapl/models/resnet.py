"""ResNet-50 (He et al., 2016; v1.5: stride on the 3x3 conv) for ImageNet.

`resnet50` returns torchvision's model when torchvision imports and otherwise `ResNet50`, a
compact copy with the same module names, shapes and initialization, so state_dicts load into
either (25,557,032 parameters for 1000 classes).
"""

import einops
import torch
from torch import nn


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (4x width) with a projection shortcut where shapes change."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(h + residual)


class ResNet50(nn.Module):
    """Bottleneck ResNet with stages [3, 4, 6, 3]: [N, 3, H, W] -> logits [N, num_classes]."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
            stage = []
            for b in range(blocks):
                stage.append(_Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
                cin = 4 * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(einops.reduce(h, "n c h w -> n c", "mean"))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 from torchvision if it imports, else the identical `ResNet50`."""
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except (ImportError, RuntimeError, OSError):  # absent, or a build that does not match torch
        return ResNet50(num_classes)
    return tv_resnet50(weights=None, num_classes=num_classes)
