"""One dry run of a model before it trains: what each module outputs, so heads can sit at any of them.

Any ``nn.Module`` that takes [T, B, C, H, W] and returns logits [B, classes] or [T, B, classes] can be
trained here. ``probe`` runs it once on a small batch of the data set's shape (T=3, B=2, so the layouts
below tell apart) and records every module's output: a head can read [T, B, C, H, W] feature maps
("image"), the same folded to [T*B, C, H, W] ("flat"), transformer tokens [T, B, N, D] ("tokens") or
vectors [T, B, D] ("vector"). ``check`` runs it for a config before a study or a training run touches
anything, so a model that cannot be imported, built or run, a wrong output shape or an unknown exit is
one line naming the key.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from trainer.config import Config, ConfigError
from trainer.data import Shape, input_shape
from trainer.errors import UserError, quote
from trainer.models import ARCHS

T, B = 3, 2  # the dry run's timesteps and batch: distinct, so [T*B, ...] and [T, B, ...] tell apart
Layout = Literal["image", "flat", "tokens", "vector"]


class ModelError(ConfigError):
    """A model that cannot be built or run, or whose output is not logits."""


class UnknownExitError(ConfigError):
    """A head exit that is not a module of the model, or whose output a head cannot read."""


@dataclass(frozen=True)
class Tap:
    """What one module gave on the dry run."""

    shape: tuple[int, ...]  # for T=3, B=2
    layout: Layout | None  # None: not a tensor a head can read
    calls: int  # per forward; a head needs a module called once

    def channels(self, tokens: str = "nd") -> int:
        """The features a head's classifier reads: C of an image, D of tokens ([T, B, N, D] with ``nd``,
        [T, B, D, N] with ``dn``) and of vectors."""
        if self.layout in ("image", "flat"):
            return self.shape[-3]
        return self.shape[-2] if self.layout == "tokens" and tokens == "dn" else self.shape[-1]


@dataclass(frozen=True)
class Probe:
    taps: dict[str, Tap]  # module name -> its output, in the order the forward first called them
    output: tuple[int, ...]


def _layout(out: object) -> tuple[tuple[int, ...], Layout | None]:
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return (), None
    shape = tuple(out.shape)
    if out.dim() == 5 and shape[:2] == (T, B):
        return shape, "image"
    if out.dim() == 4 and shape[0] == T * B:
        return shape, "flat"
    if out.dim() == 4 and shape[:2] == (T, B):
        return shape, "tokens"
    if out.dim() == 3 and shape[:2] == (T, B):
        return shape, "vector"
    return shape, None


def stateful(model: nn.Module) -> list[nn.Module]:
    """The modules with a ``reset()``: SpikingJelly's neurons (``functional.reset_net``'s convention) keep
    their membrane between calls, and each batch must start from rest. Ours keep none."""
    return [m for m in model.modules() if callable(getattr(m, "reset", None))]


def reset_states(modules: list[nn.Module]) -> None:
    for m in modules:
        m.reset()


@torch.no_grad()
def run_probe(model: nn.Module, shape: Shape, arch: str, source: str = "config") -> Probe:
    """Run ``model`` once (eval mode, its own generator: training's draws are untouched) and record."""
    seen: dict[str, list] = {}

    def hook(name: str):
        def record(_module: nn.Module, _args: tuple, out: object) -> None:
            if name in seen:
                seen[name][1] += 1
            else:
                seen[name] = [_layout(out), 1]
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.rand(T, B, shape.channels, *shape.size, generator=torch.Generator().manual_seed(0)).to(device)
    model.eval()
    memory = stateful(model)
    reset_states(memory)
    try:
        out = model(x)
    except Exception as err:  # noqa: BLE001 - whatever the user's forward raises is one line
        raise ModelError(f"{source}: bad value for 'model.arch': {arch} failed on a [T={T}, B={B}, "
                         f"{shape.channels}, {shape.size[0]}, {shape.size[1]}] input "
                         f"({type(err).__name__}: {quote(str(err))})") from None
    finally:
        for h in handles:
            h.remove()
        reset_states(memory)
        model.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) not in ((B, shape.classes), (T, B, shape.classes)):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(f"{source}: bad value for 'model.arch': {arch} returned {got} for a [T={T}, B={B}, ...] "
                         f"input; a model returns logits [B, classes] or [T, B, classes] (classes = "
                         f"{shape.classes})")
    return Probe({name: Tap(*layout, calls) for name, (layout, calls) in seen.items()}, tuple(out.shape))


def build_backbone(cfg: Config, shape: Shape, neuron, source: str = "config") -> nn.Module:
    """``cfg.model.build``, with whatever the builder raises as one line."""
    try:
        return cfg.model.build(shape.classes, shape.channels, neuron)
    except UserError as err:
        raise ModelError(f"{source}: {err}") from None
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{source}: bad value for 'model.arch': building {cfg.model.arch} raised "
                         f"{type(err).__name__}: {quote(str(err))}") from None


def default_exits(arch: str) -> list[str]:
    """A registered architecture's stage ends; an import path declares none."""
    return list(ARCHS[arch].default_exits) if arch in ARCHS else []


def listing(arch: str) -> str:
    """The command that lists ``arch``'s modules a head can read."""
    return f"python -m trainer --list-exits --set model.arch={arch}"


def exits_of(cfg: Config) -> list[str]:
    """``heads.exits`` with ``default`` replaced by the architecture's default exits."""
    out: list[str] = []
    for e in cfg.heads.exits:
        out += default_exits(cfg.model.arch) if e == "default" else [e]
    return list(dict.fromkeys(out))


def select(probe: Probe, exits: list[str], arch: str, hidden: int = 0, source: str = "config") -> dict[str, Tap]:
    """The taps of ``exits``; an exit that is not there, or that a head cannot read, is one line with the
    closest names and the command that lists them all."""
    chosen = {}
    for e in exits:
        tap = probe.taps.get(e)
        if tap is None:
            close = difflib.get_close_matches(e, probe.taps, n=4, cutoff=0.5)
            raise UnknownExitError(f"{source}: bad value for 'heads.exits': {arch} has no module {e!r} "
                                   f"(closest: {', '.join(close) or 'none'}; all of them: {listing(arch)})")
        if tap.layout is None or tap.calls != 1:
            why = f"is called {tap.calls} times per forward" if tap.calls != 1 else f"outputs {tap.shape or 'no tensor'}"
            raise UnknownExitError(f"{source}: bad value for 'heads.exits': module {e!r} of {arch} {why}; a head "
                                   f"reads one [T, B, C, H, W], [T*B, C, H, W], [T, B, N, D] or [T, B, D] output "
                                   f"per forward (see: {listing(arch)})")
        if hidden and tap.layout not in ("image", "flat"):
            raise UnknownExitError(f"{source}: bad value for 'heads.hidden': a hidden layer needs feature maps, "
                                   f"and {e!r} gives {tap.layout} {tap.shape}; set heads.hidden=0")
        chosen[e] = tap
    return chosen


def check_exits(cfg: Config, probe: Probe, source: str = "config") -> dict[str, Tap]:
    """``select`` for ``cfg.heads``; ``default`` is for the registered architectures only."""
    if "default" in cfg.heads.exits and cfg.model.arch not in ARCHS:
        raise UnknownExitError(f"{source}: bad value for 'heads.exits': 'default' is for the registered "
                               f"architectures; name the modules of {cfg.model.arch} (see: {listing(cfg.model.arch)})")
    return select(probe, exits_of(cfg), cfg.model.arch, cfg.heads.hidden, source)


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
