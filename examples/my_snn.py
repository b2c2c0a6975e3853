"""A small spiking CNN, written as a user would write one: nothing here knows about this project.

Search which of its modules carry shortcut heads, and lambda: ``python search/run.py --space
spaces/custom_model.yaml``. The trainer builds it as ``build(num_classes=..., in_channels=..., **model.kwargs)``.
"""

import torch
from torch import nn


class Spike(torch.autograd.Function):
    """Heaviside forward, a triangle surrogate backward."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v >= 0).float()

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * (1 - v.abs()).clamp(min=0)


class LIFNeuron(nn.Module):
    """Multi-step LIF on [T, B, ...]: leak, fire at threshold 1, hard reset."""

    def __init__(self, tau: float = 2.0):
        super().__init__()
        self.decay = 1 - 1 / tau

    def forward(self, x):
        v, out = torch.zeros_like(x[0]), []
        for x_t in x:
            v = self.decay * v + x_t
            s = Spike.apply(v - 1.0)
            v = v * (1 - s)
            out.append(s)
        return torch.stack(out)


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv, self.bn, self.lif = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), LIFNeuron()

    def forward(self, x):  # [T, B, C, H, W]
        t, b = x.shape[:2]
        return self.lif(self.bn(self.conv(x.flatten(0, 1))).unflatten(0, (t, b)))


class MySNN(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, width=16):
        super().__init__()
        self.block1, self.block2 = ConvBlock(in_channels, width), ConvBlock(width, width)
        self.block3, self.block4 = ConvBlock(width, 2 * width), ConvBlock(2 * width, 2 * width)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):  # [T, B, C, H, W] -> [B, classes]
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.classifier(x.mean(dim=(3, 4))).mean(0)


def build(num_classes: int, in_channels: int, width: int = 16) -> MySNN:
    return MySNN(num_classes, in_channels, width)
