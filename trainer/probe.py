"""The config's model before it trains: built, run once (``trainer.taps``), its heads' exits checked, so a
model that cannot be imported, built or run, a wrong output shape or an unknown exit is one line naming the
key before a study or a training run touches anything."""

from __future__ import annotations

import json

from torch import nn

from trainer.config import Config
from trainer.data import Shape, input_shape
from trainer.errors import UserError, quote
from trainer.models import ARCHS
from trainer.taps import ModelError, Probe, Tap, UnknownExitError, listing, pick, run_probe


CONTRACT = "docs/how-to/bring-your-own-model.md"  # the builder contract, for the errors that break it


def build_backbone(cfg: Config, shape: Shape, neuron, source: str = "config") -> nn.Module:
    """``cfg.model.build``, with whatever the builder raises as one line, and the fix where it is known: a
    SpikingJelly builder called directly (it needs a neuron: ``trainer.zoo:spikingjelly`` gives one), a
    builder that does not take the contract's keywords."""
    try:
        return cfg.model.build(shape.classes, shape.channels, neuron)
    except UserError as err:
        raise ModelError(f"{source}: {err}") from None
    except Exception as err:  # noqa: BLE001
        arch = cfg.model.arch
        if arch.startswith("spikingjelly."):
            name = arch.rsplit(":", 1)[-1]
            fix = (f"; SpikingJelly's builders need a neuron and multi-step mode: use model.arch="
                   f"trainer.zoo:spikingjelly with model.kwargs={{model: {name}}}")
        elif isinstance(err, TypeError) and "unexpected keyword argument" in str(err):
            fix = (f"; a builder is called as builder(num_classes=..., in_channels=..., **model.kwargs) and "
                   f"returns a module taking [T, B, C, H, W] (see {CONTRACT})")
        else:
            fix = ""
        raise ModelError(f"{source}: bad value for 'model.arch': building {arch} raised "
                         f"{type(err).__name__}: {quote(str(err))}{fix}") from None


def default_exits(arch: str) -> list[str]:
    """A registered architecture's stage ends; an import path declares none."""
    return list(ARCHS[arch].default_exits) if arch in ARCHS else []


def exits_of(cfg: Config) -> list[str]:
    """``heads.exits`` with ``default`` replaced by the architecture's default exits."""
    out: list[str] = []
    for e in cfg.heads.exits:
        out += default_exits(cfg.model.arch) if e == "default" else [e]
    return list(dict.fromkeys(out))


def check_exits(cfg: Config, probe: Probe, source: str = "config") -> dict[str, Tap]:
    """``select`` for ``cfg.heads``; ``default`` is for the registered architectures only."""
    if "default" in cfg.heads.exits and cfg.model.arch not in ARCHS:
        raise UnknownExitError(f"{source}: bad value for 'heads.exits': 'default' is for the registered "
                               f"architectures; name the modules of {cfg.model.arch} (see: {listing(cfg.model.arch)})")
    return pick(probe, exits_of(cfg), cfg.model.arch, cfg.heads.hidden, source)


_PROBES: dict[str, Probe] = {}


def probe(cfg: Config, source: str = "config") -> Probe:
    """The dry run of ``cfg``'s model on the CPU, once per distinct model and input shape in a process,
    whichever file asks (the neuron's parameters change no shape, so a space that searches them probes each
    net once). A dry run that fails is not kept: each file's error names that file."""
    key = json.dumps({"model": cfg.model.model_dump(mode="json", exclude={"compile"}),
                      "data": cfg.data.model_dump(mode="json", include={"name", "image_size"})}, sort_keys=True)
    if key not in _PROBES:
        shape = input_shape(cfg.data)
        _PROBES[key] = run_probe(build_backbone(cfg, shape, cfg.neuron.factory(cuda=False), source), shape,
                                 cfg.model.arch, source)
    return _PROBES[key]


def check(cfg: Config, source: str = "config") -> dict[str, Tap]:
    """Fail before anything trains if ``cfg``'s model or its heads cannot work; the exits' taps."""
    return check_exits(cfg, probe(cfg, source), source)
