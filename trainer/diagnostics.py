"""Per-layer gradient statistics and firing rates: the evidence for (or against) vanishing gradients.

Both accumulate on the training device and are read once per epoch, so they add no host syncs per step.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.neuron import LIF


def _layer_name(name: str) -> str:
    """``layer1.0.conv1.0`` -> ``layer1.0.conv1`` (drop the index inside conv+BN pairs)."""
    return name[:-2] if name.endswith(".0") else name


class GradStats:
    """Mean and variance of |grad| of every conv layer's weight, averaged over the steps of an epoch."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            (_layer_name(name), m.weight) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
        ]
        self.numel = torch.tensor([float(w.numel()) for _, w in self.layers], device=self.layers[0][1].device)
        self.total: torch.Tensor | None = None
        self.steps = 0

    def update(self) -> None:
        """Two multi-tensor norms over all layers (a few kernels, not a few per layer): the mean of |g|
        is its L1 norm / n, the variance of |g| is its squared L2 norm / n minus the mean squared."""
        grads = [w.grad.detach() if w.grad is not None else torch.zeros_like(w) for _, w in self.layers]
        mean = torch.stack(torch._foreach_norm(grads, 1)).float() / self.numel
        var = (torch.stack(torch._foreach_norm(grads, 2)).float() ** 2 / self.numel - mean**2).clamp(min=0)
        stats = torch.stack([mean, var], dim=1)
        self.total = stats if self.total is None else self.total + stats
        self.steps += 1

    def summary(self) -> dict[str, dict[str, float]]:
        """{layer: {"mean": ..., "var": ...}} for the steps since the last summary; resets."""
        if self.total is None:
            return {}
        values = (self.total / self.steps).tolist()
        self.total, self.steps = None, 0
        return {name: {"mean": m, "var": v} for (name, _), (m, v) in zip(self.layers, values)}


class FiringRates:
    """Fraction of neurons spiking per LIF layer, while attached (use as a context manager)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LIF)]
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles: list = []

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
            rate = out.detach().float().mean()
            self.sums[name] = self.sums[name] + rate if name in self.sums else rate
            self.counts[name] = self.counts.get(name, 0) + 1

        return hook

    def __enter__(self) -> FiringRates:
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def summary(self) -> dict[str, float]:
        return {name: (self.sums[name] / self.counts[name]).item() for name in self.sums}
