"""Did the heads help? One report per study: ``snn-search report --study NAME [--storage URL]``.

A summary (the best trial with heads against the best of the control arm without them, the confirmation
over seeds where ``snn-search confirm`` ran, epochs spent against running every trial at full length,
trials by state), then figures whose sentences are computed from their data: the optimization history of
both arms (or the Pareto front), learning curves of the top trials with their lambda, the gradient reaching
each LIF layer relative to the last one in the best trial of each arm, the heads' share of it, accuracy vs.
timesteps (when T varies) and parameter importances (with enough trials). Written to
``studies/<name>/report.html`` with plotly.js inlined, so it opens offline; ``publish`` puts the same
summary and the SNN figures into the study for optuna-dashboard (``save_note``, ``save_plotly_graph_object``).
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

from search.finding import load_finding
from search.storage import default_url, study_dir
from search.study import base_config, best_full, companion, is_full, load_study, select
from trainer.config import Config
from trainer.errors import Parser, UserError, command
from trainer.schedule import balance


@dataclass
class Section:
    title: str
    says: str  # one sentence: what the figure shows, or why there is none
    figure: go.Figure | None = None
    dashboard: bool = False  # goes into the study for optuna-dashboard (which draws Optuna's own plots itself)


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
                                 line={"color": "black", "dash": "dash"},
                                 name=f"control arm's best (trial {reference.number})"), secondary_y=False)
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


def _first_flow(trial: FrozenTrial | None) -> dict[str, float]:
    flow = (trial.user_attrs.get("grad_flow") or {}) if trial is not None else {}
    return dict(zip(flow.get("layers", []), (flow.get("mean") or [[]])[0]))


def relative(flow: dict[str, float]) -> dict[str, float]:
    """Each layer's gradient over the last layer's: the shape of the flow, whatever weights the loss had
    (the heads arm's main loss weighs 1 - lambda, 0.01 at lambda 0.99), so two trials compare like with like."""
    last = list(flow.values())[-1] if flow else 0.0
    return {layer: value / last for layer, value in flow.items()} if last > 0 else {}


def _main_part(trial: FrozenTrial) -> dict[str, float]:
    split = (trial.user_attrs.get("grad_flow") or {}).get("split") or {}
    return {layer: s["mean"] for layer, s in split.get("main", {}).items()}


def gradient_flow(best: FrozenTrial, control: FrozenTrial | None) -> Section:
    """The first epoch's gradient at each LIF input relative to the last layer's, for the best trial with heads
    (its whole loss, and its main loss's part alone) and the control arm's best; the sentence says which keeps
    more gradient at the input side, and by what factor."""
    title = "Gradient flow relative to the last layer: best with heads vs. best without"
    heads, main, plain = relative(_first_flow(best)), relative(_main_part(best)), relative(_first_flow(control))
    if not heads:
        return Section(title, "The best trial recorded no gradient flow (run.grad_stats is off).", dashboard=True)
    fig = go.Figure()
    for curve, name in ((plain, f"control arm's best, trial {control.number}" if control else ""),
                        (heads, f"with heads: whole loss, trial {best.number}"),
                        (main, f"with heads: main loss's part alone, trial {best.number}")):
        if curve:
            fig.add_trace(go.Scatter(x=list(curve), y=list(curve.values()), mode="lines+markers", name=name))
    fig.update_layout(yaxis_type="log", xaxis_title="LIF layer, input side first",
                      yaxis_title="mean |dL/dx| at the LIF input / the last layer's, first epoch")
    first = next(iter(heads))
    if not plain:
        says = (f"With heads, the input side ({first}) gets {heads[first]:.3g}x the last layer's gradient; the "
                f"control arm has no full-length trial with gradient flow to compare with.")
    else:
        ratio = heads[first] / plain[first] if plain[first] > 0 else float("inf")
        verdict = "the heads lift the gradient that reaches the input side" if ratio > 1 else \
            "the heads do not lift the gradient that reaches the input side"
        says = (f"At the input side ({first}), relative to its last layer, the best trial with heads keeps "
                f"{ratio:.3g}x the gradient of the control arm's best ({heads[first]:.3g} against "
                f"{plain[first]:.3g}): {verdict}.")
    return Section(title, says, fig, dashboard=True)


def initial_gradients(study: optuna.Study) -> Section:
    """The gradient at initialisation of the study's base (``snn-train --gradients``), measured once and kept
    in the study (user attr ``init_gradients``)."""
    title = "Gradient at initialisation: the study's base"
    found = study.user_attrs.get("init_gradients")
    if found is None:
        from trainer.gradients import profile

        try:
            found = profile(base_config(study)).to_dict()
        except UserError as err:  # the data set is not on this machine, say
            return Section(title, f"Not measured here: {err}")
        study.set_user_attr("init_gradients", found)
    fig = go.Figure([go.Scatter(x=found["layers"], y=ys, mode="lines+markers", name=name)
                     for ys, name in ((found["plain"], "no heads"), (found["heads"], "with the base's heads")) if ys])
    fig.update_layout(yaxis_type="log", xaxis_title="spiking layer, input side first",
                      yaxis_title="mean |dL/dx| / the last layer's without heads, one batch at init")
    advice = f" {found['advice']}." if found.get("advice") else ""
    return Section(title, f"Verdict: {found['verdict']}.{advice}", fig)


def history(arms: list[optuna.Study], metric: str) -> Section:
    """Every finished trial of each arm in its own colour, pruned ones marked at their last reported value,
    and each arm's best so far."""
    fig, told = go.Figure(), []
    sign = 1 if arms[0].direction == optuna.study.StudyDirection.MAXIMIZE else -1
    for i, study in enumerate(arms):
        colour = DEFAULT_PLOTLY_COLORS[i % len(DEFAULT_PLOTLY_COLORS)]
        label = "without heads (control arm)" if i else ("with heads" if len(arms) > 1 else "trials")
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                if t.value is not None or t.intermediate_values]
        values = [t.value if t.value is not None else t.intermediate_values[t.last_step] for t in done]
        pruned = sum(t.state == TrialState.PRUNED for t in done)
        told.append(f"{len(done)} {label} ({pruned} pruned)")
        fig.add_trace(go.Scatter(x=[t.number for t in done], y=values, mode="markers", name=label,
                                 marker={"color": colour, "symbol": ["x" if t.state == TrialState.PRUNED else "circle"
                                                                     for t in done]},
                                 text=[f"trial {t.number} {t.state.name.lower()}" for t in done]))
        full = [(t.number, t.value) for t in done if is_full(t)]
        best = [max(v * sign for _, v in full[:k + 1]) * sign for k in range(len(full))]
        fig.add_trace(go.Scatter(x=[n for n, _ in full], y=best, mode="lines", line={"color": colour},
                                 name=f"{label}: best so far"))
    fig.update_layout(xaxis_title="trial number (of its arm)", yaxis_title=metric)
    return Section("Optimization history", f"Each marker is a finished trial: {', '.join(told)}; a cross was "
                   f"pruned and stands at the last {metric} it reported; each line is its arm's best full-length "
                   f"trial so far.", fig)


