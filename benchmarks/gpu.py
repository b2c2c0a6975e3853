"""The GPU checks in one process: every CUDA figure the docs claim, measured again within 8 minutes.

    python benchmarks/gpu.py [--budget-s 480] [--device auto] [--commit HASH] [--json PATH]
    python benchmarks/gpu.py --smoke [--json PATH]   every stage at a tiny size on the CPU (the tests run it)
    make gpu-check                                   the first, then docs/benchmarks/gpu.md regenerated

A GPU is lent for minutes at a time, so the checks are one prepared command. The stages run most
important first, each within its own bound (an alarm stops it there; one left with no time is skipped)
and in a try: a failing stage is recorded with its one-line error, and the run goes on. A line is printed
per stage and per table row as it is measured, and the JSON is rewritten after every stage, so a run that
dies keeps what it measured: ``benchmarks/results/<date>-<gpu name>.json`` (``-cpu`` without a GPU,
``gpu-smoke.json`` with ``--smoke``) holds record.py's fields, the commit and each stage's status,
seconds and tables or reason. ``python docs/gen_reference.py`` makes ``docs/benchmarks/gpu.md`` from the
newest GPU one.

- epoch (240 s): the first epoch of the CIFAR-10 ResNet-19 recipe (configs/cifar10_resnet19.yaml: T=4,
  batch 128, bf16 autocast, its heads and lambda, run.grad_stats as it has it) through
  ``trainer.fit.fit``, stopped after that epoch (with ``optim.epochs=1`` lambda would be its end, 0, and
  the heads would not run), on 50,000 images written in CIFAR-10's file format (random pixels), loaded
  and augmented on the device; no test pass. Eager (``model.compile=never``), compiled (``always``, what
  ``auto`` does on CUDA) and compiled with CUDA graphs (``torch.compile(mode="reduce-overhead")`` put in
  place of ``trainer.fit.compiled_step``, as the trainer has no setting for the mode: a candidate for
  ``auto``). A fit on a few batches first compiles every batch shape; the figure is the next fit's
  training pass. Baseline: eager in the same run (the README's ~16 s an epoch: H100, 2026-11-22).
- heads (40 s): training-step time of the recipe's net with its heads against without, at batch 64 and
  128: ``heads_overhead.py``'s eager steps (bf16, channels_last, compiled LIF), paired rounds and op
  counts. Baseline: the plain net in the same rounds (README: +13% at batch 64, 2026-11-22).
- lif (25 s): LIF forward+backward at T=4 and T=8 with ``lif.py``'s shapes and dynamics: ours, and
  SpikingJelly's LIFNode on its torch, cupy and triton backends where they import (else a row with the
  reason). Baselines: our loop and SpikingJelly's torch backend, in the same rounds.
- memory (30 s): peak allocated memory of ResNet-19 training steps at T=2, 4, 8 (``train_memory.py``'s
  measure; on a CPU, the peak RSS of a subprocess per T). Baseline: T=2.
- resume (60 s): the recipe, 3 epochs, in a subprocess SIGKILLed right after epoch 2's checkpoint, then
  resumed (``run.resume=true``) in another, against an unbroken 3-epoch run; deterministic algorithms
  on, eager (``model.compile`` and ``neuron.compile`` never: the state restored is the same, and a
  compile per process would take the bound). Per-epoch train losses, their max relative difference,
  bit for bit or not, and the tolerance. Baseline: the unbroken run.
- workers (85 s): a short CIFAR-shaped study (``search/run.py``, the recipe as ``--base``,
  ``data.limit``, 1 epoch a trial, eager for the same reason) with ``--workers 2`` on one device.
  Baseline: one worker, trials per hour.

``--smoke`` runs the same code at a tiny size on the CPU (40 images, width 4, T=2, batch 8, a few steps;
``run.grad_stats=false``, so that its few steps are compiled ones; compiled with dynamo's eager backend,
as inductor's cold compile takes minutes on a CPU), each stage within 3x its bound (the bounds share the
GPU's budget; a loaded 2-core CPU starts a process in seconds). What needs CUDA (CUDA graphs, the cupy and
triton backends) says so in its row instead of a figure.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import re
import runpy
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a GPU machine may run this from a copy that is not pip-installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from data_loading import write_cifar  # noqa: E402
from heads_overhead import make_step, ops_per_step  # noqa: E402
from lif import ALPHA, THRESHOLD, ours, speedup, timed  # noqa: E402
from record import Column, Table, add_json_flag, write_json  # noqa: E402
from timing import time_ms  # noqa: E402
from train_memory import measure  # noqa: E402

import trainer.fit  # noqa: E402
from trainer.checkpoint import load_history  # noqa: E402
from trainer.config import Config, load  # noqa: E402
from trainer.data import Shape, split_indices  # noqa: E402
from trainer.fit import SPLIT_STEPS, EpochReport, fit, resolve_device, step_loss  # noqa: E402
from trainer.heads import ShortcutNet  # noqa: E402
from trainer.neuron import lif_loop  # noqa: E402
from trainer.surrogate import ATan  # noqa: E402

R = TypeVar("R")
RECIPE = ROOT / "configs" / "cifar10_resnet19.yaml"
DECAY = 0.5  # lif.py's dynamics: tau 2 without input decay
EAGER = ("model.compile=never", "neuron.compile=never")  # where a compile per process would take the bound
RESUME_TOLERANCE = {"cpu": 0.0, "cuda": 2e-2}
RESUME_TOLERANCE_WHY = ("CPU: bit for bit. CUDA: bit for bit expected (deterministic algorithms); else 2e-2 "
                        "relative, tests/test_fit.py's bound for whole runs that differ by rounding alone: "
                        "bf16 rounds to 8 bits, but a flipped rounding moves one step, not the mean")
# torchvision's CIFAR reader, in this process and (as sitecustomize on PYTHONPATH) in its subprocesses
TRUST_CIFAR = '''"""Written by benchmarks/gpu.py: CIFAR files with random pixels cannot match the md5 sums
of the official ones, so torchvision checks that each file is there, as in tests/test_data.py."""
import os
from torchvision.datasets import cifar
cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
'''


@dataclass(frozen=True)
class Sizes:
    """What each stage trains and times: a GPU run's, or the smoke run's tiny ones."""

    images: int  # CIFAR training images written (and 10 test images)
    overrides: tuple[str, ...]  # on the recipe, for every stage that trains it
    heads_batches: tuple[int, ...]
    heads_size: int  # input side
    rounds: int  # paired rounds (heads, lif)
    repeats: int  # timed calls per round
    warmup: int  # untimed calls before them
    lif_timesteps: tuple[int, ...]
    lif_shape: tuple[int, ...]  # batch, channels, height, width
    memory: tuple[str, int, int]  # arch, input side, batch
    resume_limit: int  # data.limit of the resume stage's runs
    trials: int  # at most, per study of the workers stage
    trial_limit: int  # data.limit of a trial


GPU = Sizes(images=50_000, overrides=(), heads_batches=(64, 128), heads_size=32, rounds=6, repeats=5,
            warmup=3, lif_timesteps=(4, 8), lif_shape=(64, 64, 16, 16), memory=("resnet19", 32, 128),
            resume_limit=1280, trials=4, trial_limit=1280)
SMOKE = Sizes(images=40, overrides=("model.width=4", "data.timesteps=2", "data.batch_size=8",
                                    "run.grad_stats=false"),
              heads_batches=(2, 4), heads_size=16, rounds=2, repeats=1, warmup=1, lif_timesteps=(2, 4),
              lif_shape=(2, 4, 8, 8), memory=("resnet20", 8, 4), resume_limit=16, trials=1, trial_limit=16)


@dataclass
class Run:
    """One run of the checks: where it trains, at which sizes, in which folder; the stage under way's bound
    and tables."""

    device: torch.device
    smoke: bool
    tmp: Path
    bound_s: float = 0.0
    tables: list[Table] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sizes(self) -> Sizes:
        return SMOKE if self.smoke else GPU

    @property
    def cifar(self) -> Path:
        return self.tmp / "cifar"

    def overrides(self) -> list[str]:
        return [f"data.root={self.cifar}", f"run.device={self.device}", *self.sizes.overrides]

    def recipe(self, *extra: str) -> Config:
        return load(RECIPE, self.overrides() + list(extra))

    def table(self, title: str, *columns: Column | str) -> Table:
        """A table of the stage under way, its header printed: its rows print as they are measured."""
        table = Table(title, *columns)
        self.tables.append(table)
        print(f"# {table.title}\n{table.header()}", flush=True)
        return table

    def env(self, cifar: bool = True) -> dict[str, str]:
        """Subprocesses import the project from here and, with ``cifar``, read the written CIFAR files."""
        paths = [str(self.tmp / "hook") if cifar else "", str(ROOT), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


class OutOfTime(BaseException):
    """A stage ran past its bound: raised from SIGALRM, and a BaseException, so that no ``except Exception``
    of a library under way swallows it."""


@contextmanager
def bounded(seconds: float) -> Iterator[None]:
    def stop(signum: int, frame: object) -> None:
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(err: BaseException) -> str:
    """An error as one line that fits a table cell."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}".replace("|", "/")


