"""End to end: a tiny study in SQLite, resumed, exported, retrained, read by optuna-dashboard and optuna's CLI."""

import io
import json
import subprocess
import sys
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
from search.pruners import make_pruner
from search.samplers import make_sampler
from search.study import dominates, select
from search.space import load_space
from trainer.config import load
from trainer.data import load_data
from trainer.fit import evaluate

BASE = """
base:
  data: {limit: 64, timesteps: 2, batch_size: 32}
  model: {width: 4}
  heads: {exits: [layer1.0]}
  optim: {epochs: 2}
final:
  optim.epochs: 3
"""


def space_file(tmp_path, study=", pruner: none", space="", base=BASE, control="0"):
    text = f"study: {{name: tiny, seed: 0, control: {control}{study}}}\n{base}\nspace:\n" + (
        space or "  lambda.start: {type: float, low: 0.1, high: 1.0}\n"
        "  lambda.schedule: {type: categorical, choices: [linear, cosine]}\n"
    )
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def trials(url, name="tiny"):
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_run_resume_export_retrain(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path}/tiny.db"
    space = space_file(tmp_path, control="false")  # the control arm: one run of the base without heads
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "and one run of the base without heads (tiny.control)" in out
    assert "control trial 0 complete value=" in out and "trial 1 complete value=" in out and "lambda.start=" in out
    assert "| best with heads=" in out and ", without=" in out and "(control trial 0)" in out
    (reference,) = trials(url, "tiny.control")  # a study of its own, in the same storage
    done = trials(url)
    assert reference.state == TrialState.COMPLETE and not reference.params
    assert reference.user_attrs["config"]["heads"]["exits"] == [] and reference.user_attrs["epochs_run"] == 2
    assert [t.state for t in done] == [TrialState.COMPLETE] * 2
    attrs = done[0].user_attrs
    assert attrs["config"]["heads"]["exits"] == ["layer1.0"] and attrs["epochs_run"] == 2
    assert len(attrs["history"]) == 2 and "val_acc" in attrs["history"][0]
    assert "layer1.0.conv1" in attrs["grad_stats"]["first"] and "stem_lif" in attrs["firing_rates"]
    assert list(done[0].intermediate_values) == [1, 2]  # step = epochs trained
    assert "test" not in attrs and attrs["starts"] == [0]  # trials never read the test split
    flow = attrs["grad_flow"]  # |dL/dx| at every LIF input, per epoch; the first epoch split by loss part
    assert len(flow["layers"]) == 19 and len(flow["mean"]) == len(flow["var"]) == 2
    assert set(flow["split"]) == {"main", "heads"} and "split" not in reference.user_attrs["grad_flow"]
    assert sorted(p.name for p in (tmp_path / "tiny.control" / "trials" / "0").iterdir()) == ["config.yaml", "model.pt"]
    trial_dir = tmp_path / "tiny" / "trials" / "0"
    assert sorted(p.name for p in trial_dir.iterdir()) == ["config.yaml", "model.pt"]  # last.pt dropped

    # the same command tops the study up to the study-wide budget, then does nothing more
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "3"]) == 0
    assert len(trials(url)) == 3 and len(trials(url, "tiny.control")) == 1  # the control arm's one run is done
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "3"]) == 0
    assert "already has 3 trials" in capsys.readouterr().out and len(trials(url)) == 3

    assert export_cli.main(["--study", "tiny", "--storage", url, "--out", str(tmp_path / "exp")]) == 0
    best_file = tmp_path / "exp" / "best.yaml"
    best_model = torch.load(tmp_path / "exp" / "best_model.pt", weights_only=True)  # from the artifact store
    kept = torch.load(tmp_path / "tiny" / "trials" / str(trials(url)[0].number) / "model.pt", weights_only=True)
    best = max(trials(url), key=lambda t: (t.value, -t.number))  # of the heads arm, whatever the control's value
    trained = torch.load(tmp_path / "tiny" / "trials" / str(best.number) / "model.pt", weights_only=True)
    assert all(torch.equal(best_model["state_dict"][k], v) for k, v in trained["state_dict"].items())
    assert kept["metrics"]["val_acc"] == trials(url)[0].value
    exported = yaml.safe_load(best_file.read_text())
    assert exported["provenance"]["trial"] == best.number and exported["provenance"]["values"] == [best.value]
    assert exported["provenance"]["final"] == {"optim.epochs": 3}
    cfg = load(best_file)  # the trainer accepts it as is
    assert cfg.lambda_.start == pytest.approx(best.params["lambda.start"])

    out_dir = tmp_path / "retrained"
    read = []
    monkeypatch.setattr("trainer.fit.evaluate", lambda model, batches, *a, **k: (read.append(batches),
                                                                                 evaluate(model, batches, *a, **k))[1])
    monkeypatch.setattr("trainer.fit.load_data", lambda *a, **k: bundles.append(load_data(*a, **k)) or bundles[-1])
    bundles = []
    assert retrain_cli.main([str(best_file), "--out", str(out_dir), "--set", "data.limit=null"]) == 0
    assert "for 3 epochs on digits train + validation" in capsys.readouterr().out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and 0 <= metrics["test_acc"] <= 1 and metrics["test_energy"] > 0
    assert "val_acc" not in metrics
    data = bundles[0]
    assert data.val is None and len(data.train.x) == 1150 + 288  # digits' train and validation splits
    assert read == [data.test]  # the test set, once, and nothing else evaluated
    blob = torch.load(out_dir / "model.pt", weights_only=True)
    assert not any(k.startswith("heads") for k in blob["state_dict"])


