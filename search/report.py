"""Did the heads help? One report per study: ``snn-search report --study NAME [--storage URL]``.

A summary (best config and value, gain over the baseline trial, epochs spent against running every
trial at full length, trials by state), then figures that each say in a sentence what they show: the
optimization history (or the Pareto front), learning curves of the top trials with their lambda, the
gradient reaching each LIF layer in the best trial and the baseline, the heads' share of it, accuracy vs.
timesteps (when T varies) and parameter importances. Written to ``studies/<name>/report.html`` with
plotly.js inlined, so it opens offline; ``publish`` puts the same summary and the SNN figures into the
study for optuna-dashboard (``save_note``, ``save_plotly_graph_object``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import html
import warnings
from dataclasses import dataclass

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.colors import DEFAULT_PLOTLY_COLORS
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from search.budget import is_baseline
from search.storage import default_url, study_dir
from search.study import baseline, is_full, load_study, select
from trainer.config import Config
from trainer.errors import Parser, command
from trainer.schedule import balance


@dataclass
class Section:
    title: str
    says: str  # one sentence: what the figure shows, or why there is none
    figure: go.Figure | None = None
    dashboard: bool = False  # optuna-dashboard draws Optuna's own plots itself; ours go into the study


def _lambdas(trial: FrozenTrial) -> list[float]:
    """The lambda of each epoch: a PBT member's as it trained (its config holds only its last value),
    any other trial's from its schedule."""
    if "lambda_trajectory" in trial.user_attrs:
        return trial.user_attrs["lambda_trajectory"]
    cfg = Config.model_validate(trial.user_attrs["config"])
    epochs = cfg.optim.epochs
    return [balance(cfg.lambda_, e, epochs) if cfg.heads.exits else 0.0 for e in range(epochs)]


def _learning_curves(top: list[FrozenTrial], reference: FrozenTrial | None, metric: str) -> go.Figure:
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for i, t in enumerate(top):
        colour = DEFAULT_PLOTLY_COLORS[i % len(DEFAULT_PLOTLY_COLORS)]
        curve = [h.get(metric) for h in t.user_attrs["history"]]
        fig.add_trace(go.Scatter(y=curve, mode="lines+markers", line={"color": colour},
                                 name=f"trial {t.number} {metric}"), secondary_y=False)
        fig.add_trace(go.Scatter(y=_lambdas(t), mode="lines", line={"color": colour, "dash": "dot"},
                                 name=f"trial {t.number} lambda"), secondary_y=True)
    if reference is not None:
        fig.add_trace(go.Scatter(y=[h.get(metric) for h in reference.user_attrs["history"]], mode="lines",
                                 line={"color": "black", "dash": "dash"}, name=f"baseline (trial {reference.number})"),
                      secondary_y=False)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text=metric, secondary_y=False)
    return fig.update_yaxes(title_text="lambda (weight of the heads' loss)", range=[0, 1.05], tickmode="linear",
                            dtick=0.2, showgrid=False, secondary_y=True)


def _population(members: list[FrozenTrial]) -> go.Figure:
    fig = go.Figure()
    for i, t in enumerate(members):
        colour = DEFAULT_PLOTLY_COLORS[i % len(DEFAULT_PLOTLY_COLORS)]
        lambdas = t.user_attrs["lambda_trajectory"]
        fig.add_trace(go.Scatter(x=list(range(1, len(lambdas) + 1)), y=lambdas, mode="lines", line={"color": colour},
                                 name=f"member {t.number}"))
        copies = [e for e in t.user_attrs["copies"] if e["epoch"] < len(lambdas)]
        fig.add_trace(go.Scatter(x=[e["epoch"] + 1 for e in copies],
                                 y=[e["values"].get("lambda.start", lambdas[e["epoch"]]) for e in copies],
                                 mode="markers", marker={"color": colour, "symbol": "x", "size": 10},
                                 text=[f"copied member {e['donor']} after epoch {e['epoch']}" for e in copies],
                                 name=f"member {t.number} copies", showlegend=False))
    return fig.update_layout(xaxis_title="epoch", yaxis_title="lambda (weight of the heads' loss)",
                             yaxis_range=[0, 1.05])


def _first_flow(trial: FrozenTrial) -> dict[str, float]:
    flow = trial.user_attrs.get("grad_flow") or {}
    return dict(zip(flow.get("layers", []), (flow.get("mean") or [[]])[0]))


