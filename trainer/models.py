"""Spiking ResNets and VGGs on [T, B, C, H, W] tensors, and the model registry.

Convolutions and batch norm run on the time-flattened batch [T*B, ...] (tdBN style); LIF layers run on
[T, B, ...]. Shortcut heads tap modules by their ``named_modules()`` names (``layer1.0``, ``stage2``...).

``ARCHS`` maps the config's ``model.arch`` names to builders, registered with ``@register_model`` (timm's
shape): ``ARCHS["resnet20"](num_classes, in_channels, neuron, width=..., stem=...)`` builds the net and
``ARCHS["resnet20"].default_exits`` names the stage ends, without building it. Any other model comes in
by import path (``package.module:builder``, see ``trainer.probe``). This module knows nothing of the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from torch import Tensor, nn

from trainer.registry import Registry

NeuronFactory = Callable[[], nn.Module]
Stem = Literal["cifar", "imagenet"]  # "cifar": 3x3 conv; "imagenet": 7x7/2 conv + 3x3/2 max pool


class Builder(Protocol):
    """A registered architecture: called to build the net, and naming its default exits beforehand."""

    name: str
    default_exits: list[str]

    def __call__(self, num_classes: int, in_channels: int, neuron: NeuronFactory, width: int | None = None,
                 stem: Stem | Literal["auto"] = "auto") -> nn.Module: ...


ARCHS: Registry[Builder] = Registry("architecture")


def register_model(builder: Builder) -> Builder:
    """``@register_model`` on a builder with a ``name``: it becomes an allowed ``model.arch``."""
    return ARCHS.register(builder.name)(builder)


def time_distributed(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a per-image module to [T, B, ...] by folding time into the batch."""
    return module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def logits(out: Tensor) -> Tensor:
    """A model's output as [B, classes]: [T, B, classes] outputs are averaged over time."""
    return out.mean(0) if out.dim() == 3 else out


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, neuron: NeuronFactory) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv_bn(cin, width, 3, stride)
        self.lif1 = neuron()
        self.conv2 = conv_bn(width, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.lif2 = neuron()

    def forward(self, x: Tensor) -> Tensor:
        out = self.lif1(time_distributed(self.conv1, x))
        out = time_distributed(self.conv2, out) + time_distributed(self.shortcut, x)
        return self.lif2(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, neuron: NeuronFactory) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv_bn(cin, width, 1)
        self.lif1 = neuron()
        self.conv2 = conv_bn(width, width, 3, stride)
        self.lif2 = neuron()
        self.conv3 = conv_bn(width, cout, 1)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.lif3 = neuron()

    def forward(self, x: Tensor) -> Tensor:
        out = self.lif1(time_distributed(self.conv1, x))
        out = self.lif2(time_distributed(self.conv2, out))
        out = time_distributed(self.conv3, out) + time_distributed(self.shortcut, x)
        return self.lif3(out)


@dataclass(frozen=True)
class ResNet:
    """A spiking ResNet's shape; calling it builds the net."""

    name: str
    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, ...]  # blocks per stage
    width: int  # channels of the first stage; stage i has width * 2**i
    stem: Stem
    fc_hidden: int | None = None  # ResNet-19 has a 256-unit spiking layer before the classifier

    @property
    def default_exits(self) -> list[str]:
        """The last block of every stage but the last (which the classifier reads anyway)."""
        return [f"layer{i + 1}.{blocks - 1}" for i, blocks in enumerate(self.layers[:-1])]

    def __call__(self, num_classes: int, in_channels: int, neuron: NeuronFactory, width: int | None = None,
                 stem: Stem | Literal["auto"] = "auto") -> SpikingResNet:
        return SpikingResNet(self, num_classes, in_channels, neuron, width, stem)


