"""``snn-search COMMAND``: the search's commands in one entry point, as Optuna ships ``optuna``.

    snn-search run --space spaces/lambda_decay.yaml      run (or resume) a search
    snn-search confirm --study NAME                      the winners against the control, over seeds, at full length
    snn-search export --study NAME                       write the best config (and model) of a study
    snn-search retrain studies/NAME/best.yaml            train it at full length on train + validation
    snn-search report --study NAME                       did the heads help? an HTML report
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> module with make_parser() and main(argv)
    "run": "search.run",
    "confirm": "search.confirm",
    "export": "search.export",
    "retrain": "search.retrain",
    "report": "search.report",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"snn-search: error: unknown command {argv[0]!r} (allowed: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