def test_top_k_export_writes_the_k_best_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/tiny.db"
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", url, "--n-trials", "4"]) == 0
    assert export_cli.main(["--study", "tiny", "--storage", url, "--top-k", "2", "--out", str(tmp_path)]) == 0
    ranked = sorted(trials(url), key=lambda t: (-t.value, t.number))
    exported = {int(p.stem.split("_")[1]) for p in tmp_path.glob("trial_*.yaml")}
    assert len(exported) == 2
    assert sorted(t.value for t in trials(url) if t.number in exported) == sorted(t.value for t in ranked[:2])
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["provenance"]["values"] == [ranked[0].value]
    assert [t.number for t in select(optuna.load_study(study_name="tiny", storage=url), top_k=4)] == \
        [t.number for t in ranked]  # best first


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
    space = space_file(tmp_path, study=", metric: [val_acc, energy], sampler: nsga2, pruner: none")
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "3"]) == 0
    done = trials(url)
    assert all(len(t.values) == 2 and t.values[1] == t.user_attrs["history"][-1]["energy"] > 0 for t in done)
    assert export_cli.main(["--study", "tiny", "--storage", url, "--pareto", "--out", str(tmp_path)]) == 0
    front = {int(p.stem.split("_")[1]) for p in tmp_path.glob("trial_*.yaml")}
    study = optuna.load_study(study_name="tiny", storage=url)
    assert front == {t.number for t in study.best_trials}  # Optuna's own Pareto front
    on, off = [t for t in done if t.number in front], [t for t in done if t.number not in front]
    assert not any(dominates(a, b, study.directions) for a in done for b in on)  # nothing beats the front
    assert all(any(dominates(a, b, study.directions) for a in on) for b in off)  # each other trial is beaten
    member = tmp_path / f"trial_{min(front)}.yaml"  # a point of the front becomes a final model
    assert retrain_cli.main([str(member), "--out", str(tmp_path / "final")]) == 0
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["test_energy"] > 0 and "test_sops" in metrics


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


def test_nsga2_population_fits_the_budget(tmp_path):
    space = load_space(space_file(tmp_path, study=", metric: [val_acc, energy], sampler: nsga2, pruner: none"))
    sizes = {}
    for n in (4, 10, 30, 500):
        space.study.n_trials = n
        sizes[n] = make_sampler(space)._population_size
    assert sizes == {4: 4, 10: 4, 30: 10, 500: 50}  # at least three generations up to Optuna's 50