def attempt(fn: Callable[[], R]) -> tuple[R | None, str]:
    """``fn``'s value and no note, or None and its one-line error: one failing row does not end its stage."""
    try:
        return fn(), ""
    except Exception as err:  # noqa: BLE001 - recorded in the row
        return None, one_line(err)


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1][:200].replace("|", "/")


def finished(proc: subprocess.Popen) -> str:
    """The output of a subprocess that must exit 0; else an error with its last line of stderr."""
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{Path(proc.args[1]).name} exited {proc.returncode}: {last_line(err)}")
    return out


# ---------------------------------------------------------------- epoch

@contextmanager
def compiled_as(**options: Any) -> Iterator[None]:
    """``trainer.fit`` compiles its step with these ``torch.compile`` options, within this block."""
    step = torch.compile(step_loss, dynamic=False, **options)
    real = trainer.fit.compiled_step
    trainer.fit.compiled_step = lambda device_type: step
    try:
        yield
    finally:
        trainer.fit.compiled_step = real


def epoch_stage(run: Run) -> None:
    from trainer.compat import dynamo_counters

    counters = dynamo_counters()  # here: importing dynamo takes a second the children need not

    cfg = run.recipe()
    n_val, n_train = (len(i) for i in split_indices(run.sizes.images, (cfg.data.val_fraction,)))
    batch = cfg.data.batch_size
    # the warm-up takes every shape of the timed epoch: full batches past the eager first ones (gradient
    # flow needs hooks), then the ragged last one
    warm = batch * ((SPLIT_STEPS if cfg.run.grad_stats else 0) + 1) + n_train % batch
    compiled = ({"backend": "eager"}, "smoke: dynamo's eager backend") if run.smoke else (None, "")
    # (row, model.compile, torch.compile options in place of the trainer's, note)
    variants = [("eager", "never", None, ""), ("compiled", "always", *compiled),
                ("compiled + CUDA graphs", "always", {"mode": "reduce-overhead"}, "candidate for auto")]
    width = f" width {cfg.model.width}" if cfg.model.width else ""
    table = run.table(f"{cfg.model.arch}{width}, T={cfg.data.timesteps}, batch {batch}, epoch 1 of "
                      f"{cfg.optim.epochs}, {n_train:,} training + {n_val:,} validation images (CIFAR-10 "
                      f"files, random pixels), {'bf16 autocast' if run.cuda else 'fp32'}, "
                      f"run.grad_stats={cfg.run.grad_stats}, {run.device}",
                      "step", Column("train s/epoch", "{:.2f}", "n/a"), Column("images/s", "{:,.0f}"),
                      Column("vs eager", "{:.2f}x"), Column("warm-up fit s", "{:.1f}"),
                      Column("timed fit s", "{:.1f}"), "compiles in the timed fit", "note")
    eager_s = None
    try:
        for name, mode, options, note in variants:
            if "CUDA" in name and not run.cuda:
                print(table.add(name, None, None, None, None, None, None, "needs CUDA"), flush=True)
                continue
            torch.compiler.reset()  # each variant compiles afresh
            skips = counters["inductor"]["cudagraph_skips"]
            with compiled_as(**options) if options else nullcontext():
                result, error = attempt(lambda: timed_epoch(run, mode, warm))
            if result is None:
                print(table.add(name, None, None, None, None, None, None, error), flush=True)
                continue
            seconds, warm_s, fit_s, graphs = result
            eager_s = seconds if name == "eager" else eager_s
            if skipped := counters["inductor"]["cudagraph_skips"] - skips:
                note += f"; CUDA graphs skipped {skipped} times"
            print(table.add(name, seconds, n_train / seconds, eager_s / seconds if eager_s else None, warm_s,
                            fit_s, graphs, note), flush=True)
    finally:
        torch.compiler.reset()  # the later stages start without these graphs and their CUDA graph memory


