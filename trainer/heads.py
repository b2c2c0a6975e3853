"""Shortcut heads: cheap classifiers on intermediate block exits, used only during training.

Each head sends the loss straight to the early layers it sits on ("Take A Shortcut Back",
Guo et al., NeurIPS 2024). ``strip`` returns the backbone alone, so inference costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from trainer.errors import UserError
from trainer.models import NeuronFactory, SpikingResNet, time_distributed


class UnknownExitError(UserError):
    """A head exit the model does not have."""


class ShortcutHead(nn.Module):
    """Global average pool + linear; with ``hidden > 0``, a 1x1 conv + BN + LIF first."""

    def __init__(self, channels: int, num_classes: int, hidden: int, neuron: NeuronFactory) -> None:
        super().__init__()
        if hidden:
            self.conv = nn.Sequential(
                nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
            )
            self.lif = neuron()
            channels = hidden
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "conv"):
            x = self.lif(time_distributed(self.conv, x))
        # Pooling over time and space before the (affine) classifier equals averaging its outputs, with
        # T times less matmul; sum then divide, as the backward of a sum is a broadcast view, while a
        # mean's backward writes a full-size gradient.
        t, _, _, h, w = x.shape
        return self.fc(x.sum(dim=(0, 3, 4)) / (t * h * w))


class ShortcutNet(nn.Module):
    """A backbone plus heads at named exits; ``forward`` returns (main logits, [head logits])."""

    def __init__(
        self,
        backbone: SpikingResNet,
        exits: Sequence[str],
        num_classes: int,
        neuron: NeuronFactory,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        unknown = [e for e in exits if e not in backbone.exits]
        if unknown:
            raise UnknownExitError(
                f"heads.exits: unknown block exit {unknown[0]!r} for {backbone.arch} "
                f"(allowed: {', '.join(backbone.exits)})"
            )
        self.backbone = backbone
        self.exits = list(dict.fromkeys(exits))
        self.heads = nn.ModuleDict(
            {
                e.replace(".", "_"): ShortcutHead(backbone.exits[e], num_classes, hidden, neuron)
                for e in self.exits
            }
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        main, features = self.backbone.forward_taps(x, self.exits)
        return main, [self.heads[e.replace(".", "_")](features[e]) for e in self.exits]

    def strip(self) -> SpikingResNet:
        """The inference model: the backbone without heads (same main outputs)."""
        return self.backbone
