"""Multi-step LIF neurons with surrogate gradients.

Layout is [T, B, ...]. Dynamics per timestep t (v starts at 0):

    h_t = decay * v_{t-1} + x_t            (charge; decay = 1 - 1/tau)
    s_t = Heaviside(h_t - threshold)       (fire; backward uses a surrogate derivative)
    v_t = h_t * (1 - s_t)                  (hard reset to 0)   or   h_t - threshold * s_t  (soft)

Two implementations compute the same function:
- ``lif_loop``: a plain per-timestep loop differentiated by autograd (the reference).
- ``LIFFunction``: forward and backward written out over time, saving only the input x. Its loops come
  twice: per-timestep functional steps (``_forward_loop``, ``_backward_loop``), which ``torch.compile``
  fuses into one kernel each (``compile=True``, or inside a compiled training step), and the same
  arithmetic for eager runs (``_forward_eager``, ``_backward_eager``): in place, the surrogate over all
  timesteps at once, a few ops a timestep.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Literal

import torch
from torch import Tensor, nn

from trainer.surrogate import SURROGATES, Name, Surrogate

Reset = Literal["hard", "soft"]


class SpikeFn(torch.autograd.Function):
    """Heaviside forward, surrogate derivative backward (used by the reference loop)."""

    @staticmethod
    def forward(ctx, x: Tensor, surrogate: Surrogate) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate.grad(x), None


def _state_dtype(x: Tensor) -> torch.dtype:
    """Membrane potential and surrogate dtype: float32, or float64 for float64 inputs (the tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def lif_loop(
    x: Tensor,
    decay: float,
    threshold: float,
    reset: Reset,
    detach_reset: bool,
    surrogate: Surrogate,
) -> Tensor:
    """Reference LIF: one autograd step per timestep (membrane in float32 at least, like the fused path)."""
    v = torch.zeros_like(x[0], dtype=_state_dtype(x))
    spikes = []
    for t in range(x.shape[0]):
        h = decay * v + x[t].to(v.dtype)
        s = SpikeFn.apply(h - threshold, surrogate)
        s_reset = s.detach() if detach_reset else s
        v = h * (1 - s_reset) if reset == "hard" else h - threshold * s_reset
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype)


