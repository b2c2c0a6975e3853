"""The gradient at initialisation: does it explode, balance or vanish toward the input, and where would
shortcut heads help? ``snn-train --gradients``.

One batch of the training data goes through the net as built (its seed, train mode) twice: once for the
main output's cross-entropy alone, once for the loss the config trains with (its heads, lambda at epoch
0). At the input of every spiking layer, input side first, it records mean |dL/dx| relative to the last
spiking layer's without heads (both losses weigh one cross-entropy in all: (1 - lambda) + lambda). It also records each neuron's
E[sg^2], the mean squared surrogate derivative over the membrane values of the batch. Through a residual
block the gradient is roughly multiplied by 1 + c E[sg^2] (c from the block's weights), so a surrogate
whose E[sg^2] is large (the rectangle of height 1: ~0.33) compounds into a gradient that grows toward the
input of a deep net, and one whose E[sg^2] is small (atan of alpha 1: ~0.08) into one that vanishes: the
regime shortcut heads were made for (docs/benchmarks/depth.md).

The verdict reads the first layer's relative gradient without heads: above ``EXPLODES`` it explodes,
below ``VANISHES`` it vanishes, otherwise it is balanced. Heads help most at the exits where the relative
gradient has fallen lowest.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trainer.config import Config
from trainer.data import encode
from trainer.diagnostics import GradFlow, spiking
from trainer.errors import UserError
from trainer.neuron import LIF
from trainer.probe import default_exits, exits_of
from trainer.taps import reset_states
from trainer.schedule import balance

EXPLODES, VANISHES = 10.0, 0.1  # the first spiking layer's |dL/dx| over the last one's, without heads


@dataclass
class Profile:
    """The gradient at each spiking layer's input relative to the last one's, without and with heads."""

    arch: str
    layers: list[str]
    plain: list[float]  # no heads
    heads: list[float] = field(default_factory=list)  # with the config's heads (empty without)
    gain: dict[str, float] = field(default_factory=dict)  # E[sg^2] per neuron module it can read
    exits: list[tuple[str, float]] = field(default_factory=list)  # candidate exits, lowest gradient first

    @property
    def ratio(self) -> float:
        """The first spiking layer's |dL/dx| over the last one's, without heads."""
        return self.plain[0]

    def verdict(self) -> str:
        if self.ratio > EXPLODES:
            regime = "explodes"
        elif self.ratio < VANISHES:
            regime = "vanishes"
        else:
            regime = "balanced"
        return (f"{regime}: the first spiking layer gets {self.ratio:.2g}x the last one's gradient without heads "
                f"(explodes above {EXPLODES:g}, vanishes below {VANISHES:g})")

    def at(self, module: str) -> float | None:
        """The lowest relative gradient without heads among the spiking layers in ``module`` (or it itself)."""
        inside = [g for n, g in zip(self.layers, self.plain) if n == module or n.startswith(module + ".")]
        return min(inside) if inside else None

    def advice(self) -> str:
        """The exits where the gradient has fallen below the last layer's, lowest first: where heads help."""
        fallen = [(e, g) for e, g in self.exits if g < 1]
        if not fallen:
            return "heads help most where the gradient has fallen: nowhere here (no exit gets less than the last layer)"
        return "heads help most at (lowest relative gradient first): " + ", ".join(f"{e} ({g:.2g})" for e, g in fallen[:4])

    def table(self) -> str:
        width = max(len(n) for n in self.layers)
        lines = [f"# {self.arch}: mean |dL/dx| at each spiking layer's input relative to the last one's without "
                 f"heads, one batch at initialisation; E[sg^2]: mean squared surrogate derivative",
                 f"{'layer':<{width}}  {'no heads':>9}  {'with heads':>10}  {'E[sg^2]':>7}"]
        for i, name in enumerate(self.layers):
            heads = f"{self.heads[i]:>10.3g}" if self.heads else f"{'':>10}"
            gain = f"{self.gain[name]:>7.3f}" if name in self.gain else f"{'':>7}"
            lines.append(f"{name:<{width}}  {self.plain[i]:>9.3g}  {heads}  {gain}")
        return "\n".join([*lines, f"verdict: {self.verdict()}", self.advice()])

    def to_dict(self) -> dict:
        return {"arch": self.arch, "layers": self.layers, "plain": self.plain, "heads": self.heads,
                "gain": self.gain, "exits": self.exits, "verdict": self.verdict(), "advice": self.advice()}


