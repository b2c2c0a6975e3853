import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import LambdaConfig
from trainer.schedule import balance, shortcut_loss

SCHEDULES = ["linear", "cosine", "exponential", "step"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_decays_from_start_to_end_monotonically(schedule):
    cfg = LambdaConfig(schedule=schedule, start=0.9, end=0.1)
    values = [balance(cfg, e, 11) for e in range(11)]
    assert values[0] == pytest.approx(0.9) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert len(set(values)) > 2


def test_curve_shapes_differ_at_midpoint():
    mid = {s: balance(LambdaConfig(schedule=s, start=1.0, end=0.0), 5, 11) for s in SCHEDULES}
    assert mid["linear"] == pytest.approx(0.5)
    assert mid["cosine"] == pytest.approx(0.5)
    assert mid["exponential"] == pytest.approx((math.exp(-2.5) - math.exp(-5)) / (1 - math.exp(-5)))
    assert mid["step"] == pytest.approx(1 - 1 / 3)  # floor(0.5 * 3) / 3 of the way
    quarter = balance(LambdaConfig(schedule="cosine"), 2, 9)  # p = 0.25
    assert quarter == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_fraction_reaches_end_early_and_stays():
    cfg = LambdaConfig(schedule="linear", start=1.0, end=0.2, fraction=0.5)
    values = [balance(cfg, e, 11) for e in range(11)]
    assert values[5] == pytest.approx(0.2) and values[10] == pytest.approx(0.2)
    assert values[2] == pytest.approx(1.0 - 0.8 * 2 / 5)


def test_constant_and_zero_fraction():
    assert balance(LambdaConfig(schedule="constant", start=0.3, end=0.0), 7, 10) == 0.3
    assert balance(LambdaConfig(schedule="linear", start=1.0, end=0.4, fraction=0.0), 0, 10) == 0.4
    assert balance(LambdaConfig(schedule="cosine", start=0.8), 0, 1) == 0.0  # one epoch: p = 1


def test_shortcut_loss_weights_main_and_mean_of_heads():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (8,))
    main, h1, h2 = (torch.randn(8, 5) for _ in range(3))
    expected = 0.7 * F.cross_entropy(main, y) + 0.3 * (F.cross_entropy(h1, y) + F.cross_entropy(h2, y)) / 2
    torch.testing.assert_close(shortcut_loss(main, [h1, h2], y, 0.3), expected)
    torch.testing.assert_close(shortcut_loss(main, [], y, 0.3), F.cross_entropy(main, y))
    low = shortcut_loss(main.bfloat16(), [h1.bfloat16(), h2.bfloat16()], y, 0.3)
    assert low.dtype == torch.float32


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_ends_exactly_at_end_and_the_config_lists_them_all(schedule):
    """At the end lambda is ``end`` itself: 0.925 + (0 - 0.925) * 1 left -1e-17 and a printed -0.000."""
    from typing import get_args

    from trainer.schedule import SCHEDULES as REGISTRY

    cfg = LambdaConfig(schedule=schedule, start=0.925, end=0.0, fraction=0.25, steps=3)
    assert [balance(cfg, e, 8) for e in (0, 2, 7)] == [0.925, 0.0, 0.0]
    assert set(get_args(LambdaConfig.model_fields["schedule"].annotation)) == set(REGISTRY)


def test_a_table_replays_its_values_per_epoch_and_stretches_over_more_epochs():
    """What population-based training exports: one lambda per epoch, exactly, and in a longer retraining
    the knots spread evenly (epochs 0, 2, 4, 6 of 7) with straight lines between them."""
    from trainer.config import ConfigError, build

    cfg = LambdaConfig(schedule="table", table=[0.9, 0.5, 0.5, 0.2])
    assert [balance(cfg, e, 4) for e in range(4)] == [0.9, 0.5, 0.5, 0.2]
    stretched = [balance(cfg, e, 7) for e in range(7)]
    assert stretched[::2] == [0.9, 0.5, 0.5, 0.2] and stretched == pytest.approx([0.9, 0.7, 0.5, 0.5, 0.5, 0.35, 0.2])
    assert balance(LambdaConfig(schedule="table", table=[0.3]), 5, 10) == 0.3
    half = LambdaConfig(schedule="table", table=[1.0, 0.0], fraction=0.5)  # reaches the last knot half-way
    assert [balance(half, e, 5) for e in range(5)] == [1.0, 0.5, 0.0, 0.0, 0.0]
    for bad in ({"schedule": "table"}, {"schedule": "linear", "table": [0.5]}):
        with pytest.raises(ConfigError, match="'lambda.table': the knots of lambda.schedule table, and only of it"):
            build({"lambda": bad})
    with pytest.raises(ConfigError, match="lambda.table.0"):
        build({"lambda": {"schedule": "table", "table": [1.5]}})
