"""What a benchmark run records: its tables, printed as markdown and written as JSON from the same values.

The scripts print markdown for the docs and write JSON for the tests and for anyone comparing runs, so
a number is formatted in one place only and the two cannot disagree. A cell is a typed value (a
number, a bool, a label, a dict for a compound cell such as mean ± sd); None is a value that does not
exist (a ratio against a library that is not installed, a target not reached) and prints as its
column's ``none`` text; a row shorter than the columns lacks cells that do not apply, which print
blank. Each column's format travels in the JSON, so ``Table.from_dict(t).markdown()`` prints the table
again. Non-finite floats are written as Python's ``json`` writes them (``NaN``, ``Infinity``).
(Named ``record`` rather than ``results``: ``benchmarks/results/`` holds the JSON files.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Column:
    """A header and how its cells print: ``fmt.format(value)``, or ``none`` for None."""

    name: str
    fmt: str = "{}"
    none: str = ""

    def cell(self, value: Any) -> str:
        return self.none if value is None else self.fmt.format(value)


class Table:
    """A markdown table whose rows keep their typed values."""

    def __init__(self, title: str, *columns: Column | str) -> None:
        self.title = title
        self.columns = [c if isinstance(c, Column) else Column(c) for c in columns]
        self.rows: list[list[Any]] = []

    def header(self) -> str:
        """The header and rule lines."""
        return "| " + " | ".join(c.name for c in self.columns) + " |\n" + "|---" * len(self.columns) + "|"

    def line(self, row: Sequence[Any]) -> str:
        cells = [c.cell(v) for c, v in zip(self.columns, row)] + [""] * (len(self.columns) - len(row))
        return "| " + " | ".join(cells) + " |"

    def add(self, *cells: Any) -> str:
        """Append a row and return its markdown line, for scripts that print each row as it is measured."""
        if len(cells) > len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns in {self.title!r}")
        self.rows.append(list(cells))
        return self.line(cells)

    def markdown(self) -> str:
        return "\n".join([self.header(), *(self.line(row) for row in self.rows)])

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": [c.name for c in self.columns],
                "formats": [{"fmt": c.fmt, "none": c.none} for c in self.columns], "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Table:
        table = cls(data["title"], *(Column(n, **f) for n, f in zip(data["columns"], data["formats"])))
        table.rows = [list(row) for row in data["rows"]]
        return table


def cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def machine() -> dict[str, Any]:
    """Where the numbers were measured: they mean little without it."""
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": cpu_model(), "cores": os.cpu_count(),
            "torch": torch.__version__, "cuda": cuda}


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="write the tables here as JSON (default: benchmarks/results/<script>.json)")


def write_json(script: str, args: argparse.Namespace, tables: Sequence[Table], stem: str | None = None
               ) -> Path:
    """Write the run's tables to ``args.json``, or to ``benchmarks/results/<stem or script's stem>.json``.

    ``args`` are the parsed arguments but ``--json``: where the record lies is not part of the run.
    """
    path = args.json or RESULTS / f"{stem or Path(script).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"script": Path(script).name, "date": datetime.date.today().isoformat(), "machine": machine(),
              "args": {k: v for k, v in vars(args).items() if k != "json"},
              "tables": [t.to_dict() for t in tables]}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