def _gradient_flow(best: FrozenTrial, reference: FrozenTrial | None) -> go.Figure:
    fig = go.Figure()
    for trial, label in ((best, "best"), (reference, "baseline")):
        flow = _first_flow(trial) if trial is not None else {}
        if flow:
            fig.add_trace(go.Bar(x=list(flow), y=list(flow.values()), name=f"{label} (trial {trial.number})"))
    return fig.update_layout(yaxis_type="log", yaxis_title="mean |dL/dx| at the LIF input, first epoch",
                             xaxis_title="LIF layer, input side first", barmode="group")


def _heads_share(best: FrozenTrial) -> go.Figure | None:
    split = (best.user_attrs.get("grad_flow") or {}).get("split") or {}
    main, heads = split.get("main", {}), split.get("heads", {})
    if not main:
        return None
    share = {layer: heads.get(layer, {}).get("mean", 0.0) / (heads.get(layer, {}).get("mean", 0.0) + s["mean"])
             for layer, s in main.items() if s["mean"] > 0}
    fig = go.Figure(go.Bar(x=list(share), y=list(share.values()), name=f"trial {best.number}"))
    return fig.update_layout(yaxis_title="heads' part / (heads' + main's), mean |dL/dx|", yaxis_range=[0, 1],
                             xaxis_title="LIF layer, input side first")


def _timesteps(trials: list[FrozenTrial], metric: str) -> go.Figure:
    xs = [t.user_attrs["config"]["data"]["timesteps"] for t in trials]
    fig = go.Figure(go.Scatter(x=xs, y=[t.values[0] for t in trials], mode="markers",
                               text=[f"trial {t.number}" for t in trials]))
    return fig.update_layout(xaxis_title="timesteps T", yaxis_title=metric)


def summary(study: optuna.Study) -> list[tuple[str, str]]:
    """(label, text) pairs: what a user wants to know first."""
    metrics = study.user_attrs.get("metrics") or ["value"]
    trials = study.get_trials(deepcopy=False)
    searched = [t for t in trials if not is_baseline(t)]
    counts = {s.name.lower(): sum(t.state == s for t in searched) for s in TrialState}
    rows = [("study", f"{study.study_name}: {', '.join(metrics)} "
                      f"({', '.join(d.name.lower() for d in study.directions)})"),
            ("trials", ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "none yet")]
    reference = baseline(study)
    if reference is not None:
        rows[-1] = ("trials", f"{rows[-1][1]}, and the baseline")
    try:
        best = select(study, pareto=len(study.directions) > 1)
    except ValueError as err:
        return rows + [("best", str(err))]
    if len(study.directions) > 1:
        rows.append(("Pareto front", "; ".join(f"trial {t.number}: " + ", ".join(
            f"{m}={v:.4g}" for m, v in zip(metrics, t.values)) for t in best)))
    else:
        top = best[0]
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in top.params.items())
        rows.append(("best", f"trial {top.number}: {metrics[0]}={top.value:.4g} with {params or 'the base config'}"))
        rows.append(("gain over the baseline", f"{top.value - reference.value:+.4g} (baseline: trial "
                     f"{reference.number}, the base config without heads, {metrics[0]}={reference.value:.4g})"
                     if reference else "no baseline trial in this study"))
    spent = sum(t.user_attrs.get("epochs_run", 0) for t in trials)
    full = sum(t.user_attrs["config"]["optim"]["epochs"] for t in trials if "config" in t.user_attrs)
    if full:
        rows.append(("epochs", f"{spent} trained; {full} if every trial had run its full length "
                               f"({1 - spent / full:.0%} saved by pruning)"))
    return rows