def timed_epoch(run: Run, mode: str, warm: int) -> tuple[float, float, float, int]:
    """(training pass s, warm-up fit s, timed fit s, graphs compiled in the timed fit) of the recipe's first
    epoch (the callback stops each fit there)."""
    from trainer.compat import dynamo_counters

    counters = dynamo_counters()

    first = lambda report: True  # noqa: E731
    t0 = time.perf_counter()
    fit(run.recipe(f"model.compile={mode}", f"data.limit={warm}"), first, test=False)
    t1 = time.perf_counter()
    graphs = counters["stats"]["unique_graphs"]
    result = fit(run.recipe(f"model.compile={mode}"), first, test=False)
    return (result.history[0].metrics["epoch_time"], t1 - t0, time.perf_counter() - t1,
            counters["stats"]["unique_graphs"] - graphs)


# ---------------------------------------------------------------- heads

def heads_stage(run: Run) -> None:
    cfg, sizes = run.recipe(), run.sizes
    neuron = cfg.neuron.factory(run.cuda)
    torch.manual_seed(0)
    backbone = cfg.model.build(10, 3, neuron)
    shape = Shape(3, (sizes.heads_size, sizes.heads_size), 10)
    nets = [ShortcutNet.attach(backbone, exits, shape, neuron, cfg.heads.hidden, cfg.model.arch).to(run.device)
            for exits in ([], cfg.heads.exits)]
    if run.cuda:
        nets = [net.to(memory_format=torch.channels_last) for net in nets]
    table = run.table(f"{cfg.model.arch}, heads at {', '.join(cfg.heads.exits)} (hidden {cfg.heads.hidden}), "
                      f"T={cfg.data.timesteps}, {sizes.heads_size}x{sizes.heads_size}, {run.device}, "
                      f"{'bf16 autocast, channels_last, compiled LIF' if run.cuda else 'fp32, eager LIF'}, "
                      f"{sizes.rounds} paired rounds",
                      "batch", Column("ms/step plain", "{:.1f}"), Column("ms/step heads", "{:.1f}"),
                      Column("overhead", "{:+.1%}"), Column("ops/step plain", none="n/a"),
                      Column("heads' ops", "+{}", "n/a"), "note")
    for batch in sizes.heads_batches:
        x = torch.rand(cfg.data.timesteps, batch, 3, sizes.heads_size, sizes.heads_size, device=run.device)
        y = torch.randint(0, 10, (batch,), device=run.device)
        steps = [make_step(net, x, y, run.cuda and cfg.optim.amp) for net in nets]
        rounds = []
        for i in range(sizes.rounds):  # who goes first alternates
            ms = {j: time_ms(steps[j], sizes.repeats, run.cuda, sizes.warmup)[0]
                  for j in ((0, 1) if i % 2 == 0 else (1, 0))}
            rounds.append((ms[0], ms[1]))
        times = [statistics.median(r[i] for r in rounds) for i in range(2)]
        overhead = statistics.median(heads / plain for plain, heads in rounds) - 1
        # counted after the timing: a compiled LIF traced anew under the counting mode cannot sway it
        ops, error = attempt(lambda: [ops_per_step(step) for step in steps])
        print(table.add(batch, *times, overhead, *((ops[0], ops[1] - ops[0]) if ops else (None, None)),
                        f"op count: {error}" if error else ""), flush=True)


