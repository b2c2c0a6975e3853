"""The gradient check at initialisation (``snn-train --gradients``): the surrogate sets the regime."""

import pytest

from trainer.__main__ import main
from trainer.config import load
from trainer.gradients import EXPLODES, VANISHES, profile

SMALL = ["model.stem=cifar", "model.width=4", "heads.exits=[default]", "data.limit=32", "data.batch_size=16"]


def check(arch, surrogate):
    return profile(load(None, [*SMALL, f"model.arch={arch}", f"neuron.surrogate={surrogate}"]))


@pytest.mark.parametrize("arch,surrogate,regime", [
    ("resnet34", "rectangle", "explodes"),  # E[sg^2] ~0.35: each block multiplies the gradient up (~2e2 here)
    ("resnet18", "triangle", "balanced"),  # ~0.25 (~0.6 here)
    ("resnet18", "atan", "vanishes"),  # ~0.08: the paper's regime (~1e-3 here)
])
def test_the_verdict_follows_the_surrogate(arch, surrogate, regime):
    found = check(arch, surrogate)
    assert found.verdict().startswith(regime)
    assert (found.ratio > EXPLODES) == (regime == "explodes") and (found.ratio < VANISHES) == (regime == "vanishes")
    assert found.layers[0] == "stem_lif" and found.plain[-1] == pytest.approx(1.0)  # relative to the last layer
    assert set(found.gain) == set(found.layers)  # every LIF's E[sg^2]
    if regime == "vanishes":  # the heads send gradient where it vanished, most at the first stages
        assert found.heads[0] > 2 * found.plain[0]
        assert [e for e, _ in found.exits] == ["layer1.1", "layer2.1", "layer3.1"] and "layer1.1" in found.advice()


def test_e_sg2_orders_the_surrogates():
    gains = {s: sum(check("resnet18", s).gain.values()) / 17 for s in ("rectangle", "triangle", "atan")}
    assert gains["rectangle"] > gains["triangle"] > gains["atan"] > 0


def test_snn_train_prints_the_profile_and_list_exits_the_gradient_at_each_module(capsys):
    args = [x for item in SMALL for x in ("--set", item)] + ["--set", "neuron.surrogate=atan", "--set",
                                                             "model.arch=resnet18"]
    assert main(["--gradients", *args]) == 0
    out = capsys.readouterr().out
    assert "stem_lif" in out and "verdict: vanishes" in out and "heads help most at" in out
    assert main(["--list-exits", *args]) == 0
    out = capsys.readouterr().out
    assert "verdict: vanishes" in out and "|dL/dx|" in out
    row = next(line for line in out.splitlines() if line.startswith("layer1.1 "))
    assert row.split()[-1] == "default" and float(row.split()[-2]) < 0.1  # its relative gradient
