"""Library messages go through ``logging``, under the logger ``snn``: a command shows them on stdout, one
line each, as its own output (``show``); a program that imports the library decides for itself. Progress
lines (an epoch, a finished trial) and a command's results are that command's output, printed."""

from __future__ import annotations

import logging
import sys

ROOT = "snn"


def logger(module: str) -> logging.Logger:
    """The logger of a project module (``logger(__name__)``): ``snn.search.workers``, say."""
    return logging.getLogger(f"{ROOT}.{module}")


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message comes (a redirect, pytest's capture)."""

    @property
    def stream(self):  # noqa: ANN201 - StreamHandler's attribute
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def show() -> None:
    """Print the library's messages, INFO and up, on stdout as they are (once per process)."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
