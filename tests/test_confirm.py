"""Findings a researcher can trust: the confirmation over seeds at full length, its statistics, its kill and
resume, the export of its winner, and figures whose sentences are computed from their data."""

import json
import math
import signal
import statistics

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from search import confirm as confirm_cli
from search import export as export_cli
from search import report as report_cli
from search import run as run_cli
from search.finding import compare

SPACE = """
study: {name: tiny, seed: 0, pruner: none, n_trials: 3, control: 2}
base:
  data: {limit: 64, timesteps: 2, batch_size: 32}
  model: {width: 4}
  heads: {exits: [layer1.0]}
  optim: {name: adamw, lr: 0.005, epochs: 2}
final:
  optim.epochs: 3
space:
  optim.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  lambda.start: {type: float, low: 0.1, high: 1.0}
"""
RECIPE = """
data: {limit: 64, timesteps: 2, batch_size: 32}
model: {width: 4}
heads: {exits: [layer1.0]}
lambda: {schedule: cosine, start: 0.9}
optim: {name: adamw, lr: 0.005, epochs: 2}
"""


@pytest.fixture(autouse=True)
def ctrl_c_reaches_python():
    """Python's own SIGINT handler, as under a terminal (pytest may run as a background job, whose SIGINT is
    ignored, and a search keeps an ignored signal ignored)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


@pytest.fixture
def searched(tmp_path):
    """A finished tiny search with both arms, and a recipe file."""
    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    url = f"sqlite:///{tmp_path}/tiny.db"
    assert run_cli.main(["--space", str(tmp_path / "space.yaml"), "--storage", url]) == 0
    return url


def confirm_args(tmp_path, url, *extra):
    return ["--study", "tiny", "--storage", url, "--top-k", "2", "--seeds", "2", "--recipe",
            str(tmp_path / "recipe.yaml"), *extra]


@pytest.mark.long(20)
def test_confirm_retrains_the_winners_the_control_and_the_recipe_over_seeds_and_export_takes_the_winner(
        tmp_path, searched, capsys):
    url = searched
    capsys.readouterr()
    assert confirm_cli.main(confirm_args(tmp_path, url, "--workers", "2")) == 0
    out = capsys.readouterr().out
    assert "confirming 4 configs x 2 seeds at full length (3 epochs on train + validation" in out
    assert "started 2 workers" in out
    finding = json.loads((tmp_path / "tiny" / "confirm.json").read_text())
    labels = {r["label"] for r in finding["results"]}
    heads = sorted(t for t in optuna.load_study(study_name="tiny", storage=url).trials if t.state == TrialState.COMPLETE)
    assert len(labels) == 4 and {label.split(" (")[0] for label in labels} == {"heads #1", "heads #2", "control",
                                                                            "recipe"}
    confirm = optuna.load_study(study_name="tiny.confirm", storage=url).trials
    assert len(confirm) == 8 and all(t.state == TrialState.COMPLETE for t in confirm)
    assert all(t.user_attrs["config"]["optim"]["epochs"] == 3 and t.user_attrs["config"]["data"]["val_fraction"] == 0
               and 0 <= t.user_attrs["test"]["test_acc"] <= 1 for t in confirm)  # full length, train + val, test once
    scores = {}
    for t in confirm:
        c = t.user_attrs["confirm"]
        assert t.user_attrs["config"]["run"]["seed"] == c["seed"]  # the seed is the run's
        scores.setdefault(c["label"], {})[c["seed"]] = t.value
    for r in finding["results"]:
        assert r["seeds"] == [0, 1] and r["test_acc"] == [scores[r["label"]][0], scores[r["label"]][1]]
        assert r["mean"] == pytest.approx(statistics.fmean(r["test_acc"]))
        assert r["sd"] == pytest.approx(statistics.stdev(r["test_acc"]))
    assert [r["mean"] for r in finding["results"]] == sorted((r["mean"] for r in finding["results"]), reverse=True)
    control = next(label for label in labels if label.startswith("control"))
    for c in finding["comparisons"]:
        assert c["differences"] == pytest.approx([scores[c["label"]][s] - scores[control][s] for s in (0, 1)])
        assert c["low"] <= c["mean"] <= c["high"] and c["label"] != control
    assert finding["winner"] == finding["results"][0]["label"] and finding["method"].startswith("paired differences")
    assert "| config | test_acc, mean ± sd |" in out and f"- winner: {finding['winner']}" in out

    report = tmp_path / "report.html"
    assert report_cli.main(["--study", "tiny", "--storage", url, "--out", str(report)]) == 0
    text = report.read_text()
    assert "Confirmation over seeds" in text and f"Winner: {finding['winner']}." in text
    assert all(c["verdict"] in text for c in finding["comparisons"])

    assert export_cli.main(["--study", "tiny", "--storage", url, "--out", str(tmp_path / "exp")]) == 0
    best = yaml.safe_load((tmp_path / "exp" / "best.yaml").read_text())
    assert best["provenance"]["confirmed"]["label"] == finding["winner"]
    assert best["provenance"]["confirmed"]["test_acc_mean"] == pytest.approx(finding["results"][0]["mean"])
    assert heads  # the search itself ran


@pytest.mark.long(20)
def test_a_confirmation_stopped_midway_finishes_without_retraining_finished_seeds(tmp_path, searched, capsys,
                                                                                    monkeypatch):
    url = searched
    monkeypatch.setenv("SNN_STOP_AT", "asked@3")  # SIGTERM as the third retraining starts
    assert confirm_cli.main(confirm_args(tmp_path, url, "--top-k", "1")) == 143
    assert "preempted (SIGTERM): run the same command again to finish" in capsys.readouterr().err
    first = optuna.load_study(study_name="tiny.confirm", storage=url).trials
    done = {t.number: t.datetime_complete for t in first if t.state == TrialState.COMPLETE}
    assert len(done) == 2 and TrialState.RUNNING not in [t.state for t in first]
    monkeypatch.delenv("SNN_STOP_AT")
    assert confirm_cli.main(confirm_args(tmp_path, url, "--top-k", "1")) == 0
    again = optuna.load_study(study_name="tiny.confirm", storage=url).trials
    assert {t.number: t.datetime_complete for t in again if t.number in done} == done  # not retrained
    complete = [t for t in again if t.state == TrialState.COMPLETE]
    assert len(complete) == 6  # 3 configs x 2 seeds, each once
    assert len({(t.user_attrs["confirm"]["label"], t.user_attrs["confirm"]["seed"]) for t in complete}) == 6


@pytest.mark.parametrize("diffs,verdict", [
    ([0.10, 0.11, 0.12], "better than the control: +0.1100, 95% CI [+0.0852, +0.1348], better at 3 of 3 seeds"),
    ([-0.10, -0.11, -0.12], "worse than the control: -0.1100, 95% CI [-0.1348, -0.0852], better at 0 of 3 seeds"),
    ([0.1, 0.2, -0.05], "no evidence of a difference at 3 seeds: +0.0833"),
    ([0.05], "+0.0500 at one seed: no interval"),
])
def test_the_verdict_is_read_off_a_paired_t_interval(diffs, verdict):
    control = {s: 0.5 for s in range(len(diffs))}
    mine = {s: 0.5 + d for s, d in enumerate(diffs)}
    c = compare("heads #1", mine, control)
    assert c.verdict.startswith(verdict)
    assert compare("heads #1", mine, control, "the recipe").verdict.startswith(
        verdict.replace("than the control", "than the recipe"))
    if len(diffs) > 1:  # mean +- t(0.975, n-1) sd / sqrt(n), by hand: t(0.975, 2) = 4.302653
        half = 4.302653 * statistics.stdev(diffs) / math.sqrt(len(diffs))
        assert (c.low, c.high) == pytest.approx((statistics.fmean(diffs) - half, statistics.fmean(diffs) + half))


def flow_trial(number, means, value=0.9):
    """A finished trial whose first epoch's gradient reached its LIF layers as ``means`` (input side first)."""
    layers = [f"lif{i}" for i in range(len(means))]
    return create_trial(value=value, params={}, distributions={}, user_attrs={
        "grad_flow": {"layers": layers, "mean": [means]}, "config": {"optim": {"epochs": 1}}, "epochs_run": 1})


