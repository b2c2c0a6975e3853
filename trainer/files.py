"""Files written whole or not at all: checkpoints, a PBT member's lineage, data caches."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from trainer.errors import SNNError


class WriteError(SNNError, OSError):
    """A file that could not be written (a full disk, a read-only folder); names the file, keeps the errno."""


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` into a file of this process beside ``path``, then rename it: a process killed
    mid-write, a reader at that moment, or another process writing the same file, finds a whole file, never
    a truncated one. A failed write is a ``WriteError`` with its errno (torch's own writer reports a full
    disk as "unexpected pos"), naming the file and leaving no partial one behind."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        tmp.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