# ---------------------------------------------------------------- lif

def jelly(backend: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """SpikingJelly's multi-step LIFNode on ``backend`` with lif.py's dynamics, or why it cannot run here."""
    if backend != "torch" and device.type != "cuda":
        return "needs CUDA"
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError:
        return "spikingjelly not installed"
    if backend != "torch" and importlib.util.find_spec(backend) is None:
        return f"{backend} not installed"
    node = neuron.LIFNode(tau=1 / (1 - DECAY), decay_input=False, v_threshold=THRESHOLD, v_reset=0.0,
                          surrogate_function=surrogate.ATan(alpha=ALPHA), step_mode="m", backend=backend)
    node = node.to(device)

    def step(x: torch.Tensor) -> torch.Tensor:
        node.reset()
        return node(x)

    return step


def lif_stage(run: Run) -> None:
    sizes = run.sizes
    compiled = ours("fused", True) if run.cuda else "CUDA only here: compiling takes minutes on a CPU"
    candidates = {"ours loop": ours("loop", False), "ours fused eager": ours("fused", False),
                  "ours fused+compile": compiled}
    for backend in ("torch", "cupy", "triton"):
        fn, error = attempt(lambda backend=backend: jelly(backend, run.device))
        candidates[f"SpikingJelly {backend}"] = fn or error
    base = "SpikingJelly torch"
    table = run.table(f"LIF [T, {', '.join(map(str, sizes.lif_shape))}] float32, {run.device}, torch "
                      f"{torch.__version__}, {sizes.rounds} rounds",
                      "T", "neuron", Column("ms fwd+bwd", "{:.2f}", "n/a"),
                      Column("vs our loop", "{:.2f}x", "n/a"), Column(f"vs {base}", "{:.2f}x", "n/a"),
                      "spikes equal", "grads equal", "note")
    for steps in sizes.lif_timesteps:
        torch.manual_seed(0)
        x = (torch.randn(steps, *sizes.lif_shape, device=run.device) * 1.5).requires_grad_()
        grad = torch.ones_like(x)
        ref = lif_loop(x, DECAY, THRESHOLD, "hard", False, ATan(ALPHA))
        (ref_g,) = torch.autograd.grad(ref, x, grad)
        ref_s = ref.detach()
        notes = {name: fn for name, fn in candidates.items() if isinstance(fn, str)}
        runnable = {}
        for name, fn in candidates.items():
            if name not in notes:  # a first call compiles, and shows whether it runs at all
                ok, notes[name] = attempt(lambda fn=fn: timed(fn, x, grad, 1))
                if ok is not None:
                    runnable[name] = fn
        rounds = [{name: timed(fn, x, grad, sizes.repeats) for name, fn in runnable.items()}
                  for _ in range(sizes.rounds)]
        for name in candidates:
            if name not in runnable:
                print(table.add(steps, name, None, None, None, None, None, notes[name]), flush=True)
                continue
            _, s, g = rounds[-1][name]
            print(table.add(steps, name, statistics.median(r[name][0] for r in rounds),
                            speedup(rounds, "ours loop", name), speedup(rounds, base, name),
                            torch.equal(s, ref_s), torch.allclose(g, ref_g, rtol=1e-4, atol=1e-6), ""),
                  flush=True)


# ---------------------------------------------------------------- memory

def memory_stage(run: Run) -> None:
    arch, size, batch = run.sizes.memory
    what = "peak allocated" if run.cuda else "peak RSS of a subprocess per T, torch included"
    table = run.table(f"{arch}, {size}x{size}, batch {batch}, heads at stage ends, fp32, {run.device} "
                      f"({what})",
                      "T", Column("peak memory (MiB)", "{:.0f}"), Column("vs T=2", "{:.2f}x"),
                      Column("ms/step (incl. warm-up)", "{:.0f}"))
    if run.cuda:
        rows = []
        for steps in (2, 4, 8):
            gc.collect()
            torch.cuda.empty_cache()
            rows.append(measure(arch, size, batch, steps, str(run.device)))
    else:  # this process's peak RSS would be every earlier stage's: a process per T, all at once
        script = str(ROOT / "benchmarks" / "train_memory.py")
        procs = [subprocess.Popen([sys.executable, script, "--one", str(steps), "--arch", arch, "--size",
                                   str(size), "--batch", str(batch), "--device", "cpu"], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run.env(cifar=False))
                 for steps in (2, 4, 8)]
        try:
            rows = [json.loads(finished(proc).strip().splitlines()[-1]) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
    for row in rows:
        print(table.add(row["T"], row["peak_mib"], row["peak_mib"] / rows[0]["peak_mib"], row["ms_per_step"]),
              flush=True)


# ---------------------------------------------------------------- resume

def resume_stage(run: Run) -> None:
    base = run.recipe("optim.epochs=3", f"data.limit={run.sizes.resume_limit}", *EAGER)
    folder = run.tmp / "resume"
    folder.mkdir()
    configs = {}
    for name, extra in (("unbroken", {}), ("broken", {}), ("resumed", {"resume": True})):
        out_dir = folder / ("unbroken" if name == "unbroken" else "broken")  # resumed: the broken run's
        cfg = base.model_copy(update={"run": base.run.model_copy(update={"out_dir": str(out_dir), **extra})})
        configs[name] = folder / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg.to_dict()))

    env = {**run.env(), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS

    def child(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--fit", str(configs[name]), *extra], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    procs = {"unbroken": child("unbroken"), "broken": child("broken", "--die-after", "2")}  # share nothing
    try:
        unbroken = losses(finished(procs["unbroken"]))
        _, err = procs["broken"].communicate()
        kept = load_history(folder / "broken")
        if procs["broken"].returncode != -signal.SIGKILL or len(kept) != 2:
            raise RuntimeError(f"the run to kill exited {procs['broken'].returncode} with {len(kept)} epochs "
                               f"checkpointed: {last_line(err)}")
        procs["resumed"] = child("resumed")
        resumed = losses(finished(procs["resumed"]))
    finally:
        for proc in procs.values():
            proc.kill()
    rel = [abs(a - b) / abs(a) for a, b in zip(unbroken, resumed)]
    table = run.table(f"{base.model.arch}, T={base.data.timesteps}, {base.data.limit} images an epoch, 3 "
                      f"epochs, {'bf16 autocast' if run.cuda else 'fp32'}, {run.device}; the broken run "
                      f"SIGKILLed after epoch 2's checkpoint", "epoch", "broken run",
                      Column("unbroken train loss", "{!r}"),
                      Column("broken run's train loss", "{!r}"), Column("rel. diff", "{:.1e}"), "bit for bit")
    for epoch, (a, b) in enumerate(zip(unbroken, resumed)):
        print(table.add(epoch + 1, "before the kill" if epoch < 2 else "resumed", a, b, rel[epoch], a == b),
              flush=True)
    tolerance = RESUME_TOLERANCE[run.device.type]
    summary = run.table("the resumed run against the unbroken one", Column("max rel. diff", "{:.1e}"),
                        Column("before the kill (two processes, same work)", "{:.1e}"), "bit for bit",
                        Column("tolerance", "{:g}"), "within", "why this tolerance")
    print(summary.add(max(rel), max(rel[:2]), unbroken == resumed, tolerance, max(rel) <= tolerance,
                      RESUME_TOLERANCE_WHY), flush=True)


def losses(out: str) -> list[float]:
    """The per-epoch train losses a ``fit_child`` printed last (JSON floats read back exactly)."""
    return json.loads(out.strip().splitlines()[-1])


def fit_child(config: Path, die_after: int | None) -> None:
    """The resume stage's subprocess: train ``config`` and print its per-epoch train losses; with
    ``die_after``, SIGKILL itself once that many epochs are checkpointed."""
    torch.use_deterministic_algorithms(True, warn_only=True)

    def die(report: EpochReport) -> None:
        if report.epoch + 1 == die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    result = fit(load(config), die, test=False)
    print(json.dumps([r.metrics["train_loss"] for r in result.history]))


# ---------------------------------------------------------------- workers

def workers_stage(run: Run) -> None:
    import optuna

    sizes, folder = run.sizes, run.tmp / "workers"
    folder.mkdir()
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump({
        "study": {"name": "gpu_check", "metric": "val_acc", "sampler": "random", "pruner": "none",
                  "n_trials": sizes.trials, "seed": 0, "control": 0},
        "space": {"lambda.start": {"type": "float", "low": 0.1, "high": 1.0}}}))
    overrides = [*run.overrides(), f"data.limit={sizes.trial_limit}", "optim.epochs=1", *EAGER]
    table = run.table(f"a study of at most {sizes.trials} trials: the recipe with "
                      f"{', '.join(overrides[2:])}, on {run.device}", "workers", "trials",
                      Column("wall s", "{:.1f}"), Column("trials/hour", "{:.0f}"),
                      Column("trials/hour, first start to last end", "{:.0f}"),
                      Column("vs 1 worker", "{:.2f}x"), "note")
    share = (run.bound_s - 10) / 2  # each study's; the rest is for stopping the last one's workers
    rates: dict[int, float] = {}
    for workers in (1, 2):
        url, name = f"sqlite:///{folder / f'w{workers}.db'}", f"gpu_check_w{workers}"
        cmd = [sys.executable, str(ROOT / "search" / "run.py"), "--space", str(space), "--base", str(RECIPE),
               "--storage", url, "--study-name", name, "--study-dir", str(folder / name),
               "--n-trials", str(sizes.trials), "--timeout", f"{share / 2:.0f}", "--workers", str(workers),
               "--devices", str(run.device), *(a for o in overrides for a in ("--set", o))]
        log = folder / f"{name}.log"  # a file, not a pipe: no worker blocks on a full one while it is stopped
        note = ""
        t0 = time.perf_counter()
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=run.env())
            try:
                proc.wait(timeout=share)
            except subprocess.TimeoutExpired:
                note = "stopped at its share of the bound"
            finally:
                stop(proc)
        wall = time.perf_counter() - t0
        if proc.returncode and not note:
            raise RuntimeError(f"search/run.py --workers {workers} exited {proc.returncode}: "
                               f"{last_line(log.read_text())}")
        study = optuna.load_study(study_name=name, storage=url)
        done = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
        span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
                ).total_seconds() if done else 0.0
        rates[workers] = len(done) / wall * 3600
        print(table.add(workers, len(done), wall, rates[workers], len(done) / span * 3600 if span else None,
                        rates[workers] / rates[1] if rates[1] else None, note), flush=True)


