"""Many local workers on one study: ``snn-search run --workers N [--devices cuda:0,cuda:1 | auto]``.

Each worker is a process of its own running ``search.run`` with the parent's flags (its own sampler seed
stream, heartbeat and trial directory), pinned to one device through ``run.device``. The workers are forked
from multiprocessing's fork server, which imports torch, its compiler and the search once for all of them
(~5 s of CPU a worker otherwise) and never touches a GPU.

The processes of a search live and die together. The workers run in sessions of their own, so a terminal's
Ctrl-C or a scheduler's SIGTERM reaches this parent alone; its stop flag (``trainer.stop``) reaches every
worker through shared memory, also one still being forked, and each queues its running trial again at its
next safe point (it resumes from its last epoch) and exits; a Ctrl-C during the stop is passed on as a
SIGINT, which stops a worker mid-computation. A worker whose parent dies (SIGKILL, the OOM killer) does the
same, as after a SIGHUP. The parent's exit code is the worst of its own and its workers'.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing import forkserver
from typing import Any

from trainer import stop
from trainer.logs import logger
from trainer.errors import UserError

DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
PARENT_ONLY = ("workers", "devices", "worker_index")  # what each child must not inherit: it is one worker
# what each worker imports (torch.optim's first optimizer imports dynamo)
PRELOAD = ["search.run", "search.optuna_backend", "torch._dynamo"]
log = logger(__name__)
POLL = 0.2  # seconds between the parent's looks at its stop flag while it waits for the workers
GRACE = 120  # seconds the workers have to end their trials after a stop, before they are killed


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
        flag = "--set" if dest == "overrides" else "--" + dest.replace("_", "-")  # the one flag not named after its dest
        for item in value if isinstance(value, list) else [value]:
            out += [flag] if value is True else [flag, str(item)]
    return [*out, "--worker-index", str(index), "--set", f"run.device={device}"]


def work(main: Callable[[list[str]], int], argv: list[str], threads: int, parent_stop: Any) -> None:
    """One worker, in the fork server's child: a session of its own, its share of the cores, and what a
    process of its own would have (SIGTERM's default action; multiprocessing's default start method, which
    the fork server's child is set to forkserver, for its data loaders). It follows its parent's stop flag
    and stops when its parent dies."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    multiprocessing.set_start_method(None, force=True)
    stop.follow(parent_stop)
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
    cannot end the server under them (when it ends, the workers look ended to this parent). A SIGTERM to
    this parent meanwhile is blocked, not lost: Linux keeps a blocked signal pending though it is ignored."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    saved_threads, saved_term = os.environ.get("OMP_NUM_THREADS"), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGTERM, saved_term)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if saved_threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads


def _signal(procs: list[multiprocessing.process.BaseProcess], signum: int) -> None:
    """Send ``signum`` to the workers still running (one may have ended since it was listed)."""
    for p in procs:
        if p.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signum)


def launch(main: Callable[[list[str]], int], args: argparse.Namespace, devices: list[str]) -> int:
    """Run ``main`` (``search.run``'s) as one worker per entry of ``devices`` until all end; the worst exit
    code, said with the worker it came from. A stop signal starts no further worker and stops the others."""
    cpu_workers = sum(d in ("cpu", "auto") for d in devices) or 1
    threads = max(1, (os.cpu_count() or 1) // cpu_workers)  # no oversubscribed cores
    start_server(threads)
    context = multiprocessing.get_context("forkserver")
    flag = context.Value("i", 0, lock=False)  # the parent's stop signal, read by every worker
    procs = []
    for i, device in enumerate(devices):
        if stop.requested():
            break
        procs.append(context.Process(target=work, args=(main, child_args(args, i, device), threads, flag),
                                     name=f"worker {i}"))
        procs[-1].start()
        stop.point("workers")
    log.info(f"started {len(procs)} workers on {', '.join(dict.fromkeys(devices))} "
             f"(pids {', '.join(str(p.pid) for p in procs)})")
    passed, stopped = 0, None  # Ctrl-Cs passed on; when the stop was
    while alive := [p for p in procs if p.exitcode is None]:
        if stop.requested() and stopped is None:
            log.info(f"{stop.WHY[stop.requested()]}: stopping the workers; their running trials are queued again")
            stop.share(flag)
            passed, stopped = stop.interrupts(), time.monotonic()
        if stop.interrupts() > passed:  # a Ctrl-C during the stop: the workers stop mid-computation
            passed = stop.interrupts()
            _signal(alive, signal.SIGINT)
        if stopped is not None and time.monotonic() - stopped > GRACE:
            log.warning(f"workers still running {GRACE} s after the stop: killed; their trials are retried once "
                        f"their heartbeats are stale")
            _signal(alive, signal.SIGKILL)
            stopped = math.inf
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=POLL)
    codes = [exit_code(p) for p in procs]
    for p, code in zip(procs, codes):
        if code and not stop.requested():
            killed = -p.exitcode if p.exitcode < 0 else 0
            how = f"was killed by {signal.Signals(killed).name}" if killed else f"exited with {code}"
            log.warning(f"{p.name} (pid {p.pid}) {how}")
    return max(codes, default=0)
