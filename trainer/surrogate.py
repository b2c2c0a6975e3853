"""Surrogate gradients: the derivative that stands in for Heaviside's (zero almost everywhere) in the
backward pass of a spiking neuron.

One object per surrogate, owning its sharpness ``alpha``; each is the derivative of a smooth step from 0
to 1 centred on the threshold, so it integrates to one. ``SURROGATES`` registers them under the config's
names (``neuron.surrogate``): a new one is a registered subclass of ``Surrogate``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from trainer.registry import Registry


class Surrogate:
    """``grad(x)``: the surrogate derivative at ``x`` = membrane charge minus threshold, a new tensor (each
    allocates one and works in place on it: a fresh [T, ...] block costs page faults on CPU)."""

    name: ClassVar[str]

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def grad(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}(alpha={self.alpha})"


SURROGATES: Registry[type[Surrogate]] = Registry("surrogate")


@SURROGATES.register("atan")
class ATan(Surrogate):
    """Derivative of 1/2 + arctan(pi/2 alpha x) / pi: peak alpha/2, heavy tails."""

    name = "atan"

    def grad(self, x: Tensor) -> Tensor:
        return (x * (math.pi / 2 * self.alpha)).square_().add_(1).reciprocal_().mul_(self.alpha / 2)


@SURROGATES.register("sigmoid")
class Sigmoid(Surrogate):
    """Derivative of sigmoid(alpha x): peak alpha/4."""

    name = "sigmoid"

    def grad(self, x: Tensor) -> Tensor:
        sg = (x * self.alpha).sigmoid_()
        return sg.addcmul_(sg, sg, value=-1).mul_(self.alpha)  # sg (1 - sg) alpha


@SURROGATES.register("rectangle")
class Rectangle(Surrogate):
    """alpha on |x| < 1 / (2 alpha), 0 elsewhere (the straight-through box)."""

    name = "rectangle"

    def grad(self, x: Tensor) -> Tensor:
        out = x.abs()
        torch.lt(out, 0.5 / self.alpha, out=out)  # float out: on CPU 3x cheaper than a bool tensor
        return out.mul_(self.alpha)


@SURROGATES.register("triangle")
class Triangle(Surrogate):
    """alpha - alpha^2 |x|, clipped at 0: peak alpha, support |x| < 1 / alpha."""

    name = "triangle"

    def grad(self, x: Tensor) -> Tensor:
        return x.abs().mul_(-self.alpha * self.alpha).add_(self.alpha).clamp_(min=0)


Name = SURROGATES.literal()  # the config's choices