@pytest.mark.parametrize("heads,control,says", [
    ([0.5, 0.8, 1.0], [0.01, 0.1, 1.0], "keeps 50x the gradient of the control arm's best (0.5 against 0.01): "
                                         "the heads lift the gradient that reaches the input side"),
    ([0.2, 0.2, 4.0], [0.5, 1.0, 2.0], "keeps 0.2x the gradient of the control arm's best (0.05 against 0.25): "
                                        "the heads do not lift the gradient that reaches the input side"),
])
def test_the_gradient_flow_caption_is_computed_from_the_relative_profiles(heads, control, says):
    """Raw magnitudes are not compared (the heads arm's main loss may weigh 0.01): each profile is relative to
    its own last layer, and the sentence says which keeps more at the input side."""
    section = report_cli.gradient_flow(flow_trial(1, heads), flow_trial(2, control))
    assert says in section.says and section.says.startswith("At the input side (lif0)")
    ys = [list(t.y) for t in section.figure.data]
    assert ys[0] == pytest.approx([c / control[-1] for c in control]) and ys[1][-1] == pytest.approx(1.0)


def test_the_history_shows_every_finished_trial_of_both_arms_pruned_ones_marked():
    heads, control = optuna.create_study(direction="maximize"), optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    full = {"config": {"optim": {"epochs": 3}}, "epochs_run": 3}
    heads.add_trial(create_trial(value=0.8, params={"x": 0.1}, distributions=dist, user_attrs=full,
                                 intermediate_values={1: 0.5, 2: 0.7, 3: 0.8}))
    heads.add_trial(create_trial(state=TrialState.PRUNED, params={"x": 0.2}, distributions=dist,
                                 user_attrs={**full, "epochs_run": 1}, intermediate_values={1: 0.3}))
    control.add_trial(create_trial(value=0.7, params={"x": 0.3}, distributions=dist, user_attrs=full))
    section = report_cli.history([heads, control], "val_acc")
    markers = [t for t in section.figure.data if t.mode == "markers"]
    assert [list(t.y) for t in markers] == [[0.8, 0.3], [0.7]]  # the pruned one at its last reported value
    assert list(markers[0].marker.symbol) == ["circle", "x"]
    assert "2 with heads (1 pruned), 1 without heads (control arm) (0 pruned)" in section.says