def stop(proc: subprocess.Popen) -> None:
    """End a study's process: SIGINT stops its workers too (they queue their trials and exit), else KILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the run

@dataclass(frozen=True)
class Stage:
    name: str
    bound_s: float
    measures: str
    run: Callable[[Run], None]


STAGES = [
    Stage("epoch", 240, "a CIFAR-10 ResNet-19 T=4 training epoch: eager, compiled, compiled with CUDA graphs",
          epoch_stage),
    Stage("heads", 40, "training-step overhead of the recipe's heads at batch 64 and 128", heads_stage),
    Stage("lif", 25, "LIF forward+backward at T=4 and 8: ours against SpikingJelly's torch, cupy, triton",
          lif_stage),
    Stage("memory", 30, "peak memory of training steps at T=2, 4, 8", memory_stage),
    Stage("resume", 60, "killed after epoch 2 and resumed, against an unbroken 3-epoch run", resume_stage),
    Stage("workers", 85, "trials per hour of a short study, 2 workers on one device against 1",
          workers_stage),
]
MIN_STAGE_S = 5  # a stage left less than this is skipped
SMOKE_SLACK = 3  # --smoke: bounds are the GPU budget's, and a loaded 2-core CPU starts its processes slowly


def run_stage(stage: Stage, run: Run, left: float) -> dict[str, Any]:
    """The stage within min(its bound, what is left of the budget): status, seconds, tables or reason."""
    if left < MIN_STAGE_S:
        print(f"== {stage.name}: skipped, no time left", flush=True)
        return {"status": "skipped", "seconds": 0.0, "bound_s": 0.0, "reason": "no time left", "tables": []}
    run.bound_s, run.tables = min(stage.bound_s * (SMOKE_SLACK if run.smoke else 1), left), []
    print(f"== {stage.name} (up to {run.bound_s:.0f} s): {stage.measures}", flush=True)
    t0 = time.perf_counter()
    status, reason = "ok", None
    try:
        with bounded(run.bound_s):
            stage.run(run)
    except OutOfTime:
        status, reason = "failed", f"stopped at its {run.bound_s:.0f} s bound"
    except Exception as err:  # noqa: BLE001 - recorded, and the run goes on
        status, reason = "failed", one_line(err)
    seconds = time.perf_counter() - t0
    print(f"== {stage.name}: {status} in {seconds:.0f} s" + (f": {reason}" if reason else ""), flush=True)
    return {"status": status, "seconds": seconds, "bound_s": run.bound_s, "reason": reason,
            "tables": run.tables}


def commit() -> str | None:
    """The checked-out commit, ``-dirty`` when tracked files differ from it; None outside a git clone."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True,
                               check=False).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def stem(run: Run) -> str:
    """``<date>-<gpu name>``, ``<date>-cpu``, or ``gpu-smoke``: no smoke run is ever taken for a GPU one."""
    if run.smoke:
        return "gpu-smoke"
    name = torch.cuda.get_device_name(run.device) if run.cuda else "cpu"
    return f"{datetime.date.today().isoformat()}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"


