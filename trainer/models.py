"""Spiking ResNets on [T, B, C, H, W] tensors, with named block exits for shortcut heads.

Convolutions and batch norm run on the time-flattened batch [T*B, ...] (tdBN style); LIF layers
run on [T, B, ...]. Block exits are named like torchvision's modules: ``layer1.0``, ``layer1.1``...

``ARCHS`` maps the config's ``model.arch`` names to builders: ``ARCHS["resnet20"](num_classes, in_channels,
neuron)`` builds the net and ``ARCHS["resnet20"].exits`` names its block exits without building it. This
module knows nothing of the config (``trainer.config`` reads its names from here).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from trainer.registry import Registry

NeuronFactory = Callable[[], nn.Module]
Stem = Literal["cifar", "imagenet"]  # "cifar": 3x3 conv; "imagenet": 7x7/2 conv + 3x3/2 max pool


def time_distributed(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a per-image module to [T, B, ...] by folding time into the batch."""
    return module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


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
    """A spiking ResNet's shape. Calling it builds the net, so a shape is the builder ``ARCHS`` holds, and its
    block exits are known before any net is built (the config checks ``heads.exits`` against them)."""

    name: str
    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, ...]  # blocks per stage
    width: int  # channels of the first stage; stage i has width * 2**i
    stem: Stem
    fc_hidden: int | None = None  # ResNet-19 has a 256-unit spiking layer before the classifier

    @property
    def exits(self) -> list[str]:
        """``layer<stage>.<block>`` of every block, in forward order."""
        return [f"layer{i + 1}.{j}" for i, blocks in enumerate(self.layers) for j in range(blocks)]

    def __call__(self, num_classes: int, in_channels: int, neuron: NeuronFactory, width: int | None = None,
                 stem: Stem | Literal["auto"] = "auto") -> SpikingResNet:
        return SpikingResNet(self, num_classes, in_channels, neuron, width, stem)


ARCHS: Registry[ResNet] = Registry("architecture")
for _shape in (
    ResNet("resnet19", BasicBlock, (3, 3, 2), 128, "cifar", fc_hidden=256),  # Zheng et al. 2021 (tdBN)
    ResNet("resnet20", BasicBlock, (3, 3, 3), 16, "cifar"),  # He et al. 2016, for CIFAR
    ResNet("resnet18", BasicBlock, (2, 2, 2, 2), 64, "imagenet"),
    ResNet("resnet34", BasicBlock, (3, 4, 6, 3), 64, "imagenet"),
    ResNet("resnet50", Bottleneck, (3, 4, 6, 3), 64, "imagenet"),
    ResNet("resnet101", Bottleneck, (3, 4, 23, 3), 64, "imagenet"),
    ResNet("resnet152", Bottleneck, (3, 8, 36, 3), 64, "imagenet"),
):
    ARCHS.register(_shape.name)(_shape)


def block_exits(arch: str) -> list[str]:
    """Names of the block exits of ``arch`` (``layer<stage>.<block>``), without building the net."""
    return ARCHS[arch].exits


class SpikingResNet(nn.Module):
    """Spiking ResNet; ``forward`` gives logits averaged over time, ``forward_taps`` adds exit features."""

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

        self.exits: dict[str, int] = {}  # exit name -> channels
        cin = width
        self.stages = []
        for i, blocks in enumerate(spec.layers):
            stage_width = width * 2**i
            stride = 1 if i == 0 else 2
            modules = []
            for j in range(blocks):
                modules.append(spec.block(cin, stage_width, stride if j == 0 else 1, neuron))
                cin = stage_width * spec.block.expansion
                self.exits[f"layer{i + 1}.{j}"] = cin
            self.add_module(f"layer{i + 1}", nn.Sequential(*modules))
            self.stages.append(f"layer{i + 1}")

        if spec.fc_hidden:
            self.fc_hidden = nn.Linear(cin, spec.fc_hidden)
            self.fc_lif = neuron()
            cin = spec.fc_hidden
        self.fc = nn.Linear(cin, num_classes)
        self.arch = spec.name

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_taps(self, x: Tensor, taps: Collection[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits [B, classes] and the [T, B, C, H, W] outputs of the named block exits."""
        out = self.stem_lif(time_distributed(self.stem, x))
        out = time_distributed(self.stem_pool, out)
        features: dict[str, Tensor] = {}
        for stage in self.stages:
            for j, block in enumerate(getattr(self, stage)):
                out = block(out)
                name = f"{stage}.{j}"
                if name in taps:
                    features[name] = out
        out = out.mean(dim=(3, 4))  # global average pool: [T, B, C]
        if hasattr(self, "fc_hidden"):
            out = self.fc_lif(self.fc_hidden(out))
        return self.fc(out).mean(0), features

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_taps(x)[0]
