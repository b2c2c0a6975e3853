"""Many local workers on one study: ``snn-search run --workers N [--devices cuda:0,cuda:1 | auto]``.

Each worker is a process of its own running ``search.run`` with the parent's flags (its own sampler seed
stream, heartbeat and trial directory), pinned to one device through ``run.device``. The workers are forked
from multiprocessing's fork server, which imports torch, its compiler and the search once for all of them
(~5 s of CPU a worker otherwise) and never touches a GPU. The workers run in sessions of their own, so Ctrl-C reaches only
this parent, which passes exactly one SIGINT to each, and SIGTERM (a preemption) one SIGTERM to each: every
worker queues its running trial again (it resumes from its last epoch on the next run) and exits, and the
parent waits for them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import Callable
from multiprocessing import forkserver

from search.retry import Preempted, stopped_by
from trainer.errors import UserError

DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
PARENT_ONLY = ("workers", "devices", "worker_index")  # what each child must not inherit: it is one worker
FLAGS = {"overrides": "--set"}  # dests whose flag is not --<dest with dashes>
# what each worker imports (torch.optim's first optimizer imports dynamo)
PRELOAD = ["search.run", "search.optuna_backend", "torch._dynamo"]
STOPS = {signal.SIGINT, signal.SIGTERM}


def devices(spec: str | None, workers: int | None) -> list[str]:
    """One device per worker: ``auto`` is every visible GPU (else the CPU); a list is used round-robin."""
    if spec == "auto":
        import torch

        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    elif spec:
        names = [d.strip() for d in spec.split(",")]
        bad = [d for d in names if not DEVICE.match(d)]
        if bad:
            raise UserError(f"--devices: {bad[0]!r} is not a device (allowed: auto, cpu, cuda, cuda:N, comma-separated)")
    else:
        names = ["auto"]
    count = workers or (len(names) if spec else 1)
    return [names[i % len(names)] for i in range(count)]


def child_args(args: argparse.Namespace, index: int, device: str) -> list[str]:
    """The command line of worker ``index`` on ``device``, built from the parent's parsed flags (never
    from its raw argv, where an abbreviation or a repeated flag could slip through)."""
    out: list[str] = []
    for dest, value in vars(args).items():
        if dest in PARENT_ONLY or value is None or value is False:
            continue
        flag = FLAGS.get(dest, "--" + dest.replace("_", "-"))
        for item in value if isinstance(value, list) else [value]:
            out += [flag] if value is True else [flag, str(item)]
    return [*out, "--worker-index", str(index), "--set", f"run.device={device}"]


def work(main: Callable[[list[str]], int], argv: list[str], threads: int) -> None:
    """One worker, in the fork server's child: a session of its own, its share of the cores, and what a
    process of its own would have (SIGTERM's default action; multiprocessing's default start method, which
    the fork server's child is set to forkserver, for its data loaders)."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    multiprocessing.set_start_method(None, force=True)
    import torch

    torch.set_num_threads(threads)  # the server's libraries read OMP_NUM_THREADS (launch set it); torch's own
    sys.exit(main(argv))


def exit_code(proc: multiprocessing.process.BaseProcess) -> int:
    """A worker's exit code, a signal's as a shell reports it (128 + N), never below a clean exit's 0."""
    code = proc.exitcode
    return 128 - code if code is not None and code < 0 else code or 0


def start_server(threads: int) -> None:
    """The fork server, importing ``PRELOAD`` with ``threads`` threads a library; it ignores SIGTERM, so a
    SIGTERM to the process group (``timeout``, a scheduler) reaches this parent and the workers' handlers but
    cannot end the server under them (when it ends, the workers look ended to this parent)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    saved_threads, saved_term = os.environ.get("OMP_NUM_THREADS"), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGTERM, saved_term)
        if saved_threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads


def launch(main: Callable[[list[str]], int], args: argparse.Namespace, devices: list[str]) -> int:
    """Run ``main`` (``search.run``'s) as one worker per entry of ``devices`` until all end; the worst exit
    code (130 after Ctrl-C)."""
    cpu_workers = sum(d in ("cpu", "auto") for d in devices) or 1
    threads = max(1, (os.cpu_count() or 1) // cpu_workers)  # no oversubscribed cores
    start_server(threads)
    context = multiprocessing.get_context("forkserver")
    procs = [context.Process(target=work, args=(main, child_args(args, i, device), threads), name=f"worker {i}")
             for i, device in enumerate(devices)]
    # a Ctrl-C or SIGTERM while a worker is forked would leave it running with no pid known here: both wait
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        for p in procs:
            p.start()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one that came meanwhile is raised here, and stops them
        print(f"started {len(procs)} workers on {', '.join(dict.fromkeys(devices))} "
              f"(pids {', '.join(str(p.pid) for p in procs)})", flush=True)
        for p in procs:
            p.join()
        return max(exit_code(p) for p in procs)
    except KeyboardInterrupt as stop:
        why, code = stopped_by(stop)
        print(f"{why}: stopping the workers; their running trials are queued again", flush=True)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM if isinstance(stop, Preempted) else signal.SIGINT)  # what came
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
                p.join()
        return code
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # also when a start failed