def save(args: argparse.Namespace, run: Run, stages: dict[str, dict[str, Any]]) -> Path:
    """The record so far: record.py's JSON of every stage's tables, with the commit and the stages (their
    tables as indices into it)."""
    path = write_json(__file__, args, [t for s in stages.values() for t in s["tables"]], stem(run))
    record = json.loads(path.read_text())
    record["commit"], record["stages"], i = args.commit, {}, 0
    for name, s in stages.items():
        record["stages"][name] = {**s, "tables": list(range(i, i + len(s["tables"])))}
        i += len(s["tables"])
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every stage at a tiny size on the CPU")
    parser.add_argument("--budget-s", type=float, default=480, help="seconds for all the stages together")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (--smoke: cpu)")
    parser.add_argument("--commit", help="recorded with the results (default: git's HEAD in a clone)")
    hidden = {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS}  # the resume stage's children
    parser.add_argument("--fit", type=Path, **hidden)
    parser.add_argument("--die-after", type=int, **hidden)
    add_json_flag(parser)
    args = parser.parse_args()
    if "fit" in args:
        fit_child(args.fit, getattr(args, "die_after", None))
        return
    start = time.perf_counter()
    args.commit = args.commit or commit()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        run = Run(resolve_device("cpu" if args.smoke else args.device), args.smoke, Path(tmp))
        hook = run.tmp / "hook" / "sitecustomize.py"
        hook.parent.mkdir()
        hook.write_text(TRUST_CIFAR)
        runpy.run_path(str(hook))
        run.cifar.mkdir()
        write_cifar(run.cifar, run.sizes.images)
        print(f"gpu checks on {run.device} ({'smoke' if args.smoke else 'full'} sizes), commit "
              f"{args.commit}, budget {args.budget_s:.0f} s; {run.sizes.images:,} CIFAR images written",
              flush=True)
        stages: dict[str, dict[str, Any]] = {}
        for stage in STAGES:
            stages[stage.name] = run_stage(stage, run, args.budget_s - (time.perf_counter() - start))
            path = save(args, run, stages)
    for name, s in stages.items():
        print(f"{name}: {s['status']}, {s['seconds']:.0f} s" + (f" ({s['reason']})" if s["reason"] else ""))
    print(f"{time.perf_counter() - start:.0f} s in all; wrote {path}", flush=True)