class SpikingResNet(nn.Module):
    """Spiking ResNet; ``forward`` gives logits averaged over time."""

    def __init__(
        self,
        spec: ResNet,
        num_classes: int,
        in_channels: int,
        neuron: NeuronFactory,
        width: int | None = None,
        stem: Stem | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        width = width or spec.width
        stem = spec.stem if stem == "auto" else stem
        self.stem = conv_bn(in_channels, width, 3) if stem == "cifar" else conv_bn(in_channels, width, 7, 2)
        self.stem_lif = neuron()
        self.stem_pool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        cin = width
        stages = []
        for i, blocks in enumerate(spec.layers):
            stage_width = width * 2**i
            modules = []
            for j in range(blocks):
                modules.append(spec.block(cin, stage_width, (1 if i == 0 else 2) if j == 0 else 1, neuron))
                cin = stage_width * spec.block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*modules))
            stages.append(getattr(self, f"layer{i + 1}"))
        self.stages = stages
        if spec.fc_hidden:
            self.fc_hidden = nn.Linear(cin, spec.fc_hidden)
            self.fc_lif = neuron()
            cin = spec.fc_hidden
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem_lif(time_distributed(self.stem, x))
        out = time_distributed(self.stem_pool, out)
        for stage in self.stages:
            out = stage(out)
        out = out.mean(dim=(3, 4))  # global average pool: [T, B, C]
        if hasattr(self, "fc_hidden"):
            out = self.fc_lif(self.fc_hidden(out))
        return self.fc(out).mean(0)


for _shape in (
    ResNet("resnet19", BasicBlock, (3, 3, 2), 128, "cifar", fc_hidden=256),  # Zheng et al. 2021 (tdBN)
    ResNet("resnet8", BasicBlock, (1, 1, 1), 16, "cifar"),  # He et al. 2016's 6n+2 CIFAR ResNets: n=1
    ResNet("resnet20", BasicBlock, (3, 3, 3), 16, "cifar"),  # n=3
    ResNet("resnet18", BasicBlock, (2, 2, 2, 2), 64, "imagenet"),
    ResNet("resnet34", BasicBlock, (3, 4, 6, 3), 64, "imagenet"),
    ResNet("resnet50", Bottleneck, (3, 4, 6, 3), 64, "imagenet"),
    ResNet("resnet101", Bottleneck, (3, 4, 23, 3), 64, "imagenet"),
    ResNet("resnet152", Bottleneck, (3, 8, 36, 3), 64, "imagenet"),
):
    register_model(_shape)


class ConvLIF(nn.Module):
    """3x3 conv + BN over [T*B, ...], then LIF over [T, B, ...]: one VGG layer."""

    def __init__(self, cin: int, cout: int, neuron: NeuronFactory) -> None:
        super().__init__()
        self.conv = conv_bn(cin, cout, 3)
        self.lif = neuron()

    def forward(self, x: Tensor) -> Tensor:
        return self.lif(time_distributed(self.conv, x))


class TimePool(nn.Module):
    """2x2 max pooling of [T, B, C, H, W] spikes (ceil mode: a 1x1 map stays 1x1, so 8x8 digits fit)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return time_distributed(self.pool, x)


@dataclass(frozen=True)
class VGG:
    """A spiking VGG's shape, CIFAR layout (Simonyan & Zisserman 2015 with BN; the paper's VGG-16 row): five
    stages of 3x3 conv + BN + LIF layers, each ending in a 2x2 max pool, then global average pooling and one
    linear classifier. Channels scale with ``width`` (64: the original's 64-128-256-512-512)."""

    name: str
    layers: tuple[int, ...]  # conv layers per stage
    width: int = 64

    @property
    def default_exits(self) -> list[str]:
        """The end (after its pooling) of every stage but the last."""
        return [f"stage{i + 1}" for i in range(len(self.layers) - 1)]

    def __call__(self, num_classes: int, in_channels: int, neuron: NeuronFactory, width: int | None = None,
                 stem: Stem | Literal["auto"] = "auto") -> SpikingVGG:
        return SpikingVGG(self, num_classes, in_channels, neuron, width)


class SpikingVGG(nn.Module):
    """Spiking VGG; ``forward`` gives logits averaged over time. Stages are ``stage1`` ... ``stage5``."""

    def __init__(self, spec: VGG, num_classes: int, in_channels: int, neuron: NeuronFactory,
                 width: int | None = None) -> None:
        super().__init__()
        width = width or spec.width
        cin, stages = in_channels, []
        for i, n in enumerate(spec.layers):
            cout = width * min(2**i, 8)
            layers = []
            for _ in range(n):
                layers.append(ConvLIF(cin, cout, neuron))
                cin = cout
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers, TimePool()))
            stages.append(getattr(self, f"stage{i + 1}"))
        self.stages = stages
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean(dim=(3, 4))).mean(0)


for _shape in (VGG("vgg11", (1, 1, 2, 2, 2)), VGG("vgg16", (2, 2, 3, 3, 3))):
    register_model(_shape)
