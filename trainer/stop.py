"""Stop signals as a flag: SIGTERM (a preemption), SIGINT (Ctrl-C) and SIGHUP (a closed terminal) never
raise at an arbitrary line.

A handler only records the signal. Work stops at safe points (``check``: after each batch and each epoch,
around the storage calls that start and end a trial), where the caller ends its trial through its one
ending path, so no storage write is ever cut midway (an exception raised inside SQLAlchemy can leave
SQLite's write lock held by the very process that then waits for it). A Ctrl-C while a stop is already
under way stops at once, as users expect, but only inside ``interruptible()`` regions: pure computation,
no storage call.

A worker process also ``follow``s its parent: the parent's flag reaches it through shared memory (also
while it is still being forked), and the parent's death stops it as a SIGHUP would.

``SNN_STOP_AT=<point>[@<n>]`` sends this process ``SNN_STOP_SIGNAL`` (default SIGTERM) the ``n``-th time
(default 1st) it passes the named ``point``: the tests stop a search at each instant of a trial's life.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WHY = {signal.SIGTERM: "preempted (SIGTERM)", signal.SIGINT: "interrupted (Ctrl-C)",
       signal.SIGHUP: "hung up (SIGHUP: the terminal or the parent process went away)"}


class Stopped(KeyboardInterrupt):
    """Raised at a safe point after a stop signal; a BaseException, so no ``except Exception`` takes it for
    a failed trial."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(WHY[signum])
        self.signum = signum

    @property
    def why(self) -> str:
        return WHY[self.signum]

    @property
    def code(self) -> int:
        """The exit code a shell reports for the signal: 143 for SIGTERM, 130 for Ctrl-C, 129 for SIGHUP."""
        return 128 + self.signum


class _Flag:
    """The stop state of one ``handling``: the first signal received and the Ctrl-Cs counted."""

    def __init__(self) -> None:
        self.signum = 0
        self.interrupts = 0
        self.hard = threading.local()  # set inside interruptible()
        self.passed: Counter[str] = Counter()  # named points passed, for SNN_STOP_AT


_flag = _Flag()
_saved: dict[int, Any] = {}  # the handlers before ``handling``; empty outside it
_parent: Any = None  # in a worker: its parent's flag, a multiprocessing.Value("i")


def _on_signal(signum: int, frame: object) -> None:
    if signum == signal.SIGINT:
        if requested() and getattr(_flag.hard, "on", False):
            raise KeyboardInterrupt  # a stop is under way and the user insists; no storage call is either
        _flag.interrupts += 1
    _flag.signum = requested() or signum  # the first stop, this process's or its parent's, says why


@contextmanager
def handling() -> Iterator[None]:
    """The stop signals set the flag while inside (the flag is clear on entry and on exit); the previous
    handlers come back after. A signal ignored on entry (``nohup``, a shell's background job) stays ignored."""
    global _flag, _saved
    _flag, _saved = _Flag(), {s: signal.getsignal(s) for s in WHY}
    try:
        install()
        yield
    finally:
        for s, handler in _saved.items():
            signal.signal(s, handler)
        _flag, _saved = _Flag(), {}  # outside, nothing is stopping: a later fit here must not see this stop


def install() -> None:
    """Inside ``handling``: make the stop signals set the flag, also again after a library took them
    (``ray.init`` makes SIGTERM exit at whatever line the process is on). Outside, it does nothing."""
    for s, before in _saved.items():
        if before is not signal.SIG_IGN:
            signal.signal(s, _on_signal)


def follow(shared: Any) -> None:
    """In a worker: also stop when the parent's ``shared`` flag (a ``multiprocessing.Value("i")``) holds
    a signal, or when the parent dies (its pipe to this process closes): then as after a SIGHUP."""
    global _parent
    _parent = shared

    def watch() -> None:
        multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
        shared.value = shared.value or signal.SIGHUP

    threading.Thread(target=watch, daemon=True, name="watch parent").start()


def share(shared: Any) -> None:
    """Pass this process's stop to the workers that ``follow`` ``shared``."""
    shared.value = requested()


def requested() -> int:
    """The stop signal received (by this process or its parent), 0 while there is none."""
    return _flag.signum or (_parent.value if _parent is not None else 0)


def interrupts() -> int:
    """How many Ctrl-Cs this process received."""
    return _flag.interrupts


def check() -> None:
    """A safe point: raise ``Stopped`` if a stop signal came."""
    signum = requested()
    if signum:
        raise Stopped(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """A region of pure computation, where a Ctrl-C during a stop raises ``KeyboardInterrupt`` at once."""
    _flag.hard.on = True
    try:
        yield
    finally:
        _flag.hard.on = False


def point(name: str) -> None:
    """A named instant (``ask``, ``asked``, ``batch``, ``checkpointed``, ``finish``, ``report``,
    ``workers``, ``result``): where ``SNN_STOP_AT`` names it, the process signals itself there."""
    target, _, nth = os.environ.get("SNN_STOP_AT", "").partition("@")
    if target != name:
        return
    _flag.passed[name] += 1
    if _flag.passed[name] == int(nth or 1):  # to this thread: the handler has run when raise_signal returns
        signal.raise_signal(signal.Signals[os.environ.get("SNN_STOP_SIGNAL", "SIGTERM")])
