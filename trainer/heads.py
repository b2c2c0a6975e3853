"""Shortcut heads: cheap classifiers on intermediate modules, used only during training.

Each head sends the loss straight to the early layers it sits on ("Take A Shortcut Back",
Guo et al., NeurIPS 2024). A head reads a module's output through a forward hook, so it can sit on any
module of any model (``trainer.probe`` says which outputs it can read); ``strip`` removes the hooks and
gives back the backbone as it was built, so inference costs nothing extra.
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.data import Shape
from trainer.models import NeuronFactory, logits, time_distributed
from trainer.taps import Tap, pick, run_probe


class ShortcutHead(nn.Module):
    """Global average pool + linear; with ``hidden > 0`` (feature maps only), a 1x1 conv + BN + LIF first."""

    def __init__(self, tap: Tap, num_classes: int, hidden: int, neuron: NeuronFactory, tokens: str = "nd") -> None:
        super().__init__()
        channels = tap.channels(tokens)
        self.pool = {"image": (0, 3, 4), "flat": (0, 3, 4), "tokens": (0, 2) if tokens == "nd" else (0, 3),
                     "vector": (0,)}[tap.layout]
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
        # Pooling over time (and space or tokens) before the (affine) classifier equals averaging its
        # outputs, with T times less matmul; sum then divide, as the backward of a sum is a broadcast view,
        # while a mean's backward writes a full-size gradient.
        count = 1
        for d in self.pool:
            count *= x.shape[d]
        return self.fc(x.sum(dim=self.pool) / count)


def head_key(exit_name: str) -> str:
    return exit_name.replace(".", "_")


class ShortcutNet(nn.Module):
    """A backbone plus heads at named modules; ``forward`` returns (main logits, [head logits])."""

    def __init__(self, backbone: nn.Module, taps: dict[str, Tap], num_classes: int, neuron: NeuronFactory,
                 hidden: int = 0, tokens: str = "nd") -> None:
        super().__init__()
        self.backbone = backbone
        self.exits = list(taps)
        self.flat = {e for e, tap in taps.items() if tap.layout == "flat"}  # [T*B, ...]: unfolded for the head
        self.heads = nn.ModuleDict({head_key(e): ShortcutHead(tap, num_classes, hidden, neuron, tokens)
                                    for e, tap in taps.items()})
        self._features: dict[str, Tensor] | None = None  # filled by the hooks during ``forward`` only
        self._hooks = [backbone.get_submodule(e).register_forward_hook(self._tap(e)) for e in self.exits]

    @classmethod
    def attach(cls, backbone: nn.Module, exits: list[str], shape: Shape, neuron: NeuronFactory, hidden: int = 0,
               arch: str = "model") -> ShortcutNet:
        """Heads at ``exits`` of ``backbone``, found by a dry run on inputs of ``shape``."""
        taps = pick(run_probe(backbone, shape, arch), exits, arch, hidden)
        return cls(backbone, taps, shape.classes, neuron, hidden)

    def _tap(self, name: str):
        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> None:
            if self._features is not None:
                self._features[name] = out
        return hook

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        self._features = {}
        try:
            main = logits(self.backbone(x))
            features = self._features
        finally:
            self._features = None
        t = x.shape[0]
        return main, [self.heads[head_key(e)](features[e].unflatten(0, (t, -1)) if e in self.flat else features[e])
                      for e in self.exits]

    def strip(self) -> nn.Module:
        """The inference model: the backbone without hooks or heads (same main outputs), as it was built."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.backbone