def test_dashboard_and_optuna_cli_read_the_study(tmp_path):
    url = f"sqlite:///{tmp_path}/tiny.db"
    assert run_cli.main(["--space", str(space_file(tmp_path)), "--storage", url, "--n-trials", "2"]) == 0
    from optuna_dashboard import wsgi

    from optuna.artifacts import FileSystemArtifactStore

    app = wsgi(url, artifact_store=FileSystemArtifactStore(str(tmp_path / "tiny" / "artifacts")))

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
    artifacts = detail["trials"][0]["artifacts"]  # what the dashboard lists on the trial's page
    assert sorted(a["filename"] for a in artifacts) == ["config.yaml", "model.pt"]
    model = next(a for a in artifacts if a["filename"] == "model.pt")
    status, body = get(f"/artifacts/{studies[0]['study_id']}/{detail['trials'][0]['trial_id']}/{model['artifact_id']}")
    assert status.startswith("200") and torch.load(io.BytesIO(body), weights_only=True)["state_dict"]

    proc = subprocess.run(
        [str(Path(sys.executable).parent / "optuna"), "trials", "--study-name", "tiny", "--storage", url, "-f", "json"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows)


def test_report_is_one_self_contained_html_with_every_section(tmp_path, capsys):
    from html.parser import HTMLParser

    from search import report as report_cli

    url = f"sqlite:///{tmp_path}/tiny.db"
    space = space_file(tmp_path, space="  lambda.start: {type: float, low: 0.1, high: 1.0}\n"
                       "  data.timesteps: {type: int, low: 1, high: 3}\n"
                       "  heads.exits: {type: subset, choices: [layer1.0]}\n", control="false")
    assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "4"]) == 0
    storage = optuna.storages.get_storage(url)
    dashboard = lambda: {k: v for k, v in storage.get_study_system_attrs(storage.get_study_id_from_name("tiny"))
                         .items() if k != "dashboard:note_ver"}  # noqa: E731 - the note and figures, unversioned
    published = dashboard()
    assert any(k.startswith("dashboard:") for k in published)
    out = tmp_path / "report.html"
    assert report_cli.main(["--study", "tiny", "--storage", url, "--out", str(out)]) == 0
    # the search's end publishes from the dashboard's sections only (no history, no importances): the same
    # note and figures as the report's full build
    assert dashboard() == published
    study = optuna.load_study(study_name="tiny", storage=url)
    slim = [x.title for x in report_cli.build(study, dashboard=True).sections]
    assert "Parameter importances" not in slim and "Optimization history" not in slim and len(slim) == 4

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
    best = select(study)[0]
    headed = bool(best.user_attrs["config"]["heads"]["exits"])
    assert page.headings == [
        "Optimization history", "Learning curves and lambda of the top trials",
        "Gradient flow relative to the last layer: best with heads vs. best without",
        "The heads' share of the gradient", "val_acc vs. timesteps", "Gradient at initialisation: the study's base",
        "Parameter importances",
    ]
    assert page.divs == 5 + headed and not page.external  # plotly.js is inlined: opens offline
    assert sum("Plotly.newPlot" in s for s in page.scripts) == 5 + headed
    text = out.read_text()
    (reference,) = optuna.load_study(study_name="tiny.control", storage=url).trials
    assert f"trial {best.number}: val_acc={best.value:.4g}" in text
    assert f"{best.value - reference.value:+.4g} at one seed" in text  # best with heads - without
    spent = sum(t.user_attrs["epochs_run"] for t in [*study.trials, reference])
    assert f"{spent} trained; {2 * (len(study.trials) + 1)} if every trial had run its full length" in text
    assert "relative to its last layer, the best trial with heads keeps" in text  # computed from the data
    assert "Too few complete trials to estimate them (4 of the 10 needed" in text
    assert "Verdict: vanishes: the first spiking layer gets" in text  # the default atan surrogate, at init
    assert study.user_attrs["init_gradients"]["layers"][0] == "stem_lif"  # measured once, kept in the study

    # the same summary and the SNN figures inside optuna-dashboard, as its web app serves them
    from optuna_dashboard import wsgi

    app = wsgi(url)
    environ = {"PATH_INFO": f"/api/studies/{study._study_id}", "HTTP_ACCEPT_ENCODING": "gzip"}
    setup_testing_defaults(environ)
    status = []
    detail = json.loads(b"".join(app(environ, lambda s, h, exc_info=None: status.append(s))))
    assert status[0].startswith("200")
    assert f"**with heads - without, one run each**: {best.value - reference.value:+.4g}" in detail["note"]["body"]
    figures = {g["id"]: json.loads(g["graph_object"]) for g in detail["plotly_graph_objects"]}
    titles = sorted(f["layout"]["title"]["text"] for f in figures.values())
    assert titles == sorted(["Learning curves and lambda of the top trials",
                             "Gradient flow relative to the last layer: best with heads vs. best without",
                             "val_acc vs. timesteps"] + ["The heads' share of the gradient"] * headed)
    assert all(f["data"] for f in figures.values())

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


