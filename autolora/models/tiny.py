"""Small CIFAR-style ResNets for CPU tests, demos and benchmarks (one BasicBlock per stage)."""
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """Stem 3x3 conv, three stages of one BasicBlock (strides 1, 2, 2), global average pool.

    `forward` returns pooled features (the classifier adds the head); keys follow torchvision's
    naming (conv1, bn1, layer1.0.conv1, ...) so the same weight-loading code applies.
    """

    def __init__(self, widths=(16, 32, 64)):
        super().__init__()
        w0 = widths[0]
        self.conv1 = nn.Conv2d(3, w0, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        cin = w0
        for i, w in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2)))
            cin = w
        self.num_stages = len(widths)
        self.num_features = cin

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)
