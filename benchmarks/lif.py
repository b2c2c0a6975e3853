"""LIF layer forward+backward: our fused and loop paths vs. SpikingJelly and snnTorch (when installed).

    python benchmarks/lif.py [--device cpu|cuda] [--repeats 20]

Shapes [T, 64, 64, 16, 16] for T = 4 and 8, float32. All neurons use the same dynamics
(decay 0.5 = tau 2 without input decay, threshold 1, hard reset to 0, atan surrogate alpha 2), and the
table says whether each one's spikes and input gradients equal our reference loop's (snnTorch passes no
gradient through its reset, so it is compared with ``detach_reset=True``). Ratios are against our eager
loop and SpikingJelly, measured in the same run. ``fused+compile`` is what ``neuron.compile=always`` runs.
Install the others with ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from timing import time_ms

from trainer.neuron import LIF, lif_loop

DECAY, THRESHOLD, ALPHA = 0.5, 1.0, 2.0


def ours(backend: str, compile_: bool) -> Callable:
    return LIF(DECAY, THRESHOLD, "hard", False, "atan", ALPHA, backend, compile_)


def spikingjelly() -> Callable | None:
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError:
        return None
    node = neuron.LIFNode(tau=2.0, decay_input=False, v_threshold=THRESHOLD, v_reset=0.0,
                          surrogate_function=surrogate.ATan(alpha=ALPHA), step_mode="m")

    def run(x: torch.Tensor) -> torch.Tensor:
        node.reset()
        return node(x)

    return run


def snntorch(device: torch.device) -> Callable | None:
    try:
        import snntorch as snn
        from snntorch import surrogate
    except ImportError:
        return None
    leaky = snn.Leaky(beta=DECAY, threshold=THRESHOLD, reset_mechanism="zero",
                      spike_grad=surrogate.atan(alpha=ALPHA)).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        mem = leaky.init_leaky()
        out = []
        for t in range(x.shape[0]):
            spk, mem = leaky(x[t], mem)
            out.append(spk)
        return torch.stack(out)

    return run


def timed(fn: Callable, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    def step() -> tuple[torch.Tensor, torch.Tensor]:
        x.grad = None
        s = fn(x)
        s.backward(torch.ones_like(s))
        return s, x.grad

    ms, (s, g) = time_ms(step, repeats, x.is_cuda)
    return ms, s.detach(), g.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    # name -> (callable or None, whether its reset passes no gradient)
    candidates = {
        "ours loop": (ours("loop", False), False),
        "ours fused eager": (ours("fused", False), False),
        "ours fused+compile": (ours("fused", True), False),
        "SpikingJelly LIFNode": (spikingjelly(), False),
        "snnTorch Leaky": (snntorch(device), True),
    }
    print(f"# device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| T | neuron | ms fwd+bwd | vs our loop | vs SpikingJelly | spikes equal | grads equal |")
    print("|---|---|---|---|---|---|---|")
    for T in (4, 8):
        torch.manual_seed(0)
        x = (torch.randn(T, 64, 64, 16, 16, device=device) * 1.5).requires_grad_()
        reference = {}
        for detach in (False, True):
            s = lif_loop(x, DECAY, THRESHOLD, "hard", detach, "atan", ALPHA)
            (g,) = torch.autograd.grad(s, x, torch.ones_like(s))
            reference[detach] = (s.detach(), g)
        results = {name: timed(fn, x, args.repeats) for name, (fn, _) in candidates.items() if fn}
        loop_ms = results["ours loop"][0]
        jelly_ms = results.get("SpikingJelly LIFNode", (None,))[0]
        for name, (fn, detach) in candidates.items():
            if name not in results:
                print(f"| {T} | {name} | not installed | | | | |")
                continue
            ms, s, g = results[name]
            ref_s, ref_g = reference[detach]
            vs_jelly = f"{jelly_ms / ms:.2f}x" if jelly_ms else "n/a"
            print(f"| {T} | {name} | {ms:.2f} | {loop_ms / ms:.2f}x | {vs_jelly} | {torch.equal(s, ref_s)} | "
                  f"{torch.allclose(g, ref_g, rtol=1e-4, atol=1e-6)} |", flush=True)


if __name__ == "__main__":
    main()
