"""LIF layer forward+backward: our fused and loop paths vs. SpikingJelly and snnTorch (when installed).

    python benchmarks/lif.py [--device cpu|cuda] [--repeats 10] [--rounds 5] [--timesteps 4 8] [--batch 64]

Shapes [T, batch, 64, 16, 16], float32. All neurons use the same dynamics
(decay 0.5 = tau 2 without input decay, threshold 1, hard reset to 0, atan surrogate alpha 2), and the
table says whether each one's spikes and input gradients equal our reference loop's (snnTorch passes no
gradient through its reset, so it is compared with ``detach_reset=True``). Ratios are against our eager
loop and SpikingJelly, measured in the same run: the neurons take turns for ``--rounds`` rounds, each
row shows its median time, and each ratio is the median over rounds of the two times within a round, so
drift in machine speed, slower than a round, cancels out. The upstream gradient is allocated once
per shape, as a real network's next layer would hand it over. ``fused+compile`` is what
``neuron.compile=always`` runs.
Install the others with ``pip install -e '.[bench]'``.

On CPU, glibc hands every tensor over 32 MB (each T=8 tensor here is 34 MB) fresh pages from the OS
and the first write to each page faults; that costs more than the T=8 LIF itself. Run with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296`` to keep freed memory in the process (what
jemalloc or tcmalloc do) and time the neurons alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
from record import Column, Table, add_json_flag, write_json
from timing import time_ms

from trainer.neuron import LIF, lif_loop
from trainer.surrogate import ATan

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


def timed(
    fn: Callable, x: torch.Tensor, grad: torch.Tensor, repeats: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    def step() -> tuple[torch.Tensor, torch.Tensor]:
        x.grad = None
        s = fn(x)
        s.backward(grad)
        return s, x.grad

    ms, (s, g) = time_ms(step, repeats, x.is_cuda)
    return ms, s.detach(), g.clone()


def speedup(rounds: list[dict[str, tuple]], baseline: str, name: str) -> float | None:
    """Median over rounds of the baseline's time / this one's in the same round; None without the baseline."""
    if baseline not in rounds[0]:
        return None
    return statistics.median(r[baseline][0] / r[name][0] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="rounds in which the neurons take turns")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=64)
    add_json_flag(parser)
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
    malloc = "freed memory kept" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "glibc default"
    threads = torch.get_num_threads()
    table = Table(f"device {device}, torch {torch.__version__}, {threads} threads, malloc: {malloc}",
                  "T", "neuron", Column("ms fwd+bwd", "{:.2f}", none="not installed"),
                  Column("vs our loop", "{:.2f}x", none="n/a"),
                  Column("vs SpikingJelly", "{:.2f}x", none="n/a"), "spikes equal", "grads equal")
    print(f"# {table.title}\n{table.header()}")
    for T in args.timesteps:
        torch.manual_seed(0)
        x = (torch.randn(T, args.batch, 64, 16, 16, device=device) * 1.5).requires_grad_()
        grad = torch.ones_like(x)
        reference = {}
        for detach in (False, True):
            s = lif_loop(x, DECAY, THRESHOLD, "hard", detach, ATan(ALPHA))
            (g,) = torch.autograd.grad(s, x, grad)
            reference[detach] = (s.detach(), g)
        installed = {name: fn for name, (fn, _) in candidates.items() if fn}
        rounds = [{name: timed(fn, x, grad, args.repeats) for name, fn in installed.items()}
                  for _ in range(args.rounds)]
        results = {name: (statistics.median(r[name][0] for r in rounds), *rounds[-1][name][1:])
                   for name in installed}
        for name, (fn, detach) in candidates.items():
            if name not in results:
                print(table.add(T, name, None))
                continue
            ms, s, g = results[name]
            ref_s, ref_g = reference[detach]
            print(table.add(T, name, ms, speedup(rounds, "ours loop", name),
                            speedup(rounds, "SpikingJelly LIFNode", name), torch.equal(s, ref_s),
                            torch.allclose(g, ref_g, rtol=1e-4, atol=1e-6)), flush=True)
    write_json(__file__, args, [table])


if __name__ == "__main__":
    main()
