"""ResNet-20 for CIFAR-10 (He et al. 2016, Sec. 4.2; DeepZero Sec. 6.1), staged for feature reuse.

The CIFAR variant: a 3x3 conv to 16 channels, three stages of three basic blocks
(16, 32, 64 channels; the first block of stages 2 and 3 halves the resolution), global
average pooling, a linear classifier. Shortcuts are "option A" (identity; where the shape
changes, subsample by 2 and zero-pad the new channels), so they have no parameters and the
count is 269,722 including the batch-norm affine parameters, the figure DeepZero reports.

The model is an `nn.Sequential` of named stages (stem conv, bn, relu, nine blocks, pool,
flatten, fc), so `blackbox_zo.reuse` treats it as staged out of the box: each block is
one stage, and inside a block the tracer sees every conv / norm / ReLU and the residual add.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "resnet20", "RESNET20_DEEPZERO_PARAMS"]

RESNET20_DEEPZERO_PARAMS = 269_722  # DeepZero's count for ResNet-20, norm parameters included


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = (planes - in_planes) // 2  # zero channels added on each side (planes // 4 for a doubling)

    def shortcut(self, x: Tensor) -> Tensor:
        if not self.downsample:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet20(num_classes: int = 10) -> nn.Sequential:
    """ResNet-20 (CIFAR variant) as a staged nn.Sequential; Kaiming-normal init as DeepZero's code."""
    stages: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(3, 16, 3, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(16)),
        ("relu", nn.ReLU()),
    ]
    in_planes = 16
    for i, planes in enumerate((16, 32, 64), start=1):
        blocks = []
        for j in range(3):
            stride = 2 if (j == 0 and i > 1) else 1
            blocks.append(BasicBlock(in_planes, planes, stride))
            in_planes = planes
        stages.append((f"layer{i}", nn.Sequential(*blocks)))
    stages += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(64, num_classes))]
    model = nn.Sequential(OrderedDict(stages))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model
