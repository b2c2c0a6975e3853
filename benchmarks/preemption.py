"""Preemption at random instants: does a search with two workers strand or lose anything?

    python benchmarks/preemption.py [--rounds 20] [--storages sqlite postgresql] [--space spaces/lambda_decay.yaml]
                                    [--n-trials 4] [--max-delay 25] [--seed 0]

Each round starts ``search/run.py --space SPACE --workers 2`` on a study and sends its parent SIGTERM (a
preemption) after a delay drawn uniformly from [0, ``--max-delay``] seconds, start-up included, then waits
for every process to exit. Each round resumes the study of the round before; a finished study is
followed by a new one. After each signal it counts the trials left RUNNING (target 0) and the output's
tracebacks (target 0), and times the signal's way to the exit (the preemption latency: at most one batch
and the end of each running trial). Each study is finally run to its end without a signal, and tallied:
trials COMPLETE or PRUNED (target ``--n-trials``), trials still RUNNING or WAITING (target 0), and finished
epochs lost (a retry that started before the last epoch its interrupted attempts had reported; target 0),
over both arms of the search (the control arm, ``<name>.control``, runs beside the heads arm).
PostgreSQL rounds need a server at ``--pg-server`` (each study gets a fresh database, dropped after).
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from record import Column, Table, add_json_flag, write_json

from search.space import CONTROL, load_space

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("", CONTROL)  # the search's own study, and its control arm's


class Study:
    """One study under test: its storage URL, folder and name."""

    def __init__(self, kind: str, folder: Path, pg_server: str) -> None:
        self.kind, self.name, self.pg_server = kind, f"stress_{uuid.uuid4().hex[:8]}", pg_server
        self.dir = folder / self.name
        if kind == "sqlite":
            self.url = f"sqlite:///{folder}/{self.name}.db"
        else:
            self.url = f"{pg_server}/{self.name}"
            with _admin(pg_server).connect() as conn:
                conn.execute(sqlalchemy.text(f"CREATE DATABASE {self.name}"))

    def command(self, args: argparse.Namespace) -> list[str]:
        return [sys.executable, "search/run.py", "--space", str(args.space), "--storage", self.url, "--study-name",
                self.name, "--n-trials", str(args.n_trials), "--workers", "2", "--study-dir", str(self.dir)]

    def trials(self, arm: str = "") -> list[optuna.trial.FrozenTrial]:
        """The trials of the search's study, or of its control arm (``arm=".control"``)."""
        try:
            return optuna.load_study(study_name=self.name + arm, storage=self.url).get_trials()
        except KeyError:  # stopped before the study was created
            return []

    def drop(self) -> None:
        if self.kind == "postgresql":
            with _admin(self.pg_server).connect() as conn:
                conn.execute(sqlalchemy.text(f"DROP DATABASE {self.name} WITH (FORCE)"))


def _admin(server: str) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(f"{server}/test", isolation_level="AUTOCOMMIT")


def lost_epochs(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Finished epochs that a finished trial's last attempt trained again: its attempts resume one another,
    so it must start from the most epochs any earlier attempt reported."""
    lost = 0
    for t in trials:
        history = t.system_attrs.get("retry_history", [])
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and history:
            before = max(trials[n].user_attrs.get("epochs_run", 0) for n in history)
            lost += max(0, before - t.user_attrs["starts"][-1])
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="signals per storage")
    parser.add_argument("--storages", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    parser.add_argument("--space", default="spaces/lambda_decay.yaml")
    parser.add_argument("--n-trials", type=int, default=4, help="trials per study")
    parser.add_argument("--max-delay", type=float, default=25.0, help="seconds: the latest a signal comes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pg-server", default="postgresql://postgres@127.0.0.1:5432")
    add_json_flag(parser)
    args = parser.parse_args()
    draw = random.Random(args.seed)
    table = Table(f"SIGTERM to the parent of `--workers 2` at a uniform random instant in [0, {args.max_delay:g}] s, "
                  f"{args.space} with {args.n_trials} trials a study", "storage", Column("signals", "{}"),
                  Column("studies", "{}"), Column("left RUNNING", "{}"), Column("tracebacks", "{}"),
                  Column("trials finished / asked for (both arms)", "{}"), Column("left RUNNING or WAITING at the end", "{}"),
                  Column("finished epochs lost", "{}"), Column("latency median (s)", "{:.1f}"),
                  Column("latency max (s)", "{:.1f}"), Column("minutes", "{:.1f}"))
    print(f"# {table.title}\n{table.header()}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="preemption-"))
    for kind in args.storages:
        started, studies, signals, stranded, tracebacks, latencies = time.time(), [], 0, 0, 0, []
        study = None
        while signals < args.rounds:
            if study is None:
                study = Study(kind, folder, args.pg_server)
                studies.append(study)
            proc = subprocess.Popen(study.command(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            time.sleep(draw.uniform(0, args.max_delay))
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                sent = time.time()
                out = proc.communicate(timeout=300)[0]  # the workers hold the pipe: it closes when all are gone
                latencies.append(time.time() - sent)
                signals += 1
                stranded += sum(t.state == TrialState.RUNNING for arm in ARMS for t in study.trials(arm))
                tracebacks += "Traceback" in out
            else:
                out = proc.communicate()[0]
                tracebacks += "Traceback" in out
                study = None  # it finished before the signal: the next round starts a new study
        finished = asked = left = lost = 0
        space = load_space(args.space)
        space.study.n_trials = args.n_trials
        for s in studies:
            end = subprocess.run(s.command(args), cwd=ROOT, capture_output=True, text=True, timeout=1800)
            tracebacks += "Traceback" in end.stdout + end.stderr
            for arm, budget in zip(ARMS, (a.study.n_trials for a in space.arms())):
                trials = s.trials(arm)
                finished += sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
                asked += budget
                left += sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
                lost += lost_epochs(trials)
            s.drop()
        print(table.add(kind, signals, len(studies), stranded, tracebacks, f"{finished} / {asked}", left, lost,
                        statistics.median(latencies), max(latencies), (time.time() - started) / 60), flush=True)
    write_json(__file__, args, [table])


if __name__ == "__main__":
    main()