# ---------------------------------------------------------------- the docs page

def newest(results: Path) -> Path | None:
    """The newest GPU run's JSON: named ``<date>-<gpu name>.json``, and not ``<date>-cpu.json``."""
    runs = sorted(p for p in results.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]-*.json")
                  if p.stem[11:] != "cpu")
    return runs[-1] if runs else None


def page(results: Path) -> list[str]:
    """The lines of docs/benchmarks/gpu.md: the newest GPU run under ``results``, or that there is none."""
    lines = ["One prepared command measures every CUDA figure the docs claim, within 8 minutes on one",
             "H100/H200 class GPU, each stage against a baseline measured in the same run:", "", "```bash",
             "make gpu-check   # python benchmarks/gpu.py, then python docs/gen_reference.py", "```", "",
             "The script's docstring says what each stage measures and how. `--smoke` runs every stage at a",
             "tiny size on a CPU; the tests do, so the script cannot rot between GPU loans.", ""]
    path = newest(results)
    if path is None:
        stages = Table("", "stage", Column("bound", "{} s"), "measures")
        for s in STAGES:
            stages.add(s.name, s.bound_s, s.measures)
        return lines + ["**No GPU run yet: run `make gpu-check` on a GPU machine.** Its stages, most",
                        "important first:", "", stages.markdown()]
    record = json.loads(path.read_text())
    m = record["machine"]
    lines += [f"**Machine:** {m['cuda']}; {m['processor']}, {m['cores']} cores; torch {m['torch']};",
              f"{m['platform']}. **Date:** {record['date']}. **Commit:** `{record['commit']}`.",
              f"**Budget:** {record['args']['budget_s']:.0f} s.", ""]
    summary = Table("", "stage", "status", Column("seconds", "{:.0f}"), Column("bound", "{:.0f} s"), "reason")
    for name, s in record["stages"].items():
        summary.add(name, s["status"], s["seconds"], s["bound_s"], s["reason"] or "")
    lines += [summary.markdown(), ""]
    measures = {s.name: s.measures for s in STAGES}
    for name, s in record["stages"].items():
        what = measures.get(name, name)
        lines += [f"## {name}", "", f"{what[:1].upper()}{what[1:]}.", ""]
        for i in s["tables"]:
            table = Table.from_dict(record["tables"][i])
            lines += [f"**{table.title}**", "", table.markdown(), ""]
    return lines


if __name__ == "__main__":
    main()
