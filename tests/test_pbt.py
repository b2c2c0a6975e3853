"""Population-based training over lambda (``study.scheduler: pbt`` on Ray): the space it accepts, the
perturbations it makes, and one population end to end: copies happen, the study records them, export
writes the best member's lambda as a table and the retraining replays it stretched."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search import export as export_cli
from search import retrain as retrain_cli
from search import run as run_cli
from search.pbt import Clip, Member, Resample, mutations, scheduler
from search.report import build
from search.space import load_space
from trainer.checkpoint import load_history

from conftest import ROOT, communicate

SPACE = """
study: {{name: pop, seed: 0, scheduler: pbt, population: 4, perturbation_interval: 2, control: 0{study}}}
base:
  data: {{limit: 48, timesteps: 2, batch_size: 16}}
  model: {{width: 4}}
  heads: {{exits: [layer1.0]}}
  lambda: {{schedule: constant}}
  optim: {{name: adamw, lr: 0.01, epochs: 6}}
final:
  optim.epochs: 9
space:
{space}
"""
LAMBDA = "  lambda.start: {type: float, low: 0.0, high: 1.0}"


def space_file(tmp_path, study="", space=LAMBDA):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(study=study, space=space))
    return path


@pytest.mark.parametrize("space,study,message", [
    ("  heads.exits: {type: subset, choices: [layer1.0, layer2.0]}", "",
     "study.scheduler pbt changes values mid-training, and heads.exits would change the network"),
    ("  data.timesteps: {type: int, low: 2, high: 4}", "", "data.timesteps would change the network"),
    (LAMBDA, ", pruner: hyperband", "'study.pruner': population-based training stops no member"),
    ("  optim.lr: {type: categorical, choices: [0.01, 0.02]}", ", scheduler: pb2",
     "study.scheduler pb2 changes values mid-training, and optim.lr would change the network or cannot be perturbed"),
])
def test_a_pbt_space_perturbs_only_what_can_change_mid_training(tmp_path, capsys, space, study, message):
    path = space_file(tmp_path, study, space)
    url = f"sqlite:///{tmp_path}/p.db"
    assert run_cli.main(["--space", str(path), "--storage", url, "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "p.db").exists()  # refused before the study


def test_pbt_runs_on_ray_only(tmp_path, capsys):
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", f"sqlite:///{tmp_path}/p.db"]) == 2
    assert "study.scheduler pbt trains a population on Ray Tune: add --backend ray" in capsys.readouterr().err


def test_perturbed_values_stay_in_their_range_and_on_their_step(tmp_path):
    space = load_space(space_file(tmp_path, space=LAMBDA + "\n  optim.lr: {type: float, low: 0.001, high: 0.1, log: true}"
                                  "\n  optim.weight_decay: {type: float, low: 0.0, high: 0.1, step: 0.01}"))
    clip = Clip(space.params)
    assert clip({"values": {"lambda.start": 1.08, "optim.lr": 0.0005, "optim.weight_decay": 0.0333}})["values"] == \
        {"lambda.start": 1.0, "optim.lr": 0.001, "optim.weight_decay": pytest.approx(0.03)}
    drawn = mutations(space.params)["values"]
    assert set(drawn) == {"lambda.start", "optim.lr", "optim.weight_decay"}
    lrs = [drawn["optim.lr"]() for _ in range(200)]
    assert all(0.001 <= v <= 0.1 for v in lrs) and min(lrs) < 0.003 and max(lrs) > 0.03  # log-uniform
    assert isinstance(drawn["lambda.start"], Resample)
    choices = load_space(space_file(tmp_path, space="  optim.lr: {type: categorical, choices: [0.01, 0.02]}")).params
    assert mutations(choices) == {"values": {"optim.lr": [0.01, 0.02]}}  # PBT shifts to a neighbour


class Controller:
    """What Tune hands a scheduler: the trials, and the decisions it caches (``compat.forget_stale_stop``)."""

    search_alg = None  # Tune's default generator, as for a population

    def __init__(self, trials):
        self.trials = trials
        self._tune_controller = self
        self._cached_trial_decisions = {}

    def get_trials(self):
        return self.trials

    def get_live_trials(self):
        return [t for t in self.trials if t.status not in ("TERMINATED", "ERROR")]


def test_a_member_waiting_for_a_sync_that_no_running_member_can_bring_is_run_again(tmp_path):
    """A resumed population: member 1 (resumed after epoch 2) reaches the sync point and pauses to wait for
    member 0 (resumed after epoch 3), which ends at its last epoch before the scheduler saw it there. Ray's
    synchronous PBT would never run member 1 again (the population test's run hung); ours runs it."""
    pbt = scheduler(load_space(space_file(tmp_path)))
    pbt.set_search_properties("val_acc", "max")
    from ray.tune.experiment import Trial

    members = [Trial("__fake", config={"values": {}}, stub=True, experiment_tag=tag) for tag in "ab"]
    tune = Controller(members)
    for member in members:
        pbt.on_trial_add(tune, member)
        member.set_status(Trial.RUNNING)
    assert pbt.on_trial_result(tune, members[1], {"epochs_run": 3, "val_acc": 0.5}) == "PAUSE"
    members[1].set_status(Trial.PAUSED)
    members[0].set_status(Trial.TERMINATED)  # ended by the stopper after its last epoch
    assert pbt.choose_trial_to_run(tune) is members[1]
    members[1].set_status(Trial.RUNNING)
    assert pbt.choose_trial_to_run(tune) is None  # while one runs, the usual rule


def test_two_runs_with_one_seed_perturb_alike(tmp_path):
    """The resampled values come from generators seeded by ``study.seed``, and the scheduler seeds the
    global generator Ray's PBT decides with (whom to copy, perturb or draw again): one seed, one sequence of
    perturbations, given the same results; another seed, another."""
    import random

    lr = LAMBDA + "\n  optim.lr: {type: float, low: 0.001, high: 0.1, log: true}"

    def draws(seed):
        space = load_space(space_file(tmp_path, study=f", seed: {seed}", space=lr))
        scheduler(space)  # seeds the decisions
        decisions = [random.random() for _ in range(3)]
        resample = mutations(space.params, space.study.seed)["values"]["optim.lr"]
        return decisions + [resample() for _ in range(3)]

    assert draws(7) == draws(7) and draws(7) != draws(8)


CAPPED = """
import json, resource, signal, sys
from pathlib import Path
from search.pbt import Member
from trainer.files import WriteError, atomic_write

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a file of at most 4 KiB: the disk fills mid-write
folder = Path(sys.argv[1])
errors = []
for write in (lambda: Member(3, [{"trial": 3, "epoch": 2, "donor": 1, "values": {"x": "y" * 8000}}]).save(folder),
              lambda: atomic_write(folder / "last.pt", bytes(8000))):
    try:
        write()
    except WriteError as err:
        errors.append(str(err))
print(json.dumps(errors))
"""


def test_a_write_that_fails_midway_leaves_the_members_last_files_whole(tmp_path):
    """A member's lineage.json and last.pt (its own, or the one PBT copies into its folder) are written
    whole or not at all: a write that fails halfway (a file-size limit stands in for a full disk) leaves
    the previous file as it was, and no partial file beside it."""
    Member(3).save(tmp_path)
    before = (tmp_path / "lineage.json").read_text()
    (tmp_path / "last.pt").write_bytes(b"the previous state")
    out = subprocess.run([sys.executable, "-c", CAPPED, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [f"[Errno 27] cannot write {tmp_path / name}: File too large"
                                      for name in ("lineage.json", "last.pt")]
    assert (tmp_path / "lineage.json").read_text() == before and json.loads(before)["trial"] == 3
    assert (tmp_path / "last.pt").read_bytes() == b"the previous state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "lineage.json"]


def slow_save_member() -> type:
    """A Tune trainable (a class, so that its save can be slow: a second) that reports ``score`` after each
    epoch, ``lag`` seconds after a wall-clock tick (members in step). Ray is imported here."""
    from ray import tune

    class SlowSave(tune.Trainable):
        def setup(self, config):
            self.epoch = config["start"]

        def step(self):
            time.sleep(2.0 - time.time() % 1.0 + self.config["lag"])
            self.epoch += 1
            return {"score": self.config["score"], "epochs_run": self.epoch}

        def save_checkpoint(self, checkpoint_dir):
            time.sleep(1.0)
            return {"epoch": self.epoch}

        def load_checkpoint(self, checkpoint):
            self.epoch = checkpoint["epoch"]

    return SlowSave


@pytest.mark.long(25)
def test_a_member_that_copies_another_while_tune_saves_it_still_trains_every_epoch(tmp_path):
    """The CI failure of 2026-12-03: synchronous PBT, member A ahead (resumed at epoch 2) and worse, member B
    behind (at 1) and better. A reports epoch 3 and pauses to wait, saving (for a second); B's epoch 2 comes
    0.3 s later, and A copies B while Tune still saves A. Tune kept a STOP for A then and ended it after its
    next epoch (3 of 4, in every run without search.compat.forget_stale_stop). Both must train all 4."""
    import ray
    from ray import tune

    space = load_space(space_file(tmp_path, space=LAMBDA))
    members = [{"start": 2, "score": 0.1, "lag": 0.0, "values": {"lambda.start": 0.5}},
               {"start": 1, "score": 0.9, "lag": 0.3, "values": {"lambda.start": 0.5}}]
    ends = {}

    class Ends(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            ends[trial.trial_id] = trial.last_result["epochs_run"]

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        tune.Tuner(tune.with_resources(slow_save_member(), {"cpu": 1}),
                   param_space={k: tune.choice([m[k] for m in members]) for k in ("start", "score", "lag")}
                   | {"values": {"lambda.start": tune.choice([0.5])}},
                   tune_config=tune.TuneConfig(
                       search_alg=tune.search.BasicVariantGenerator(points_to_evaluate=members),
                       scheduler=scheduler(space), metric="score", mode="max", num_samples=2),
                   run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), stop={"epochs_run": 4}, verbose=0,
                                             callbacks=[Ends()],  # a save after every epoch, as the trials' own
                                             checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1))).fit()
    finally:
        ray.shutdown()
    assert sorted(ends.values()) == [4, 4], ends


@pytest.mark.long(100)
def test_a_population_copies_members_resumes_after_its_driver_died_and_exports_the_lambda_it_found(tmp_path):
    """spaces/lambda_pbt.yaml with 2 members x 4 epochs, PBT every 2: the worse member copies the better;
    the driver is SIGKILLed mid-population and the same command resumes it from the members' last checkpoints; each
    member is a trial of the study with its lambda per epoch and its lineage; export writes the best
    member's lambda as a table, and retraining 6 epochs replays it stretched."""
    url = f"sqlite:///{tmp_path}/p.db"
    shipped = yaml.safe_load((ROOT / "spaces" / "lambda_pbt.yaml").read_text())  # at a tiny size
    shipped["study"].update(name="pop", population=2, control=0)
    shipped["base"]["data"].update(limit=48, timesteps=2, batch_size=16)
    shipped["base"]["model"]["width"] = 4
    shipped["base"]["heads"]["exits"] = ["layer1.0"]
    shipped["base"]["optim"]["epochs"] = 4
    shipped["final"]["optim.epochs"] = 6
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(shipped))
    cmd = [sys.executable, "search/run.py", "--space", str(tmp_path / "space.yaml"), "--storage", url,
           "--backend", "ray"]
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    deadline = time.time() + 300
    try:
        while max((len(load_history(d)) for d in (tmp_path / "pop" / "trials").glob("*") if (d / "last.pt").exists()),
                  default=0) < 1:  # before PBT's first copy
            assert time.time() < deadline and driver.poll() is None
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    first = communicate(driver)
    assert all(t.state == TrialState.RUNNING for t in optuna.load_study(study_name="pop", storage=url).get_trials())
    saved = {int(d.name): len(load_history(d)) for d in (tmp_path / "pop" / "trials").glob("*")}

    try:
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # ~30 s alone
    except subprocess.TimeoutExpired as hung:  # once in a loaded suite: say where the population stood
        said = b"".join(part or b"" for part in (hung.stdout, hung.stderr)).decode(errors="replace")  # bytes, here
        pytest.fail(f"the resumed population hung for {hung.timeout:.0f} s; its output ends:\n{said[-8000:]}")
    out = first + again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "the population's driver died; members [0, 1] go on from their last checkpoints" in again.stdout
    for number, epochs in saved.items():  # each goes on from its own last.pt, not from epoch 0 (Ray's workers
        if epochs:  # may finish an epoch more after their driver died)
            resumed = re.findall(rf"trial {number} resumes after epoch (\d)/4", again.stdout)
            assert resumed and int(resumed[0]) >= epochs, (number, epochs, resumed)
    study = optuna.load_study(study_name="pop", storage=url)
    members = study.get_trials()
    assert len(members) == 2 and all(t.state == TrialState.COMPLETE for t in members), out
    # synchronous PBT every 2 epochs: once every member has 2, the worse copies the better (a member that had
    # 2 when its driver died joins at 3). One that had 3 ends at its next epoch, the last, which Tune's stopper
    # takes before PBT sees it: the other has no live member to copy then, so a copy is owed unless one resumed at 3
    copies = [e for t in members for e in t.user_attrs["copies"]]
    assert all(e["epoch"] in (2, 3) for e in copies), copies
    resumed_at = [int(e) for e in re.findall(r"trial \d resumes after epoch (\d)/4", again.stdout)]
    assert copies or max(resumed_at, default=0) >= 3, (saved, resumed_at)
    for e in copies:  # the log says so
        assert f"trial {e['trial']} copies trial {e['donor']} after epoch {e['epoch']} and goes on with" in out
    for t in members:
        history = t.user_attrs["history"]
        assert len(history) == 4 and t.user_attrs["lambda_trajectory"] == [h["lambda"] for h in history]
        assert set(t.intermediate_values) <= {1, 2, 3, 4} and 4 in t.intermediate_values
        if t.user_attrs["lineage"]:  # its first epochs are its donor's, then it goes on with the perturbed lambda
            e = t.user_attrs["lineage"][-1]
            donor = study.trials[e["donor"]].user_attrs["lambda_trajectory"]
            assert t.user_attrs["lambda_trajectory"][e["epoch"]:] == [e["values"]["lambda.start"]] * (4 - e["epoch"])
            assert t.user_attrs["lambda_trajectory"][:e["epoch"]] == donor[:e["epoch"]] or len(t.user_attrs["lineage"]) > 1
            assert t.user_attrs["config"]["lambda"]["start"] == e["values"]["lambda.start"]

    (figure,) = [x.figure for x in build(study).sections if x.title == "Population: lambda over epochs"]
    marks = [trace for trace in figure.data if trace.mode == "markers"]  # the copies, on the members' lambda
    assert sorted(x for trace in marks for x in trace.x) == sorted(e["epoch"] + 1 for e in copies)

    assert export_cli.main(["--study", "pop", "--storage", url, "--out", str(tmp_path / "exp")]) == 0
    best = yaml.safe_load((tmp_path / "exp" / "best.yaml").read_text())
    table = best["lambda"]["table"]
    assert best["lambda"]["schedule"] == "table" and table == study.best_trial.user_attrs["lambda_trajectory"]
    assert retrain_cli.main([str(tmp_path / "exp" / "best.yaml"), "--out", str(tmp_path / "final")]) == 0
    lambdas = [r["metrics"]["lambda"] for r in load_history(tmp_path / "final")]  # the retraining's last.pt
    stretched = np.interp(np.arange(6) / 5, np.linspace(0, 1, len(table)), table)
    assert len(lambdas) == 6 and lambdas == pytest.approx(stretched.tolist(), abs=1e-12)


