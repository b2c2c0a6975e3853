"""Synaptic operations and energy: a hand count on a small net, and what the trainer records."""

import pytest
import torch
from torch import nn

from trainer.config import build
from trainer.energy import PJ_PER_AC, PJ_PER_MAC, SynapticOps, energy_uj
from trainer.fit import fit


class Tiny(nn.Module):
    """[T, B, 1, 4, 4] -> conv 3x3 (1 -> 2 channels, padding 1) -> spikes -> linear (32 -> 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 3)
        nn.init.ones_(self.conv.weight)

    def forward(self, x):
        s = (self.conv(x.flatten(0, 1)) > 0).float()
        return self.fc(s.flatten(1))


def count(model, x):
    with SynapticOps(model) as ops, torch.no_grad():
        model(x)
    return ops.summary()


def test_sops_match_a_hand_count():
    x = torch.zeros(2, 1, 1, 4, 4)  # T=2, one sample
    x[:, 0, 0, 1, 1] = 1  # an inner spike reaches 3x3 outputs in each of 2 channels: 18 ACs
    x[:, 0, 0, 0, 0] = 1  # a corner spike reaches 2x2 outputs: 8 ACs
    # conv: 2 timesteps x 26; its output spikes wherever a spike is in reach: 9 positions x 2 channels x 2
    # timesteps = 36 spikes into the linear layer, 3 synapses each: 108
    assert count(Tiny(), x) == {"sops": 52 + 108, "macs": 0, "energy": pytest.approx(160 * PJ_PER_AC * 1e-6)}


def test_real_valued_input_counts_macs_and_samples_divide():
    x = torch.full((2, 3, 1, 4, 4), 0.5)  # T=2, three samples, not spikes
    ops = count(Tiny(), x)
    # conv: 16 outputs x 2 channels x 9 weights per timestep; every output spikes, so the linear layer
    # gets 32 spikes per timestep and does 32 x 3 ACs
    assert ops["macs"] == 2 * 16 * 2 * 9 and ops["sops"] == 2 * 32 * 3
    assert ops["energy"] == pytest.approx(energy_uj(ops["sops"], ops["macs"]))
    assert energy_uj(1e6, 1e6) == pytest.approx(PJ_PER_AC + PJ_PER_MAC)


def test_more_timesteps_cost_more_at_the_same_firing_rate():
    torch.manual_seed(0)
    frames = (torch.rand(8, 16, 1, 4, 4) < 0.3).float()
    four, eight = count(Tiny(), frames[:4]), count(Tiny(), frames)
    assert frames[:4].mean().item() == pytest.approx(frames.mean().item(), abs=0.03)
    assert 1.7 < eight["energy"] / four["energy"] < 2.3


def test_fit_records_energy_per_epoch_and_on_the_test_set_only_when_asked():
    cfg = build({"data": {"limit": 64, "timesteps": 2}, "model": {"width": 4}, "optim": {"epochs": 1}})
    result = fit(cfg, test=False)
    metrics = result.history[0].metrics
    assert metrics["sops"] > 0 and metrics["macs"] > 0 and metrics["energy"] > 0  # direct encoding: a MAC stem
    assert result.test == {}
    cfg = build({**cfg.to_dict(), "data": {**cfg.data.model_dump(), "encoding": "poisson"}})
    poisson = fit(cfg)
    assert poisson.history[0].metrics["macs"] < metrics["macs"]  # spikes in: the stem accumulates
    assert {"test_acc", "test_sops", "test_energy"} <= poisson.test.keys()
