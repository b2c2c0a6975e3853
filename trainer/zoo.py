"""SpikingJelly's model zoo as builders: ``model.arch: trainer.zoo:spikingjelly``.

SpikingJelly's builders take a neuron class, build single-step layers and expect 3-channel images; the
trainer's builder contract is ``builder(num_classes=..., in_channels=..., **kwargs)`` returning a module
that takes [T, B, C, H, W]. This adapter closes that gap and changes nothing else, so the stripped model
is SpikingJelly's own module (its ``state_dict`` loads into the same builder's model with ``strict=True``)::

    model:
      arch: trainer.zoo:spikingjelly
      kwargs: {model: sew_resnet18, cnf: ADD}          # or ms_resnet18, spiking_vgg11_bn, spikformer_cifar10,
                                                        # Spikformer (with its sizes), SpikingVGG (cfg: [...])
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from trainer.errors import UserError

ZOO = ("sew_resnet", "ms_resnet", "spiking_vgg", "spikformer", "spiking_resnet")  # modules searched by name


def _builder(name: str):
    for module in ZOO:
        zoo = importlib.import_module(f"spikingjelly.activation_based.model.{module}")
        if hasattr(zoo, name):
            return getattr(zoo, name)
    raise UserError(f"model.kwargs.model: SpikingJelly has no model {name!r} in "
                    f"spikingjelly.activation_based.model.{{{', '.join(ZOO)}}}")


def adapt_input(model: nn.Module, in_channels: int) -> None:
    """Give the first convolution ``in_channels`` inputs if it has others (timm's ``in_chans``): digits and
    MNIST have one channel, CIFAR10-DVS two, SpikingJelly's ResNets and VGGs take three."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    new = type(child)(in_channels, child.out_channels, child.kernel_size, child.stride,
                                      child.padding, child.dilation, child.groups, child.bias is not None)
                    setattr(parent, name, new)
                return


def spikingjelly(num_classes: int, in_channels: int, model: str, neuron: str = "LIFNode",
                 surrogate: str = "ATan", detach_reset: bool = True, **kwargs: Any) -> nn.Module:
    """SpikingJelly's ``model`` with ``neuron`` layers (``spikingjelly.activation_based.neuron``) of
    ``surrogate`` gradient, in multi-step mode; ``kwargs`` go to its builder (and, as SpikingJelly passes
    them on, to its neurons)."""
    from spikingjelly.activation_based import functional, neuron as neurons, surrogate as surrogates

    build = _builder(model)
    params = inspect.signature(build).parameters
    extra = {"in_channels": in_channels} if "in_channels" in params else {}
    net = build(num_classes=num_classes, spiking_neuron=getattr(neurons, neuron),
                surrogate_function=getattr(surrogates, surrogate)(), detach_reset=detach_reset, **extra, **kwargs)
    if not extra:
        adapt_input(net, in_channels)
    functional.set_step_mode(net, "m")
    return net
