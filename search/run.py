"""Run a search space: ``python search/run.py --space spaces/lambda_decay.yaml``.

Re-running the same command resumes the study and tops it up to ``study.n_trials`` finished trials.
Bad input exits with code 2 and a one-line error before the study is touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402

from search.space import SpaceError, load_space  # noqa: E402
from search.storage import default_url, open_storage  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python search/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="space YAML file (see spaces/)")
    parser.add_argument("--storage", help="SQLAlchemy URL or journal:FILE.log (default: study.storage, "
                        "else sqlite:///studies/<name>.db)")
    parser.add_argument("--n-trials", type=int, help="study-wide number of finished trials (default: study.n_trials)")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the base trainer config, e.g. --set data.name=cifar10 (repeatable)")
    parser.add_argument("--backend", choices=["optuna"], default="optuna")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        space = load_space(args.space, args.overrides)
        if args.n_trials is not None and args.n_trials < 1:
            raise SpaceError(f"--n-trials: must be >= 1 (got {args.n_trials})")
        url = args.storage or space.study.storage or default_url(space.study.name)
        storage = open_storage(url, space.study.heartbeat)
    except (SpaceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_trials = args.n_trials or space.study.n_trials
    timeout = args.timeout or space.study.timeout
    print(f"storage: {url}", flush=True)
    from search.optuna_backend import StudyMismatchError, run

    try:
        study = run(space, storage, n_trials, timeout)
    except StudyMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done. browse: optuna-dashboard {url}\nexport: python search/export.py --study {study.study_name} "
          f"--storage {url}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
