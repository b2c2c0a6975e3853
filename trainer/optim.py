"""Optimizers by name (``optim.name``): each entry builds one from the net's parameters and the config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.registry import Registry

if TYPE_CHECKING:  # the config reads its optimizer names from OPTIMIZERS
    from trainer.config import OptimConfig

Factory = Callable[[Iterable[nn.Parameter], "OptimConfig"], torch.optim.Optimizer]
OPTIMIZERS: Registry[Factory] = Registry("optimizer")


@OPTIMIZERS.register()
def sgd(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register()
def adamw(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (``optim.momentum`` is not used: Adam's betas stay at PyTorch's defaults)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
