"""``snn-search COMMAND``: the search's commands in one entry point, as Optuna ships ``optuna``."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from trainer.registry import Registry


@dataclass(frozen=True)
class Command:
    module: str  # with make_parser() and main(argv); it also runs as a script, python search/<name>.py
    summary: str


COMMANDS: Registry[Command] = Registry("command")
COMMANDS.register("run")(Command("search.run", "run (or resume) a search: --space spaces/lambda_decay.yaml"))
COMMANDS.register("confirm")(Command("search.confirm", "the winners against the control, over seeds, at full length"))
COMMANDS.register("export")(Command("search.export", "write the best config (and model) of a study"))
COMMANDS.register("retrain")(Command("search.retrain", "train an exported config at full length on train + validation"))
COMMANDS.register("report")(Command("search.report", "did the heads help? an HTML report"))


def usage() -> str:
    width = max(map(len, COMMANDS.names()))
    return "\n".join(["usage: snn-search COMMAND [--help] ...", "", "commands:",
                      *(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()),
                      "", "snn-search --version prints the installed version."])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        try:
            print(f"snn-search {version('snn-shortcut-search')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print("snn-search (not installed: pip install -e .)")
        return 0
    if argv[0] not in COMMANDS:
        print(f"snn-search: error: {COMMANDS.unknown(argv[0])}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]].module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
