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
    parser.add_argument("--backend", choices=["optuna", "ray"], default="optuna",
                        help="optuna: this process runs trials (start more processes for more workers); "
                        "ray: Ray Tune runs them in parallel")
    ray = parser.add_argument_group("ray backend")
    ray.add_argument("--address", help="join a running Ray cluster, e.g. auto or ray://head:10001 "
                     "(default: start Ray on this machine)")
    ray.add_argument("--cpus-per-trial", type=float, default=1)
    ray.add_argument("--gpus-per-trial", type=float, default=0, help="fractions share a GPU, e.g. 0.25")
    ray.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
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
    space.study.n_trials = args.n_trials or space.study.n_trials  # the budget; TPE sizes its start-up by it
    timeout = args.timeout or space.study.timeout
    print(f"storage: {url}", flush=True)
    from search.optuna_backend import StudyMismatchError

    try:
        if args.backend == "ray":
            from search.ray_backend import run as run_ray

            study = run_ray(space, storage, url, timeout, args.address, args.cpus_per_trial,
                            args.gpus_per_trial, args.max_concurrent)
        else:
            from search.optuna_backend import run

            study = run(space, storage, url, timeout)
    except StudyMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done. browse: optuna-dashboard {url}\nexport: python search/export.py --study {study.study_name} "
          f"--storage {url}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
