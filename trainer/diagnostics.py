"""Per-layer gradient statistics and firing rates: the evidence for (or against) vanishing gradients.

Both accumulate on the training device and are read once per epoch, so they add no host syncs per step.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from trainer.compat import foreach_norm
from trainer.neuron import LIF


def spiking(model: nn.Module, neurons: tuple[type, ...] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every spiking neuron layer: ours, SpikingJelly's (any ``BaseNode``, if a model uses
    them they are imported) and the classes in ``neurons`` (``model.neurons``)."""
    classes = (LIF, *neurons)
    if (sj := sys.modules.get("spikingjelly.activation_based.neuron")) is not None:
        classes += (sj.BaseNode,)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, classes)]


WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)  # the layers with synapses: gradient statistics and energy


def _layer_name(name: str) -> str:
    """``layer1.0.conv1.0`` -> ``layer1.0.conv1`` (drop the index inside conv+BN pairs)."""
    return name[:-2] if name.endswith(".0") else name


class GradStats:
    """Mean and variance of |grad| of every conv and linear layer's weight, averaged over an epoch's steps."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            (_layer_name(name), m.weight) for name, m in model.named_modules() if isinstance(m, WEIGHTED)
        ]
        self.numel = torch.tensor([float(w.numel()) for _, w in self.layers], device=self.layers[0][1].device)
        self.total: torch.Tensor | None = None
        self.steps = 0

    def update(self) -> None:
        """Two multi-tensor norms over all layers (a few kernels, not a few per layer): the mean of |g|
        is its L1 norm / n, the variance of |g| is its squared L2 norm / n minus the mean squared."""
        grads = [w.grad.detach() if w.grad is not None else torch.zeros_like(w) for _, w in self.layers]
        mean = torch.stack(foreach_norm(grads, 1)).float() / self.numel
        var = (torch.stack(foreach_norm(grads, 2)).float() ** 2 / self.numel - mean**2).clamp(min=0)
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


class GradFlow:
    """Mean and variance of |dL/dx| at the input of every spiking layer, averaged over an epoch's steps: the
    surrogate gradient that reaches each depth (a weight's gradient also scales with the layer's input,
    which is dense at the stem and says little about the signal path).

    Tensor hooks on the LIF inputs, while entered (a context manager, so a compiled step runs without
    them), add two reductions per layer and step on the device; read once per epoch. While ``part``
    names a part of the loss ("main", "heads"), the gradients computed are that part's alone (see
    ``fit``) and go to ``split`` instead of the epoch's statistics.
    """

    def __init__(self, model: nn.Module, neurons: tuple[type, ...] = ()) -> None:
        lifs = spiking(model, neurons)
        self.layers, self.modules = [name for name, _ in lifs], [m for _, m in lifs]
        self.capture = False  # keep this step's LIF inputs in ``inputs`` (for the split's autograd.grad)
        self.inputs: list[torch.Tensor] = []
        self.total: dict[str | None, torch.Tensor] = {}
        self.steps: dict[str | None, list[int]] = {}
        self.part: str | None = None
        self.handles: list = []

    def __enter__(self) -> GradFlow:
        self.handles = [m.register_forward_pre_hook(self._pre(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, index: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.requires_grad and torch.is_grad_enabled():
                if self.capture:
                    self.inputs.append(x)
                x.register_hook(lambda g: self._record(index, g))

        return hook

    def _record(self, index: int, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        stats = torch.stack([g.abs().mean(), (g * g).mean()])
        if self.part not in self.total:
            self.total[self.part] = torch.zeros(len(self.layers), 2, device=g.device)
            self.steps[self.part] = [0] * len(self.layers)
        self.total[self.part][index] += stats
        self.steps[self.part][index] += 1

    def measure_parts(self, parts: dict[str, torch.Tensor]) -> None:
        """What each part of this step's loss sends back to every spiking layer (``capture`` must have been on
        during the forward): one ``autograd.grad`` per part, keeping the graph for the training backward."""
        for self.part, loss in parts.items():
            torch.autograd.grad(loss, self.inputs, retain_graph=True, allow_unused=True)
        self.part = None
        self.inputs.clear()

    def _read(self, part: str | None) -> dict[str, dict[str, float]]:
        if part not in self.total:
            return {}
        sums, steps = self.total.pop(part).tolist(), self.steps.pop(part)
        return {name: {"mean": m / n, "var": max(sq / n - (m / n) ** 2, 0.0)}
                for name, (m, sq), n in zip(self.layers, sums, steps) if n}

    def summary(self) -> dict[str, dict[str, float]]:
        """{spiking layer: {"mean": ..., "var": ...}} of the steps since the last summary; resets."""
        return self._read(None)

    def split(self) -> dict[str, dict[str, dict[str, float]]]:
        """{part: {spiking layer: {"mean", "var"}}} of the parts recorded since the last call; resets."""
        return {part: self._read(part) for part in [p for p in self.total if p is not None]}


class FiringRates:
    """Fraction of neurons spiking per spiking layer, while attached (use as a context manager)."""

    def __init__(self, model: nn.Module, neurons: tuple[type, ...] = ()) -> None:
        self.layers = spiking(model, neurons)
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
