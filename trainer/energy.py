"""Synaptic operations and energy per sample: the inference cost SNN papers report.

A layer whose input is spikes (0/1) does one accumulate (AC) per input spike and outgoing synapse: its
synaptic operations (SOPs). A layer whose input is real-valued (the first convolution under direct
encoding, a classifier after average pooling) does one multiply-accumulate (MAC) per weight use. Both
are summed over timesteps. Energy uses the 45 nm figures most SNN papers take from Horowitz (ISSCC 2014):
0.9 pJ per AC and 4.6 pJ per MAC (32-bit float).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.diagnostics import WEIGHTED

PJ_PER_AC = 0.9
PJ_PER_MAC = 4.6


def energy_uj(sops: float, macs: float) -> float:
    """Energy in microjoules of ``sops`` accumulates and ``macs`` multiply-accumulates."""
    return (PJ_PER_AC * sops + PJ_PER_MAC * macs) * 1e-6


def _conv_ops(conv: nn.Conv1d | nn.Conv2d, x: Tensor, out: Tensor) -> tuple[Tensor, int]:
    """(ACs if ``x`` is spikes, MACs if it is real-valued) of one call: input spikes times each one's
    fan-out, counted exactly at the borders by convolving the spike counts with a kernel of ones. Leading
    dimensions fold into the batch ([T, B, C, H, W] inputs of SpikingJelly's multi-step layers)."""
    groups, dims = conv.groups, len(conv.kernel_size)
    x = x.detach().float().reshape(-1, *x.shape[-dims - 1:])
    counts = x.sum(0, keepdim=True)  # spikes per input position, over batch and time
    ones = torch.ones(groups, conv.in_channels // groups, *conv.kernel_size, device=x.device)
    conv_fn = F.conv2d if dims == 2 else F.conv1d
    reach = conv_fn(counts, ones, None, conv.stride, conv.padding, conv.dilation, groups)
    acs = reach.sum() * (conv.out_channels // groups)
    macs = out.numel() * (conv.in_channels // groups) * math.prod(conv.kernel_size)
    return acs, macs


def _linear_ops(linear: nn.Linear, x: Tensor) -> tuple[Tensor, int]:
    return x.detach().float().sum() * linear.out_features, x.numel() * linear.out_features


class SynapticOps:
    """SOPs, MACs and energy per sample of every convolution and linear layer, while attached (a context
    manager, like ``FiringRates``). Whether an input is spikes is read from its values, per call, on the
    device: no host sync per layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, WEIGHTED)]
        self.sops: Tensor | float = 0.0
        self.macs: Tensor | float = 0.0
        self.samples = 0
        self.handles: list = []

    def _count_samples(self, _module: nn.Module, inputs: tuple) -> None:
        self.samples += inputs[0].shape[1]  # the model's input is [T, B, ...]

    def _hook(self, module: nn.Module, inputs: tuple, out: Tensor) -> None:
        x = inputs[0]
        acs, macs = _linear_ops(module, x) if isinstance(module, nn.Linear) else _conv_ops(module, x, out)
        spikes = ((x == 0) | (x == 1)).all()
        self.sops = self.sops + torch.where(spikes, acs.double(), 0.0)  # float64: billions per epoch
        self.macs = self.macs + torch.where(spikes, 0.0, float(macs)).double()

    def __enter__(self) -> SynapticOps:
        self.handles = [self.model.register_forward_pre_hook(self._count_samples)]
        self.handles += [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def summary(self) -> dict[str, float]:
        """{"sops", "macs", "energy" (µJ)} per sample since the last summary; resets."""
        if not self.samples:
            return {}
        sops, macs = float(self.sops) / self.samples, float(self.macs) / self.samples
        self.sops, self.macs, self.samples = 0.0, 0.0, 0
        return {"sops": sops, "macs": macs, "energy": energy_uj(sops, macs)}