@pytest.mark.long(50)
def test_pb2_draws_the_copies_values_from_a_gp_bandit(tmp_path):
    """study.scheduler pb2: PBT whose perturbed values come from Ray's PB2 (a Gaussian-process bandit over
    the members' results), clipped into their range; the rest is PBT's."""
    url = f"sqlite:///{tmp_path}/p.db"
    path = space_file(tmp_path, study=", population: 2, perturbation_interval: 1")
    path.write_text(path.read_text().replace("scheduler: pbt", "scheduler: pb2").replace("epochs: 6", "epochs: 2"))
    proc = subprocess.run([sys.executable, "search/run.py", "--space", str(path), "--storage", url, "--backend", "ray"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "a population of 2 on Ray (PB2 every 1 epochs, lambda.start)" in proc.stdout
    members = optuna.load_study(study_name="pop", storage=url).get_trials()
    assert len(members) == 2 and all(t.state == TrialState.COMPLETE for t in members)
    (copy,) = [e for t in members for e in t.user_attrs["copies"]]  # synchronous: the worse copies at epoch 1
    assert copy["epoch"] == 1 and 0.0 <= copy["values"]["lambda.start"] <= 1.0
    assert f"trial {copy['trial']} copies trial {copy['donor']} after epoch 1" in proc.stdout + proc.stderr