class Gains:
    """E[sg^2] of each neuron module over the membrane values of the forward passes while entered: ours
    (the LIF's charges, recomputed from its input) and SpikingJelly's (its surrogate module's input)."""

    def __init__(self, neurons: list[tuple[str, nn.Module]]) -> None:
        self.neurons, self.sums, self.handles = neurons, {}, []

    def __enter__(self) -> Gains:
        for name, m in self.neurons:
            if isinstance(m, LIF):
                self.handles.append(m.register_forward_pre_hook(self._ours(name)))
            elif isinstance(getattr(m, "surrogate_function", None), nn.Module):
                self.handles.append(m.surrogate_function.register_forward_pre_hook(self._theirs(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _add(self, name: str, sg: Tensor) -> None:
        total, count = self.sums.get(name, (0.0, 0))
        self.sums[name] = (total + sg.float().square().sum().item(), count + sg.numel())

    def _ours(self, name: str):
        def hook(m: LIF, args: tuple) -> None:
            with torch.no_grad():
                self._add(name, m.surrogate.grad(m.charges(args[0].detach()) - m.threshold))
        return hook

    def _theirs(self, name: str):
        def hook(surrogate: nn.Module, args: tuple) -> None:
            with torch.enable_grad():  # the surrogate's own backward, elementwise: d spike / d (v - threshold)
                x = args[0].detach().requires_grad_()
                (sg,) = torch.autograd.grad(surrogate(x).sum(), x)
            self._add(name, sg)
        return hook

    def summary(self) -> dict[str, float]:
        return {name: total / count for name, (total, count) in self.sums.items() if count}


def _means(flow: dict[str, dict[str, float]], layers: list[str]) -> list[float]:
    return [flow.get(name, {}).get("mean", 0.0) for name in layers]


def profile(cfg: Config, candidates: list[str] | None = None) -> Profile:
    """The gradient check of ``cfg`` (its data, model, neuron and heads), on its device; ``candidates``: the
    exits to rank (default: the config's, else the architecture's default exits)."""
    from trainer.fit import Training, step_loss

    training = Training.set_up(cfg.model_copy(update={"run": cfg.run.model_copy(update={"out_dir": None})}))
    net, device = training.net, training.device
    neurons = spiking(training.backbone, training.neurons)
    layers = [name for name, _ in neurons]
    if not layers:
        raise UserError(f"{cfg.model.arch} has no spiking layer this project knows: name its neuron classes in "
                        f"model.neurons (e.g. --set model.neurons=[package.module:MyNeuron])")
    x, y = next(iter(training.data.train))
    inputs = encode(x.to(device), cfg.data.timesteps, cfg.data.encoding)
    y = y.to(device)
    lam = torch.tensor(balance(cfg.lambda_, 0, cfg.optim.epochs) if cfg.heads.exits else 0.0, device=device)
    flow, gains = GradFlow(training.backbone, training.neurons), Gains(neurons)
    net.train()
    results = []
    for heads in (False, True) if net.exits else (False,):
        net.zero_grad(set_to_none=True)
        reset_states(training.memory)
        with flow, gains if not heads else nullcontext():
            _, loss, _, _ = step_loss(net, inputs, y, lam, heads)
            loss.backward()
        results.append(_means(flow.summary(), layers))
    last = results[0][-1] or math.nan  # both losses weigh one cross-entropy in all: one unit for both
    plain, *with_heads = [[m / last for m in means] for means in results]
    candidates = candidates or exits_of(cfg) or default_exits(cfg.model.arch)
    found = Profile(cfg.model.arch, layers, plain, with_heads[0] if with_heads else [], gains.summary())
    last = layers[-1]  # a head after the last spiking layer, or around it, sends nothing the main loss does not
    found.exits = sorted(((e, g) for e in candidates if (g := found.at(e)) is not None
                          and not (last == e or last.startswith(e + "."))), key=lambda item: item[1])
    return found
