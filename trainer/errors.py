"""The project's exceptions and the one error contract of every command: bad input is a ``UserError``,
printed as one line, exit 2.

Every exception the project raises derives from ``SNNError`` (Optuna's ``OptunaError`` is the model), so
``except SNNError`` takes them all and nothing else: ``UserError`` (bad input), ``WriteError`` (a file that
cannot be written), ``DivergedError`` (a loss that is no number). The one exception is
``trainer.stop.Stopped``, a ``KeyboardInterrupt`` on purpose: no ``except Exception`` may take a stop
signal for a failed trial.

Each command's ``main`` is wrapped in ``command``, which catches ``UserError`` once; anything else is a
bug and keeps its traceback. ``Parser`` is argparse with the same contract for bad flags (one line, no
usage block) and without prefix matching (``--dev`` is not taken for ``--devices``).
"""

from __future__ import annotations

import argparse
import functools
import reprlib
import sys
from collections.abc import Callable
from typing import NoReturn


class SNNError(Exception):
    """The root of the project's exceptions."""


class UserError(SNNError):
    """Bad input (a file, key, value, flag or missing resource); the message is one line naming it."""


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 2, 80, 80


def quote(value: object) -> str:
    """``value`` as an error message quotes it, in at most 80 characters: a YAML alias bomb can expand to
    gigabytes, so even the repr is built with bounded depth and length."""
    text = _QUOTE.repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


Main = Callable[..., int]


def command(main: Main) -> Main:
    """``main(argv)`` that shows the library's messages (``trainer.logs``) and prints a ``UserError`` as
    ``error: <message>`` on stderr and returns 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        from trainer.logs import show

        show()  # the library's messages are the command's output
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2

    return run
