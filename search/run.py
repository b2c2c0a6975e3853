"""Run a search space: ``snn-search run --space spaces/lambda_decay.yaml`` (or ``python search/run.py``).

Re-running the same command resumes the study: trials that a killed or interrupted worker left behind
continue from their last finished epoch, and the study is topped up to ``study.n_trials`` trials.
Bad input exits with code 2 and a one-line error before the study is touched. Ctrl-C exits with 130 and
SIGTERM (a preemption) with 143: the signal is a flag (``trainer.stop``), the running trials end at the
next batch, are queued again and resume from their last finished epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from search.space import Space, load_space
from search.storage import artifact_location, artifact_store, default_url, open_storage, study_dir
from trainer import stop
from trainer.errors import Parser, UserError, command


def lengths(space: Space) -> str:
    """What the arms and a trial and the final retraining will train, said before anything runs."""
    cfg, s = space.config({}), space.study
    pruned = "" if s.pruner == "none" else f", pruned no earlier than epoch {space.min_epochs()}"
    control = space.control()
    if s.scheduler is not None:
        arms = f"a population of {s.population}" + ("" if control is None else " with heads, and its control arm")
    elif control is None:
        arms = f"{s.n_trials} trials"
    elif control.params:
        arms = (f"{s.n_trials} trials with heads, and {control.study.n_trials} without ({control.study.name}: the "
                f"control arm, tuning {', '.join(p.key for p in control.params)} alike)")
    else:
        arms = f"{s.n_trials} trials with heads, and one run of the base without heads ({control.study.name})"
    return (f"{arms}; trials: {cfg.optim.epochs} epochs each on {cfg.data.name} ({cfg.model.arch}, "
            f"T={cfg.data.timesteps}){pruned}; final retraining (search/retrain.py): {space.final['optim.epochs']} "
            f"epochs on train + validation")


def make_parser(prog: str = "snn-search run") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("--space", required=True, help="space YAML file (see spaces/)")
    parser.add_argument("--storage", help="SQLAlchemy URL or journal:FILE.log (default: study.storage, "
                        "else sqlite:///studies/<name>.db)")
    parser.add_argument("--study-name", help="run the space as this study (default: study.name); a different "
                        "base config or space must be a different study")
    parser.add_argument("--n-trials", type=int, help="study-wide number of finished trials (default: study.n_trials)")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--base", type=Path, help="a trainer config (e.g. configs/cifar10_resnet19.yaml) that "
                        "replaces the space's base; the final retraining then runs its full optim.epochs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the base trainer config, e.g. --set data.name=cifar10 (repeatable)")
    parser.add_argument("--backend", choices=["optuna", "ray"], default="optuna",
                        help="optuna: this process runs trials (--workers for more); ray: Ray Tune runs them")
    parser.add_argument("--workers", type=int, help="local worker processes on the study (optuna backend)")
    parser.add_argument("--devices", help="a device per worker: auto (every visible GPU), or e.g. cuda:0,cuda:1")
    parser.add_argument("--study-dir", type=Path, help="trial folders, artifacts, Ray results (default: beside a "
                        "SQLite or journal file, studies/<study>/ for other storages)")
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set for the children of --workers
    ray = parser.add_argument_group("ray backend")
    ray.add_argument("--address", help="join a running Ray cluster, e.g. auto or ray://head:10001 "
                     "(default: start Ray on this machine)")
    ray.add_argument("--cpus-per-trial", type=float, default=1)
    ray.add_argument("--gpus-per-trial", type=float, default=0, help="fractions share a GPU, e.g. 0.25")
    ray.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    return parser


def check(args: argparse.Namespace) -> Space:
    """The space with the flags applied; every bad flag or file raises a one-line ``UserError``."""
    space = load_space(args.space, args.overrides, args.base)
    if args.study_name is not None:
        if not args.study_name.replace("-", "_").isidentifier():
            raise UserError(f"--study-name: {args.study_name!r}: letters, digits, '_' or '-'")
        space.study.name = args.study_name
    if args.n_trials is not None and args.n_trials < 1:
        raise UserError(f"--n-trials: must be >= 1 (got {args.n_trials})")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers: must be >= 1 (got {args.workers})")
    from search.pbt import check as check_pbt

    if space.study.scheduler is not None and args.backend != "ray":
        raise UserError(f"{args.space}: study.scheduler {space.study.scheduler} trains a population on Ray Tune: add "
                        f"--backend ray")

    check_pbt(space)
    if args.backend == "ray" and (args.workers or args.devices):
        raise UserError("--workers/--devices: for the optuna backend (Ray: --max-concurrent, --gpus-per-trial)")
    return space


@command
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    with stop.handling():
        try:
            code = search(args)
        except stop.Stopped:
            code = 0
        signum = stop.requested()
    if not signum:
        return code
    if args.worker_index is None:  # a worker's parent says it once
        print(f"{stop.WHY[signum]}: run the same command again to resume", file=sys.stderr, flush=True)
    return max(code, 128 + signum)  # the worst of this process's and its workers' (a worker killed: 137)


def search(args: argparse.Namespace) -> int:
    """The command, with stop signals as a flag: ``Stopped`` comes out of a safe point; ``main`` says why."""
    space = check(args)
    from search.workers import devices

    worker_devices = devices(args.devices, args.workers) if args.workers or args.devices else []
    from trainer.fit import check_device

    for device in {space.config({}).run.device, *worker_devices}:
        check_device(device)  # before the study: a missing GPU would fail every trial
    url = args.storage or space.study.storage or default_url(space.study.name)
    try:
        storage = open_storage(url, space.study.heartbeat, space.study.max_retry)
    except UserError as err:
        raise (UserError(f"{args.space}: study.storage: {err}") if url == space.study.storage else err) from None
    root = args.study_dir or study_dir(url, space.study.name)
    space.study.artifacts = artifact_location(space.study.artifacts, root)  # one store for every arm
    artifact_store(space.study.artifacts)  # a missing package fails here
    space.study.n_trials = args.n_trials or space.study.n_trials  # the budget; TPE sizes its start-up by it
    timeout = args.timeout or space.study.timeout
    from search.study import create_study

    if args.worker_index is not None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the parent said it; keep the bars clean
    else:
        print(f"storage: {url}", flush=True)
        print(lengths(space), flush=True)
    stop.check()
    code = 0
    if len(worker_devices) > 1:
        from search.workers import launch

        from search.storage import arm_dir

        # once, before the workers: creation races in SQLite
        arms = [create_study(arm, storage, arm_dir(root, space.study.name, arm.study.name)) for arm in space.arms()]
        code = launch(main, args, worker_devices)
        if stop.requested() or code and any(unfinished(arm) for arm in arms):
            return code
    elif args.backend == "ray":
        from search.ray_backend import run as run_ray

        arms = run_ray(space, storage, url, timeout, args.address, args.cpus_per_trial,
                       args.gpus_per_trial, args.max_concurrent, root)
    else:
        from search.optuna_backend import run

        if worker_devices:
            space.base = {**space.base, "run": {**space.base.get("run", {}), "device": worker_devices[0]}}
        tag = "" if args.worker_index is None else f"w{args.worker_index} "
        arms = run(space, storage, url, timeout, root, tag, args.worker_index or 0)
    if args.worker_index is not None:
        return 0
    study = arms[0]
    from search.report import build, publish

    stop.point("report")
    report = build(study, dashboard=True)
    if stop.requested():  # the report is published whole or not at all; `snn-search report` writes it later
        return code
    publish(study, report)  # the summary and the SNN figures, for optuna-dashboard
    name = space.study.name
    dashboard = url.removeprefix("journal:")  # optuna-dashboard reads a journal file by its path
    artifacts = study.user_attrs["artifacts"]
    if "://" not in artifacts:  # the dashboard's command line serves folders only
        dashboard += f" --artifact-dir {artifacts}"
    from search.progress import best_line

    print(f"done. {best_line(arms)}\n"
          f"browse: optuna-dashboard {dashboard}  (the study's note and figures say what the heads did)\n"
          f"confirm: snn-search confirm --study {name} --storage {url}  (the winners against the control, over "
          f"seeds, at full length)\n"
          f"export: snn-search export --study {name} --storage {url}\n"
          f"report: snn-search report --study {name} --storage {url}", flush=True)
    return code


def unfinished(study) -> bool:
    """Trials still RUNNING or WAITING: the workers that ended left work undone."""
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


if __name__ == "__main__":
    sys.exit(main())