def _steps(x: Tensor, decay: float, threshold: float, hard: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Spikes and charges h per timestep, without autograd, in float32 at least: under bf16 autocast a
    bf16 membrane would lose the small charges that decide whether a neuron fires."""
    v = torch.zeros_like(x[0], dtype=_state_dtype(x))
    spikes, charges = [], []
    for t in range(x.shape[0]):
        h = decay * v + x[t].to(v.dtype)
        s = (h >= threshold).to(v.dtype)
        v = h * (1 - s) if hard else h - threshold * s
        spikes.append(s)
        charges.append(h)
    return spikes, charges


def _forward_loop(x: Tensor, decay: float, threshold: float, hard: bool) -> Tensor:
    return torch.stack(_steps(x, decay, threshold, hard)[0]).to(x.dtype)  # spikes are 0/1 in any dtype


def _backward_loop(
    grad_s: Tensor, x: Tensor, decay: float, threshold: float, hard: bool, detach_reset: bool, surrogate: Surrogate
) -> Tensor:
    """Gradient w.r.t. x; the charges are recomputed from x rather than saved (one write fewer)."""
    spikes, h = _steps(x, decay, threshold, hard)
    grad_x = []
    grad_v = torch.zeros_like(x[0])
    for t in range(x.shape[0] - 1, -1, -1):
        sg = surrogate.grad(h[t] - threshold)
        if hard:
            dv_dh = 1 - spikes[t] if detach_reset else 1 - spikes[t] - h[t] * sg
        else:
            dv_dh = torch.ones_like(sg) if detach_reset else 1 - threshold * sg
        grad_h = grad_s[t].to(sg.dtype) * sg + grad_v * dv_dh
        grad_x.append(grad_h)
        grad_v = grad_h * decay
    return torch.stack(grad_x[::-1]).to(x.dtype)


def _simulate(x: Tensor, decay: float, threshold: float, hard: bool, charges: bool = False
              ) -> tuple[Tensor, Tensor | None]:
    """``_steps`` for eager runs, to the bit: spikes and (with ``charges``) charges [T, ...] from four float
    ops a timestep, each writing in place. Small layers are bound by per-op overhead (CPU dispatch, GPU
    launches), and on CPU a comparison that makes bools costs 3x one that writes floats."""
    s = torch.empty_like(x, dtype=_state_dtype(x))
    h = torch.empty_like(s) if charges else None
    v = torch.zeros_like(s[0])
    for t in range(x.shape[0]):
        # decay * v_{t-1} + x_t, rounded as ``_steps`` rounds it (a fused multiply-add can flip a spike)
        ht = torch.mul(v, decay, out=v if h is None else h[t]).add_(x[t])
        torch.ge(ht, threshold, out=s[t])
        if hard:
            torch.addcmul(ht, ht, s[t], value=-1, out=v)  # h * (1 - s)
        else:
            torch.sub(ht, s[t], alpha=threshold, out=v)
    return s, h


def _forward_eager(x: Tensor, decay: float, threshold: float, hard: bool) -> Tensor:
    return _simulate(x, decay, threshold, hard)[0].to(x.dtype)


def _backward_eager(
    grad_s: Tensor, x: Tensor, decay: float, threshold: float, hard: bool, detach_reset: bool, surrogate: Surrogate
) -> Tensor:
    """``_backward_loop`` for eager runs, rounded as it rounds: the surrogate and dv/dh on the whole
    [T, ...] block at once, then the recurrence dL/dh_t = dL/ds_t * sg_t + decay * dL/dh_{t+1} * dv_t/dh_t,
    three ops a timestep."""
    s, h = _simulate(x, decay, threshold, hard, charges=True)
    sg = surrogate.grad(h - threshold)
    if hard:  # dv/dh = 1 - s, minus h * sg through the reset; written over s (and h), not needed after
        dv_dh = s.neg_().add_(1) if detach_reset else s.neg_().add_(1).sub_(h.mul_(sg))
    else:
        dv_dh = torch.ones_like(sg) if detach_reset else torch.mul(sg, -threshold).add_(1)
    grad_h = sg.mul_(grad_s)  # float32 at least, like the state
    for t in range(x.shape[0] - 2, -1, -1):  # no fused multiply-adds: they round otherwise
        grad_h[t].add_(torch.mul(grad_h[t + 1], decay, out=h[t]).mul_(dv_dh[t]))  # h[t]: a spare slot now
    return grad_h.to(x.dtype)


@cache
def _compiled(fn: Callable) -> Callable:
    """One compiled loop per process: shapes are dynamic, and the float arguments (decay, threshold,
    alpha) are symbolic in dynamo (``specialize_float=False``), so the values a search samples reuse
    the same code (tested: 10 thresholds and alphas, one forward and one backward graph)."""
    return torch.compile(fn, dynamic=True)


def _pick(loop: Callable, eager: Callable, compile_: bool) -> Callable:
    """The per-timestep loop where ``torch.compile`` traces it (it fuses the loop into one kernel; the eager
    version's writes into slices of a buffer would trace to copies of it), the eager version elsewhere."""
    if compile_:
        return _compiled(loop)
    return loop if torch.compiler.is_compiling() else eager  # is_compiling: inside model.compile's step


class LIFFunction(torch.autograd.Function):
    """LIF over all timesteps with a hand-written backward through time."""

    @staticmethod
    def forward(ctx, x, decay, threshold, reset, detach_reset, surrogate, compile_):  # type: ignore[override]
        fwd = _pick(_forward_loop, _forward_eager, compile_)
        spikes = fwd(x, decay, threshold, reset == "hard")
        ctx.save_for_backward(x)
        ctx.args = (decay, threshold, reset == "hard", detach_reset, surrogate)
        ctx.compile_ = compile_
        return spikes

    @staticmethod
    def backward(ctx, grad_s):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        bwd = _pick(_backward_loop, _backward_eager, ctx.compile_)
        return (bwd(grad_s.contiguous(), x, *ctx.args),) + (None,) * 6


class LIF(nn.Module):
    """Multi-step LIF layer. ``backend='fused'`` uses LIFFunction, ``'loop'`` the reference."""

    def __init__(
        self,
        decay: float = 0.25,
        threshold: float = 0.5,
        reset: Reset = "hard",
        detach_reset: bool = False,
        surrogate: Name = "atan",
        alpha: float = 1.0,
        backend: Literal["fused", "loop"] = "fused",
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.decay, self.threshold, self.reset = decay, threshold, reset
        self.detach_reset, self.surrogate = detach_reset, SURROGATES[surrogate](alpha)
        self.backend, self.compiled = backend, compile  # not ``self.compile``: nn.Module.compile is a method

    def forward(self, x: Tensor) -> Tensor:
        args = (self.decay, self.threshold, self.reset, self.detach_reset, self.surrogate)
        if self.backend == "loop":
            return lif_loop(x, *args)
        return LIFFunction.apply(x, *args, self.compiled)

    def charges(self, x: Tensor) -> Tensor:
        """The membrane charge h before each firing, [T, ...], without autograd: where the surrogate's
        derivative is read (``trainer.gradients``)."""
        return torch.stack(_steps(x, self.decay, self.threshold, self.reset == "hard")[1])

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay}, threshold={self.threshold}, reset={self.reset}, "
            f"surrogate={self.surrogate}, backend={self.backend}"
        )
