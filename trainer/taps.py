"""One dry run of a model: what each module outputs, so heads can sit at any of them. No config here: a
model and the shape of its input are all it needs (``trainer.probe`` checks a config's model with it).

Any ``nn.Module`` that takes [T, B, C, H, W] and returns logits [B, classes] or [T, B, classes] can be
trained here. ``run_probe`` runs it once on a small batch of the data set's shape (T=3, B=2, so the layouts
below tell apart) and records every module's output: a head can read [T, B, C, H, W] feature maps
("image"), the same folded to [T*B, C, H, W] ("flat"), transformer tokens [T, B, N, D] ("tokens") or
vectors [T, B, D] ("vector"). ``pick`` takes the outputs heads will read.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from trainer.data import Shape
from trainer.errors import UserError, quote

T, B = 3, 2  # the dry run's timesteps and batch: distinct, so [T*B, ...] and [T, B, ...] tell apart
Layout = Literal["image", "flat", "tokens", "vector"]


class ModelError(UserError):
    """A model that cannot be built or run, or whose output is not logits."""


class UnknownExitError(UserError):
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


def listing(arch: str) -> str:
    """The command that lists ``arch``'s modules a head can read."""
    return f"python -m trainer --list-exits --set model.arch={arch}"


def pick(probe: Probe, exits: list[str], arch: str, hidden: int = 0, source: str = "config") -> dict[str, Tap]:
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
