"""End to end: a tiny study in SQLite, resumed, exported, retrained, read by optuna-dashboard and optuna's CLI."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import plotly
import pytest
import torch
import yaml
from optuna.trial import TrialState

from search import export as export_cli
from search import retrain as retrain_cli
from search import run as run_cli
from search.optuna_backend import make_pruner, make_sampler
from search.space import load_space
from trainer.config import load

from conftest import ROOT

BASE = """
base:
  data: {limit: 64, timesteps: 2, batch_size: 32}
  model: {width: 4}
  heads: {exits: [layer1.0]}
  optim: {epochs: 2}
final:
  optim.epochs: 3
"""


def space_file(tmp_path, study=", pruner: none", space="", base=BASE):
    text = f"study: {{name: tiny, seed: 0{study}}}\n{base}\nspace:\n" + (
        space or "  lambda.start: {type: float, low: 0.1, high: 1.0}\n"
        "  lambda.schedule: {type: categorical, choices: [linear, cosine]}\n"
    )
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def trials(url, name="tiny"):
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_run_resume_export_retrain(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/tiny.db"
    space = space_file(tmp_path)
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "trial 0 complete value=" in out and "best=" in out and "lambda.start=" in out
    done = trials(url)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 2
    attrs = done[0].user_attrs
    assert attrs["config"]["heads"]["exits"] == ["layer1.0"] and attrs["epochs_run"] == 2
    assert len(attrs["history"]) == 2 and "val_acc" in attrs["history"][0]
    assert "layer1.0.conv1" in attrs["grad_stats"]["first"] and "stem_lif" in attrs["firing_rates"]
    assert list(done[0].intermediate_values) == [1, 2]  # step = epochs trained

    # the same command tops the study up to the study-wide budget, then does nothing more
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "3"]) == 0
    assert len(trials(url)) == 3
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "3"]) == 0
    assert "already has 3 trials" in capsys.readouterr().out and len(trials(url)) == 3

    assert export_cli.main(["--study", "tiny", "--storage", url, "--out", str(tmp_path / "exp")]) == 0
    best_file = tmp_path / "exp" / "best.yaml"
    exported = yaml.safe_load(best_file.read_text())
    best = optuna.load_study(study_name="tiny", storage=url).best_trial
    assert exported["provenance"]["trial"] == best.number and exported["provenance"]["values"] == [best.value]
    assert exported["provenance"]["final"] == {"optim.epochs": 3}
    cfg = load(best_file)  # the trainer accepts it as is
    assert cfg.lambda_.start == pytest.approx(best.params["lambda.start"])

    out_dir = tmp_path / "retrained"
    assert retrain_cli.main([str(best_file), "--out", str(out_dir)]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and 0 <= metrics["test_acc"] <= 1
    blob = torch.load(out_dir / "model.pt", weights_only=True)
    assert not any(k.startswith("heads") for k in blob["state_dict"])


def test_top_k_export(tmp_path):
    url = f"sqlite:///{tmp_path}/tiny.db"
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", url, "--n-trials", "3"]) == 0
    assert export_cli.main(["--study", "tiny", "--storage", url, "--top-k", "2", "--out", str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.glob("trial_*.yaml"))
    assert len(files) == 2
    values = [yaml.safe_load((tmp_path / f).read_text())["provenance"]["values"][0] for f in files]
    assert max(values) == max(t.value for t in trials(url))


def test_diverging_trial_fails_with_reason_and_study_goes_on(tmp_path):
    url = f"sqlite:///{tmp_path}/tiny.db"
    space = space_file(tmp_path, space="  optim.lr: {type: float, low: 1.0e+30, high: 1.0e+31}\n"
                       "  optim.momentum: {type: float, low: 0.0, high: 0.0}\n")
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "2"]) == 0
    done = trials(url)
    assert [t.state for t in done] == [TrialState.FAIL] * 2
    assert all("training loss is" in t.user_attrs["fail_reason"] for t in done)


def test_multi_objective_pareto_export(tmp_path):
    url = f"sqlite:///{tmp_path}/tiny.db"
    space = space_file(tmp_path, study=", metric: [val_acc, spike_rate], sampler: nsga2, pruner: none")
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "3"]) == 0
    done = trials(url)
    assert all(len(t.values) == 2 and 0 <= t.values[1] <= 1 for t in done)
    assert export_cli.main(["--study", "tiny", "--storage", url, "--pareto", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("trial_*.yaml"))) >= 1


def test_journal_storage(tmp_path):
    url = f"journal:{tmp_path}/tiny.log"
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", url, "--n-trials", "2"]) == 0
    assert len(trials(optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"{tmp_path}/tiny.log")))) == 2


def test_other_samplers_and_pruners_run(tmp_path, capsys):
    for i, (sampler, pruner) in enumerate([("random", "hyperband"), ("gp", "successive_halving"),
                                           ("cmaes", "median")]):
        url = f"sqlite:///{tmp_path}/s{i}.db"
        space = space_file(tmp_path, study=f", sampler: {sampler}, pruner: {pruner}",
                           space="  lambda.start: {type: float, low: 0.1, high: 1.0}\n")
        assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "2"]) == 0
        assert f"({sampler}, pruner {pruner} from epoch 1)" in capsys.readouterr().out
        study = optuna.load_study(study_name="tiny", storage=url)
        assert len(study.trials) == 2 and all(t.intermediate_values for t in study.trials)
        loaded = load_space(space)
        assert type(make_sampler(loaded)).__name__.lower().startswith(sampler[:2])
        assert type(make_pruner(loaded)).__name__.lower().startswith(pruner.replace("_", "")[:6])


def test_min_epochs_defaults_to_a_third_of_training(tmp_path):
    for epochs, min_epochs, expected in [(2, "", 1), (8, "", 3), (8, "null", 3), (300, "", 100), (6, 2, 2),
                                         (6, 10, 6)]:
        study = ", pruner: median" + (f", min_epochs: {min_epochs}" if min_epochs else "")
        space = load_space(space_file(tmp_path, study=study, base=BASE.replace("epochs: 2", f"epochs: {epochs}")))
        assert space.min_epochs() == expected, (epochs, min_epochs)


@pytest.mark.parametrize("pruner", ["median", "successive_halving", "hyperband"])
def test_no_trial_is_pruned_before_min_epochs(tmp_path, pruner):
    space = load_space(space_file(tmp_path, study=f", pruner: {pruner}, min_epochs: 2",
                                  base=BASE.replace("epochs: 2", "epochs: 6")))
    # a fixed name: Hyperband picks each trial's bracket from a hash of the study name and trial number
    study = optuna.create_study(study_name="min_epochs", direction="maximize", pruner=make_pruner(space))
    for _ in range(9):  # trials that learned well and ran all 6 epochs
        good = study.ask()
        for step in range(1, 7):
            good.report(0.9, step)
            assert not good.should_prune()  # (successive halving records its rungs here)
        study.tell(good, 0.9)
    first_pruned = []
    for _ in range(4):  # trials that learn nothing; Hyperband's later brackets start at a later rung
        bad = study.ask()
        for step in range(1, 7):
            bad.report(0.1, step)
            if bad.should_prune():
                first_pruned.append(step)
                break
        study.tell(bad, state=optuna.trial.TrialState.PRUNED)
    assert first_pruned and min(first_pruned) == 2, first_pruned
    if pruner != "hyperband":
        assert first_pruned == [2, 2, 2, 2]


def test_tpe_start_up_scales_with_the_budget(tmp_path):
    space = load_space(space_file(tmp_path))
    counts = {}
    for n in (4, 12, 40, 200):
        space.study.n_trials = n
        counts[n] = make_sampler(space)._n_startup_trials
    assert counts == {4: 3, 12: 3, 40: 10, 200: 10}


def test_dashboard_and_optuna_cli_read_the_study(tmp_path):
    url = f"sqlite:///{tmp_path}/tiny.db"
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", url, "--n-trials", "2"]) == 0
    from optuna_dashboard import wsgi

    app = wsgi(url)

    def get(path):
        environ = {"PATH_INFO": path, "HTTP_ACCEPT_ENCODING": "gzip"}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, h, exc_info=None: status.append(s)))
        return status[0], body

    status, body = get("/api/studies")
    assert status.startswith("200")
    studies = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in studies] == ["tiny"]
    status, body = get(f"/api/studies/{studies[0]['study_id']}")
    detail = json.loads(body)
    assert status.startswith("200") and len(detail["trials"]) == 2 and detail["objective_names"] == ["val_acc"]

    proc = subprocess.run(
        [str(Path(sys.executable).parent / "optuna"), "trials", "--study-name", "tiny", "--storage", url, "-f", "json"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows)


def test_killed_worker_leaves_no_running_trial(tmp_path):
    url = f"sqlite:///{tmp_path}/tiny.db"
    space = space_file(tmp_path, study=", pruner: none, heartbeat: 1", base=BASE.replace("epochs: 2", "epochs: 50"))
    cmd = [sys.executable, "search/run.py", "--space", str(space), "--storage", url, "--n-trials", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(1)
        try:
            if any(t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run") for t in trials(url)):
                break
        except KeyError:  # study not created yet
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [t.state for t in trials(url)] == [TrialState.RUNNING]
    time.sleep(4)  # three missed heartbeats
    space.write_text(space.read_text().replace("epochs: 50", "epochs: 1"))
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "failed stale trials left RUNNING by a dead worker: [0]" in resumed.stdout
    states = [t.state for t in trials(url)]
    assert TrialState.RUNNING not in states and states[0] == TrialState.FAIL
    assert states.count(TrialState.COMPLETE) == 1  # the budget counts the failed trial too


def test_report_is_one_self_contained_html_with_every_section(tmp_path):
    from html.parser import HTMLParser

    from search import report as report_cli

    url = f"sqlite:///{tmp_path}/tiny.db"
    space = space_file(tmp_path, space="  lambda.start: {type: float, low: 0.1, high: 1.0}\n"
                       "  data.timesteps: {type: int, low: 1, high: 3}\n"
                       "  heads.exits: {type: subset, choices: [layer1.0]}\n")
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "4"]) == 0
    out = tmp_path / "report.html"
    assert report_cli.main(["--study", "tiny", "--storage", url, "--out", str(out)]) == 0

    class Parse(HTMLParser):
        def __init__(self):
            super().__init__()
            self.headings, self.divs, self.scripts, self.external, self._tag = [], 0, [], [], None

        def handle_starttag(self, tag, attrs):
            self._tag = tag
            attrs = dict(attrs)
            self.divs += tag == "div" and "plotly-graph-div" in attrs.get("class", "")
            if tag == "script" and attrs.get("src"):
                self.external.append(attrs["src"])

        def handle_data(self, data):
            if self._tag == "h2":
                self.headings.append(data)
            if self._tag == "script":
                self.scripts.append(data)

    page = Parse()
    page.feed(out.read_text())
    assert page.headings == [
        "Optimization history", "Parameter importances", "Parallel coordinates", "Lambda curves of the top trials",
        "Per-layer gradient magnitude: best trial vs. best without heads", "val_acc vs. timesteps",
    ]
    assert page.divs == 6 and not page.external  # plotly.js is inlined: opens offline
    assert sum("Plotly.newPlot" in s for s in page.scripts) == 6
    study = optuna.load_study(study_name="tiny", storage=url)
    assert f"trial {study.best_trial.number}" in out.read_text()

    # Draw every figure of the file in headless Chromium: plotly.js must accept it and paint traces.
    from kaleido.scopes.plotly import PlotlyScope
    from PIL import Image

    chromium = PlotlyScope(plotlyjs=str(Path(plotly.__file__).parent / "package_data" / "plotly.min.js"))
    for script in (s for s in page.scripts if "Plotly.newPlot" in s):
        values, pos = [], script.index("Plotly.newPlot(") + len("Plotly.newPlot(")
        for _ in range(3):  # div id, data, layout
            while script[pos] in " \n,":
                pos += 1
            value, pos = json.JSONDecoder().raw_decode(script, pos)
            values.append(value)
        _, data, layout = values
        png = chromium.transform({"data": data, "layout": layout}, format="png", width=600, height=400)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        colours = image.getcolors(maxcolors=1 << 16) or []
        saturated = sum(n for n, (r, g, b) in colours if max(r, g, b) - min(r, g, b) > 60)
        assert image.size == (600, 400) and len(colours) > 20 and saturated > 50, layout.get("title")
