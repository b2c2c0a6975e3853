"""``package.module:name`` import paths: how a model, a neuron class or a builder from outside comes in.
Modules are found among the installed packages and in the folder the command runs in."""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from trainer.errors import UserError, quote

IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class ImportPathError(UserError):
    """An import path whose module or attribute is not there."""


def imported(path: str, key: str) -> Any:
    """The object at ``path``; what is missing is one line naming ``key``."""
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path:  # as uvicorn and gunicorn do: the folder a command runs in is importable
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a module that fails to import, for whatever reason, is one line
        raise ImportPathError(f"{key}: cannot import {module_name!r} for {path!r} "
                              f"({type(err).__name__}: {quote(str(err))})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportPathError(f"{key}: {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj
