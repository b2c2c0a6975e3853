"""Balance coefficient lambda(epoch) and the shortcut loss.

lambda moves the loss weight from the shortcut heads to the main output over training:

    loss = (1 - lambda) * CE(main) + lambda * mean_k CE(head_k)

Progress p runs from 0 at the first epoch to 1 at epoch ``fraction * (epochs - 1)``, then stays 1.
The curves are a share f(p) of the way from ``start`` to ``end``, lambda = start (1 - f) + end f:

- constant:     f = 0 (``end`` is ignored)
- linear:       f = p
- cosine:       f = (1 - cos(pi * p)) / 2
- exponential:  f = (1 - exp(-rate * p)) / (1 - exp(-rate))
- step:         f = floor(p * steps) / steps   (``steps`` equal drops)

and ``table`` is lambda itself, read off ``table``'s knots spread evenly over p and linearly
interpolated: a table of per-epoch values (what population-based training found) replays exactly over
as many epochs and stretches over more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.registry import Registry

if TYPE_CHECKING:  # the config reads its schedule names from SCHEDULES
    from trainer.config import LambdaConfig


def progress(epoch: int, epochs: int, fraction: float) -> float:
    span = fraction * (epochs - 1)
    return 1.0 if span <= 0 else min(1.0, epoch / span)


Schedule = Callable[[float, "LambdaConfig"], float]  # lambda at progress p


def _curve(share: Schedule) -> Schedule:
    """A curve from ``start`` to ``end`` given its share f(p) of the way (0 at p = 0, 1 at p = 1): exactly
    ``start`` at f = 0 and ``end`` at f = 1, never a rounding error past them (-1e-17 for an end of 0)."""

    def lam(p: float, cfg: LambdaConfig) -> float:
        f = share(p, cfg)
        return cfg.start * (1 - f) + cfg.end * f

    return lam


def _table(p: float, cfg: LambdaConfig) -> float:
    """``table``'s knots at p = 0, 1/(n-1), ..., 1, linearly interpolated; exactly a knot's value on it."""
    knots = cfg.table
    x = p * (len(knots) - 1)
    if abs(x - round(x)) < 1e-9:
        return knots[round(x)]
    i = int(x)
    return knots[i] + (knots[i + 1] - knots[i]) * (x - i)


SCHEDULES: Registry[Schedule] = Registry("lambda schedule")
SCHEDULES.register("constant")(_curve(lambda p, cfg: 0.0))
SCHEDULES.register("linear")(_curve(lambda p, cfg: p))
SCHEDULES.register("cosine")(_curve(lambda p, cfg: (1 - math.cos(math.pi * p)) / 2))
SCHEDULES.register("exponential")(_curve(lambda p, cfg: (1 - math.exp(-cfg.rate * p)) / (1 - math.exp(-cfg.rate))))
SCHEDULES.register("step")(_curve(lambda p, cfg: math.floor(p * cfg.steps) / cfg.steps))
SCHEDULES.register("table")(_table)


def balance(cfg: LambdaConfig, epoch: int, epochs: int) -> float:
    """lambda for a 0-based ``epoch`` of ``epochs``."""
    return SCHEDULES[cfg.schedule](progress(epoch, epochs, cfg.fraction), cfg)


def shortcut_parts(main: Tensor, heads: list[Tensor], target: Tensor, lam: float | Tensor
                   ) -> tuple[Tensor, Tensor | None]:
    """The two parts of the shortcut loss: (1 - lam) * CE(main) and lam * mean CE(heads) (None without
    heads, when the first part is plain CE(main)).

    Computed in float32 whatever the logits' dtype. The heads share one cross-entropy over their
    concatenated logits (the mean over heads of equal batch size), so a head adds no loss kernels.
    """
    main_loss = F.cross_entropy(main.float(), target)
    if not heads:
        return main_loss, None
    head_loss = F.cross_entropy(torch.cat(heads).float(), target.repeat(len(heads)))
    return (1 - lam) * main_loss, lam * head_loss


def shortcut_loss(main: Tensor, heads: list[Tensor], target: Tensor, lam: float) -> Tensor:
    """(1 - lam) * CE(main) + lam * mean CE(heads); plain CE(main) when there are no heads."""
    main_part, head_part = shortcut_parts(main, heads, target, lam)
    return main_part if head_part is None else main_part + head_part
