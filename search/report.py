"""One self-contained HTML report per study: ``python search/report.py --study NAME [--storage URL]``.

Sections: optimization history (or Pareto front), parameter importances, parallel coordinates, the
lambda curves of the top trials, per-layer gradient magnitude of the best trial vs. the best trial
without heads (first epoch), and accuracy vs. timesteps. Written to ``studies/<name>/report.html``
with plotly.js inlined, so it opens offline.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import html  # noqa: E402

import optuna  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from plotly.offline import get_plotlyjs  # noqa: E402

from search.storage import default_url, study_dir  # noqa: E402
from search.study import is_full, load_study, select  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.schedule import balance  # noqa: E402


def _lambda_curves(trials: list[FrozenTrial]) -> go.Figure:
    fig = go.Figure()
    for t in trials:
        cfg = Config.model_validate(t.user_attrs["config"])
        epochs = list(range(cfg.optim.epochs))
        values = [balance(cfg.lambda_, e, cfg.optim.epochs) if cfg.heads.exits else 0.0 for e in epochs]
        fig.add_trace(go.Scatter(x=epochs, y=values, mode="lines+markers",
                                 name=f"trial {t.number} ({cfg.lambda_.schedule}, value {t.values[0]:.3g})"))
    return fig.update_layout(xaxis_title="epoch", yaxis_title="lambda (weight of the heads' loss)")


def _gradients(best: FrozenTrial, baseline: FrozenTrial | None) -> go.Figure:
    fig = go.Figure()
    for trial, label in ((best, "best"), (baseline, "best without heads")):
        if trial is None:
            continue
        stats = trial.user_attrs.get("grad_stats", {}).get("first", {})
        fig.add_trace(go.Bar(x=list(stats), y=[s["mean"] for s in stats.values()],
                             name=f"{label} (trial {trial.number})"))
    return fig.update_layout(yaxis_type="log", yaxis_title="mean |grad|, first epoch", barmode="group")


def _timesteps(trials: list[FrozenTrial], metric: str) -> go.Figure:
    xs = [t.user_attrs["config"]["data"]["timesteps"] for t in trials]
    ys = [t.values[0] for t in trials]
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="markers", text=[f"trial {t.number}" for t in trials]))
    return fig.update_layout(xaxis_title="timesteps T", yaxis_title=metric)


def figures(study: optuna.Study) -> list[tuple[str, go.Figure | str]]:
    """(title, figure or a sentence saying why there is none) per section."""
    metrics = study.user_attrs.get("metrics") or ["value"]
    full = [t for t in study.get_trials(deepcopy=False) if is_full(t)]
    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    out: list[tuple[str, go.Figure | str]] = []
    vis = optuna.visualization
    if multi:
        out.append(("Pareto front", vis.plot_pareto_front(study, target_names=metrics)))
    else:
        out.append(("Optimization history", vis.plot_optimization_history(study, target_name=metrics[0])))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) >= 2 and complete[0].params:
        out.append(("Parameter importances", vis.plot_param_importances(study, target=target,
                                                                        target_name=metrics[0])))
        out.append(("Parallel coordinates", vis.plot_parallel_coordinate(study, target=target,
                                                                          target_name=metrics[0])))
    else:
        out.append(("Parameter importances", "needs at least two completed trials"))
    if not full:
        return out + [("Trials", "no trial has completed all its epochs yet")]
    top = select(study, top_k=5) if not multi else select(study, pareto=True)[:5]
    out.append(("Lambda curves of the top trials", _lambda_curves(top)))
    baseline = next((t for t in select(study, top_k=len(full)) if not t.user_attrs["config"]["heads"]["exits"]),
                    None) if not multi else None
    out.append(("Per-layer gradient magnitude: best trial vs. best without heads", _gradients(top[0], baseline)))
    out.append((f"{metrics[0]} vs. timesteps", _timesteps(full, metrics[0])))
    return out


def render(study: optuna.Study) -> str:
    parts = []
    for i, (title, fig) in enumerate(figures(study)):
        body = (fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{i}")
                if isinstance(fig, go.Figure) else f"<p><em>{html.escape(fig)}</em></p>")
        parts.append(f"<section><h2>{html.escape(title)}</h2>{body}</section>")
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(study.study_name)}</title>"
            f"<script>{get_plotlyjs()}</script></head><body style='font-family:sans-serif'>"
            f"<h1>Study {html.escape(study.study_name)}</h1><p>{summary}</p>{''.join(parts)}</body></html>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python search/report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", help="default: sqlite:///studies/<study>.db")
    parser.add_argument("--out", type=Path, help="default: studies/<study>/report.html")
    args = parser.parse_args(argv)
    url = args.storage or default_url(args.study)
    try:
        study = load_study(args.study, url)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or study_dir(url, args.study) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(study))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
