"""Balance coefficient lambda(epoch) and the shortcut loss.

lambda moves the loss weight from the shortcut heads to the main output over training:

    loss = (1 - lambda) * CE(main) + lambda * mean_k CE(head_k)

Progress p runs from 0 at the first epoch to 1 at epoch ``fraction * (epochs - 1)``, then stays 1.
Each schedule maps p to a value between ``start`` (p=0) and ``end`` (p=1):

- constant:     start, always (``end`` is ignored)
- linear:       start + (end - start) * p
- cosine:       end + (start - end) * (1 + cos(pi * p)) / 2
- exponential:  end + (start - end) * (exp(-rate * p) - exp(-rate)) / (1 - exp(-rate))
- step:         start + (end - start) * floor(p * steps) / steps   (``steps`` equal drops)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import LambdaConfig


def progress(epoch: int, epochs: int, fraction: float) -> float:
    span = fraction * (epochs - 1)
    return 1.0 if span <= 0 else min(1.0, epoch / span)


def balance(cfg: LambdaConfig, epoch: int, epochs: int) -> float:
    """lambda for a 0-based ``epoch`` of ``epochs``."""
    p = progress(epoch, epochs, cfg.fraction)
    start, end = cfg.start, cfg.end
    if cfg.schedule == "constant":
        return start
    if cfg.schedule == "linear":
        return start + (end - start) * p
    if cfg.schedule == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * p)) / 2
    if cfg.schedule == "exponential":
        r = cfg.rate
        return end + (start - end) * (math.exp(-r * p) - math.exp(-r)) / (1 - math.exp(-r))
    if cfg.schedule == "step":
        return start + (end - start) * math.floor(p * cfg.steps) / cfg.steps
    raise ValueError(f"unknown lambda schedule {cfg.schedule!r}")


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