def _heads_share(best: FrozenTrial) -> go.Figure | None:
    split = (best.user_attrs.get("grad_flow") or {}).get("split") or {}
    main, heads = split.get("main", {}), split.get("heads", {})
    if not main:
        return None
    share = {layer: heads.get(layer, {}).get("mean", 0.0) / (heads.get(layer, {}).get("mean", 0.0) + s["mean"])
             for layer, s in main.items() if s["mean"] > 0}
    fig = go.Figure(go.Bar(x=list(share), y=list(share.values()), name=f"trial {best.number}"))
    return fig.update_layout(yaxis_title="heads' part / (heads' + main's), mean |dL/dx|",
                             xaxis_title="LIF layer, input side first")


def _timesteps(trials: list[FrozenTrial], metric: str) -> go.Figure:
    xs = [t.user_attrs["config"]["data"]["timesteps"] for t in trials]
    fig = go.Figure(go.Scatter(x=xs, y=[t.values[0] for t in trials], mode="markers",
                               text=[f"trial {t.number}" for t in trials]))
    return fig.update_layout(xaxis_title="timesteps T", yaxis_title=metric)


MIN_IMPORTANCE_TRIALS = 10  # fANOVA fits a random forest to the complete trials; with fewer, its split swings with each new trial


def _counts(study: optuna.Study) -> str:
    counts = {s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "none yet"


def _described(trial: FrozenTrial | None, metric: str, what: str) -> str:
    if trial is None:
        return f"no {what} has completed all its epochs yet"
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"trial {trial.number}: {metric}={trial.value:.4g} with {params or 'the base config'}"


def summary(study: optuna.Study) -> list[tuple[str, str]]:
    """(label, text) pairs: what a user wants to know first. With a control arm: the best with heads against
    the best without, and where ``snn-search confirm`` ran, its finding over seeds."""
    metrics = study.user_attrs.get("metrics") or ["value"]
    control = companion(study)
    rows = [("study", f"{study.study_name}: {', '.join(metrics)} ({', '.join(d.name.lower() for d in study.directions)})"),
            ("trials with heads" if control else "trials", _counts(study))]
    if control:
        rows.append(("trials without heads", f"{_counts(control)} (the control arm, {control.study_name})"))
    if len(study.directions) > 1:
        full = [t for t in study.get_trials(deepcopy=False) if is_full(t)]
        rows.append(("Pareto front", "; ".join(f"trial {t.number}: " + ", ".join(
            f"{m}={v:.4g}" for m, v in zip(metrics, t.values)) for t in select(study, pareto=True)) if full else
            "no trial has completed all its epochs yet"))
    else:
        best, plain = best_full(study), best_full(control)
        rows.append(("best with heads" if control else "best", _described(best, metrics[0], "trial")))
        if control:
            rows.append(("best without heads", _described(plain, metrics[0], "control trial")))
        if best and plain:
            rows.append(("with heads - without, one run each", f"{best.value - plain.value:+.4g} at one seed: "
                         f"`snn-search confirm` retrains both over seeds at full length before this is a finding"))
    finding = load_finding(study)
    rows += finding.rows() if finding else []
    arms = [study, control] if control else [study]
    trials = [t for a in arms for t in a.get_trials(deepcopy=False)]
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
    control = companion(study)
    vis = optuna.visualization
    out = [] if dashboard else [
        Section("Pareto front", f"Each dot is a trial's {' and '.join(metrics)}; the front holds the trials no "
                "other trial beats in every objective.", vis.plot_pareto_front(study, target_names=metrics))
        if multi else history([study, control] if control else [study], metrics[0])]
    found = confirmation(study)
    if found:
        out.append(found)
    full = [t for t in study.get_trials(deepcopy=False) if is_full(t)]
    if not full:
        return out + [Section("Trials", "No trial has completed all its epochs yet.", dashboard=True)]
    top = select(study, pareto=True)[:5] if multi else select(study, top_k=5)
    reference = best_full(control)
    out.append(Section(
        "Learning curves and lambda of the top trials",
        f"{metrics[0]} per epoch of the {'Pareto' if multi else len(top)} best trials (solid) with the lambda "
        "each trained under (dotted, right axis)" + ("; dashed black: the control arm's best, without heads."
                                                     if reference else "."),
        _learning_curves(top, reference, "val_acc" if metrics[0] not in top[0].user_attrs["history"][0]
                         else metrics[0]), dashboard=True))
    out.append(gradient_flow(top[0], reference))
    share = _heads_share(top[0])
    out.append(Section("The heads' share of the gradient", "Of the gradient reaching each LIF layer in the best "
                       "trial's first steps, the part that came from the heads' loss (the rest came from the main "
                       "output's).", share, dashboard=True) if share else
               Section("The heads' share of the gradient", "The best trial trained without heads.", dashboard=True))
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
    if dashboard:
        return out
    out.append(initial_gradients(study))
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        out.append(Section("Parameter importances", f"Too few complete trials to estimate them ({len(complete)} of "
                           f"the {MIN_IMPORTANCE_TRIALS} needed: fANOVA fits a random forest to the complete "
                           "trials, and with fewer its estimates swing with each new trial)."))
    else:
        target = (lambda t: t.values[0]) if multi else None
        with warnings.catch_warnings():  # "few trials per regime": the sentence below says it is an estimate
            warnings.simplefilter("ignore", UserWarning)
            figure = vis.plot_param_importances(study, target=target, target_name=metrics[0])
        out.append(Section("Parameter importances", f"An estimate from {len(complete)} complete trials of how much "
                           f"of the variation in {metrics[0]} each searched parameter explains.", figure))
    return out


def confirmation(study: optuna.Study) -> Section | None:
    """The confirmation's table, where ``snn-search confirm`` ran; its sentence is the verdicts."""
    finding = load_finding(study)
    if finding is None or not finding.results:
        return None
    against = {c.label: c for c in finding.comparisons}
    rows = [[r.label, f"{r.mean:.4f}" + (f" ± {r.sd:.4f}" if r.sd is not None else ""), str(len(r.seeds)),
             against[r.label].verdict if r.label in against else ""] for r in finding.results]
    table = go.Figure(go.Table(header={"values": ["config", "test acc, mean ± sd", "seeds", "vs. the control arm's best"]},
                               cells={"values": list(zip(*rows))}, columnwidth=[2, 1.2, 0.5, 4]))
    return Section("Confirmation over seeds", f"Each config retrained at full length ({finding.epochs} epochs) on "
                   f"train + validation, once per seed, and scored once on the test split ({finding.method}). "
                   + " ".join(f"{c.label}: {c.verdict}." for c in finding.comparisons)
                   + f" Winner: {finding.winner}.", table, dashboard=True)


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
    lines += [f"- **{s.title}**: {s.says}" for s in report.sections if s.dashboard]
    optuna_dashboard.save_note(study, "\n\n".join(lines))
    for i, s in enumerate(s for s in report.sections if s.dashboard and s.figure is not None):
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