def sections(study: optuna.Study, dashboard: bool = False) -> list[Section]:
    """Every section, or with ``dashboard`` only those ``publish`` puts into the study: not the history (or
    Pareto front) and the importances, which optuna-dashboard draws itself (fANOVA's forest takes seconds on
    a large study)."""
    metrics = study.user_attrs.get("metrics") or ["value"]
    multi = len(study.directions) > 1
    vis = optuna.visualization
    out = [] if dashboard else [
        Section("Pareto front", f"Each dot is a trial's {' and '.join(metrics)}; the front holds the trials no "
                "other trial beats in every objective.", vis.plot_pareto_front(study, target_names=metrics))
        if multi else
        Section("Optimization history", f"Each dot is a trial's final {metrics[0]}; the line is the best so far.",
                vis.plot_optimization_history(study, target_name=metrics[0]))]
    full = [t for t in study.get_trials(deepcopy=False) if is_full(t)]
    if not full:
        return out + [Section("Trials", "No trial has completed all its epochs yet.")]
    top = select(study, pareto=True)[:5] if multi else select(study, top_k=5)
    reference = baseline(study)
    out.append(Section(
        "Learning curves and lambda of the top trials",
        f"{metrics[0]} per epoch of the {'Pareto' if multi else len(top)} best trials (solid) with the lambda "
        "each trained under (dotted, right axis)" + ("; dashed black: the baseline without heads." if reference
                                                     else "."),
        _learning_curves(top, reference, "val_acc" if metrics[0] not in top[0].user_attrs["history"][0]
                         else metrics[0]), dashboard=True))
    if _first_flow(top[0]):
        out.append(Section(
            "Gradient flow: best trial vs. baseline",
            "The surrogate gradient reaching each LIF layer in the first epoch (mean |dL/dx| at its input), from "
            "the stem to the last layer: where the best trial's bars stand above the baseline's, the heads sent "
            "more gradient to that depth.", _gradient_flow(top[0], reference), dashboard=True))
    else:
        out.append(Section("Gradient flow: best trial vs. baseline", "The best trial recorded no gradient flow "
                           "(run.grad_stats is off, or the study predates it)."))
    share = _heads_share(top[0])
    out.append(Section("The heads' share of the gradient", "Of the gradient reaching each LIF layer in the best "
                       "trial's first steps, the part that came from the heads' loss (the rest came from the main "
                       "output's).", share, dashboard=True) if share else
               Section("The heads' share of the gradient", "The best trial trained without heads."))
    members = [t for t in study.get_trials(deepcopy=False) if "copies" in t.user_attrs]
    if members:
        copies = sum(len(t.user_attrs["copies"]) for t in members)
        out.append(Section("Population: lambda over epochs", f"The lambda each member of the population trained "
                           f"under, epoch by epoch (a copied member's earlier epochs are its donor's); an x marks "
                           f"where it copied a better member's weights and perturbed its values ({copies} copies).",
                           _population(members), dashboard=True))
    timesteps = {t.user_attrs["config"]["data"]["timesteps"] for t in full}
    if len(timesteps) > 1:
        out.append(Section(f"{metrics[0]} vs. timesteps", f"Each dot is a full-length trial's {metrics[0]} at the "
                           "number of timesteps it ran.", _timesteps(full, metrics[0]), dashboard=True))
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.params]
    if len(complete) >= 2 and not dashboard:
        target = (lambda t: t.values[0]) if multi else None
        with warnings.catch_warnings():  # "few trials per regime": the sentence below says it is an estimate
            warnings.simplefilter("ignore", UserWarning)
            figure = vis.plot_param_importances(study, target=target, target_name=metrics[0])
        out.append(Section("Parameter importances", f"An estimate of how much of the variation in {metrics[0]} "
                           "each searched parameter explains (rough with few trials).", figure))
    return out


@dataclass
class Report:
    """The summary and the sections of a study, computed once (parameter importances take seconds), then
    written as HTML and into the study for the dashboard."""

    rows: list[tuple[str, str]]
    sections: list[Section]


def build(study: optuna.Study, dashboard: bool = False) -> Report:
    return Report(summary(study), sections(study, dashboard))


def render(study: optuna.Study, report: Report) -> str:
    rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in report.rows)
    parts = []
    for i, s in enumerate(report.sections):
        body = s.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{i}") if s.figure else ""
        parts.append(f"<section><h2>{html.escape(s.title)}</h2><p>{html.escape(s.says)}</p>{body}</section>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(study.study_name)}</title>"
            f"<script>{get_plotlyjs()}</script></head><body style='font-family:sans-serif'>"
            f"<h1>Study {html.escape(study.study_name)}</h1><table>{rows}</table>{''.join(parts)}</body></html>")


def publish(study: optuna.Study, report: Report) -> None:
    """The summary as the study's note and the SNN figures as its plotly graph objects, so a user who only
    opens optuna-dashboard sees them (each overwrites its previous version)."""
    import optuna_dashboard

    lines = [f"**{k}**: {v}" for k, v in report.rows]
    lines += [f"- **{s.title}**: {s.says}" for s in report.sections if s.dashboard or s.figure is None]
    optuna_dashboard.save_note(study, "\n\n".join(lines))
    for i, s in enumerate(s for s in report.sections if s.dashboard):
        s.figure.update_layout(title=s.title)
        optuna_dashboard.save_plotly_graph_object(study, s.figure, graph_object_id=f"snn{i}")


def make_parser(prog: str = "snn-search report") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", help="default: sqlite:///studies/<study>.db")
    parser.add_argument("--out", type=Path, help="default: studies/<study>/report.html")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    url = args.storage or default_url(args.study)
    study = load_study(args.study, url)
    out = args.out or study_dir(url, args.study) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = build(study)
    out.write_text(render(study, report))
    publish(study, report)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