def test_artifacts_in_an_s3_bucket(tmp_path, capsys, monkeypatch):
    """study.artifacts: s3://bucket keeps the trial files in S3 (here moto's in-process S3, no network),
    and export fetches the best model from there."""
    import boto3
    from moto import mock_aws

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    url = f"sqlite:///{tmp_path}/tiny.db"
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="snn-trials")
        space = space_file(tmp_path, study=", pruner: none, artifacts: s3://snn-trials")
        assert run_cli.main(["--space", str(space), "--storage", url, "--n-trials", "1"]) == 0
        assert "--artifact-dir" not in capsys.readouterr().out  # the dashboard's CLI serves folders only
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="snn-trials")["Contents"]]
        assert len(keys) == 2  # model.pt and config.yaml of the one trial
        assert export_cli.main(["--study", "tiny", "--storage", url, "--out", str(tmp_path / "exp")]) == 0
    assert torch.load(tmp_path / "exp" / "best_model.pt", weights_only=True)["state_dict"]
    assert not (tmp_path / "tiny" / "artifacts").exists()


def test_a_study_never_mixes_setups(tmp_path, capsys):
    """The stored study knows what it searches: another base or space is refused with the fix named."""
    url = f"sqlite:///{tmp_path}/tiny.db"
    space = str(space_file(tmp_path))
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "1"]) == 0
    capsys.readouterr()
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "2", "--set", "data.timesteps=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "study 'tiny' was created with base.data.timesteps=2, this run has 3" in err
    assert "--study-name NAME" in err and len(trials(url)) == 1  # nothing was added

    # a study made under another default (here: the surrogate before atan) goes on with the fix it names
    old = ["--space", space, "--storage", url, "--study-name", "old"]
    assert run_cli.main([*old, "--n-trials", "1", "--set", "neuron.surrogate=rectangle"]) == 0
    capsys.readouterr()
    assert run_cli.main([*old, "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "created with base.neuron.surrogate='rectangle', this run has 'atan'" in err
    fix = err.split("--set ")[1].split(" to go on")[0]
    assert fix == 'neuron.surrogate="rectangle"'
    assert run_cli.main([*old, "--n-trials", "2", "--set", fix]) == 0
    assert len(trials(url, "old")) == 2

    wider = tmp_path / "wider.yaml"
    wider.write_text(Path(space).read_text().replace("low: 0.1", "low: 0.0"))
    assert run_cli.main(["--space", str(wider), "--storage", url]) == 2
    assert "created with space.lambda.start.low=0.1, this run has 0.0" in capsys.readouterr().err

    # where a trial runs is not what it searches: another device or data folder is the same study
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "1", "--set", "run.device=cpu",
                         "--set", "data.root=elsewhere"]) == 0
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "1", "--set", "data.timesteps=3",
                         "--study-name", "tiny_t3"]) == 0
    assert len(trials(url, "tiny_t3")) == 1 and len(trials(url)) == 1
    assert trials(url, "tiny_t3")[0].user_attrs["config"]["data"]["timesteps"] == 3


def test_a_study_whose_identity_has_another_schema_is_another_study_in_one_line(tmp_path, capsys):
    import json
    import sqlite3

    url = f"sqlite:///{tmp_path}/tiny.db"
    space = str(space_file(tmp_path))
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "1"]) == 0
    with sqlite3.connect(tmp_path / "tiny.db") as db:  # as an earlier version would have left it
        (raw,) = db.execute("SELECT value_json FROM study_user_attributes WHERE key = 'identity'").fetchone()
        assert json.loads(raw)["schema"] == 1
        db.execute("UPDATE study_user_attributes SET value_json = ? WHERE key = 'identity'",
                   (json.dumps({k: v for k, v in json.loads(raw).items() if k != "schema"}),))
    capsys.readouterr()
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "created by an earlier version of this project (identity schema 0" in err
    assert "--study-name NAME" in err and len(trials(url)) == 1


def test_a_config_key_added_after_a_study_was_created_compares_at_its_default(tmp_path, capsys):
    """A study stored before ``lambda.table`` existed lacks that key: it stands at its default there, so
    the upgrade keeps the study, and only another value is another study."""
    import json
    import sqlite3

    url = f"sqlite:///{tmp_path}/tiny.db"
    space = str(space_file(tmp_path))
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "1"]) == 0

    def stored(change):
        with sqlite3.connect(tmp_path / "tiny.db") as db:
            (raw,) = db.execute("SELECT value_json FROM study_user_attributes WHERE key = 'identity'").fetchone()
            identity = json.loads(raw)
            change(identity)
            db.execute("UPDATE study_user_attributes SET value_json = ? WHERE key = 'identity'",
                       (json.dumps(identity),))

    stored(lambda identity: identity.pop("base.lambda.table"))  # as the version before lambda.table left it
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "2"]) == 0
    assert len(trials(url)) == 2
    capsys.readouterr()
    stored(lambda identity: identity.update({"base.lambda.table": [0.3]}))  # a stored value is compared as ever
    assert run_cli.main(["--space", space, "--storage", url, "--n-trials", "3"]) == 2
    assert "created with base.lambda.table=[0.3], this run has []" in capsys.readouterr().err


def test_the_control_arm_tunes_the_other_parameters_without_heads(tmp_path):
    """Only where the trials carry heads; it drops what is about heads or lambda (and what is conditional on
    them), keeps the sampler, pruner and seed; ``false`` is one run of the base, ``0`` none."""
    lr = "  optim.lr: {type: float, low: 0.001, high: 0.1, log: true}\n"
    params = (lr + "  lambda.schedule: {type: categorical, choices: [linear, cosine]}\n"
              "  lambda.fraction: {type: float, low: 0.2, high: 1.0, when: {lambda.schedule: [linear]}}\n"
              "  data.timesteps: {type: int, low: 1, high: 3, when: {lambda.schedule: [cosine]}}\n"
              "  neuron.threshold: {type: float, low: 0.25, high: 1.0}\n")
    plain = load_space(space_file(tmp_path, base=BASE.replace("exits: [layer1.0]", "exits: []"), space=lr,
                                  control="null"))
    assert plain.control() is None and plain.arms() == [plain]
    headed = load_space(space_file(tmp_path, space=params, study=", pruner: median, n_trials: 7, sampler: random",
                                   control="null"))
    control = headed.control()
    assert [p.key for p in control.params] == ["optim.lr", "neuron.threshold"]
    assert control.study.name == "tiny.control" and control.study.n_trials == 7
    assert (control.study.sampler, control.study.pruner, control.study.seed) == ("random", "median", 0)
    assert control.config({"optim.lr": 0.01}).heads.exits == [] and headed.config({}).heads.exits == ["layer1.0"]
    assert load_space(space_file(tmp_path, space=params, control="3")).control().study.n_trials == 3
    single = load_space(space_file(tmp_path, space=params, control="false")).control()
    assert single.params == [] and single.study.n_trials == 1 and single.study.pruner == "none"
    assert load_space(space_file(tmp_path, space=params, control="0")).control() is None
