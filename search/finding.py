"""A confirmation's finding (``confirm.json``): per config its test accuracy over seeds, and against the
control arm the paired differences, a 95% confidence interval and a verdict read off it. Written by
``snn-search confirm`` (``search/confirm.py``), read by the report, the dashboard's note and export."""

from __future__ import annotations

import math
import statistics

import optuna
from pydantic import BaseModel, Field

from search.space import CONFIRM
from search.study import companion

METRIC = "test_acc"


class Result(BaseModel):
    """One confirmed config: its test accuracy at each seed."""

    label: str = Field(description="which config: 'heads #1 (trial 7)', 'control (trial 2)', 'recipe (FILE)'")
    arm: str = Field(description="heads, control or recipe")
    trial: int | None = Field(description="the search trial it comes from (none for the recipe)")
    config: dict = Field(description="the trainer config each seed retrained (run.seed aside)")
    seeds: list[int] = Field(description="the seeds that finished, in order")
    test_acc: list[float] = Field(description="test accuracy at each of those seeds")
    mean: float = Field(description="mean test accuracy over the seeds")
    sd: float | None = Field(description="sample standard deviation over the seeds (none with one seed)")


class Comparison(BaseModel):
    """A config against the control arm's best, paired seed by seed."""

    label: str = Field(description="the config compared with the control")
    differences: list[float] = Field(description="its test accuracy minus the control's, at each shared seed")
    mean: float = Field(description="mean paired difference")
    low: float | None = Field(description="95% confidence interval, lower end (none with one seed)")
    high: float | None = Field(description="95% confidence interval, upper end (none with one seed)")
    better: int = Field(description="seeds at which it beat the control")
    verdict: str = Field(description="one line read off the interval")


class Finding(BaseModel):
    """``confirm.json``: what ``snn-search confirm`` found."""

    study: str = Field(description="the search's study")
    date: str = Field(description="when the finding was computed (ISO date)")
    metric: str = Field(METRIC, description="what each retraining was scored on: the test split, once")
    epochs: int = Field(description="epochs of each retraining (the study's full length)")
    method: str = Field("paired differences per seed; 95% interval: mean +- t(0.975, n-1) * sd / sqrt(n), each "
                        "comparison on its own (not corrected for the several made)",
                        description="how the intervals were computed")
    results: list[Result] = Field(description="every config, best mean first")
    comparisons: list[Comparison] = Field(description="each config with heads, and the recipe, against the control")
    winner: str = Field(description="the label of the config with the best mean test accuracy (its comparison "
                        "says whether that lead over the control is more than seed noise)")

    def rows(self) -> list[tuple[str, str]]:
        """The finding as summary rows (the report and the dashboard's note)."""
        rows = [(f"confirmed: {r.label}", f"{METRIC} {r.mean:.4f}" + (f" ± {r.sd:.4f}" if r.sd is not None else "")
                 + f" over {len(r.seeds)} seeds") for r in self.results]
        rows += [(f"{c.label} vs. control", c.verdict) for c in self.comparisons]
        return [*rows, ("confirmed winner", f"{self.winner} ({self.epochs} epochs on train + validation, "
                                            f"{self.method})")]

    def table(self) -> str:
        """The finding as a markdown table and a verdict line per comparison."""
        against = {c.label: c for c in self.comparisons}
        lines = [f"| config | {METRIC}, mean ± sd | seeds | vs. control: mean difference, 95% CI | better at |",
                 "|---|---|---|---|---|"]
        for r in self.results:
            c = against.get(r.label)
            sd = f" ± {r.sd:.4f}" if r.sd is not None else ""
            interval = "" if c is None else f"{c.mean:+.4f}" + (
                f", [{c.low:+.4f}, {c.high:+.4f}]" if c.low is not None else " (one seed)")
            lines.append(f"| {r.label} | {r.mean:.4f}{sd} | {len(r.seeds)} | {interval} | "
                         f"{'' if c is None else f'{c.better} of {len(c.differences)}'} |")
        verdicts = [f"- {c.label}: {c.verdict}" for c in self.comparisons]
        return "\n".join([*lines, "", *verdicts, f"- winner: {self.winner}"])


def compare(label: str, mine: dict[int, float], control: dict[int, float], against: str = "the control") -> Comparison:
    """``mine`` against ``control`` (named ``against`` in the verdict: the control arm, or another config such
    as the recipe) at the seeds both finished: the paired differences, their mean, a 95%
    interval (Student's t) and a verdict. With a handful of seeds t is wide (12.7 sd/sqrt(2) at 2 seeds,
    4.3 sd/sqrt(3) at 3): a difference must be large and steady to be told apart from seed noise."""
    from scipy.stats import t

    seeds = sorted(mine.keys() & control.keys())
    diffs = [mine[s] - control[s] for s in seeds]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    better = sum(d > 0 for d in diffs)
    if n < 2:
        return Comparison(label=label, differences=diffs, mean=mean, low=None, high=None, better=better,
                          verdict=f"{mean:+.4f} at one seed: no interval; confirm with --seeds 3 or more")
    half = t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    low, high = mean - half, mean + half
    interval = f"{mean:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}], better at {better} of {n} seeds"
    if low > 0:
        verdict = f"better than {against}: {interval}"
    elif high < 0:
        verdict = f"worse than {against}: {interval}"
    else:
        verdict = f"no evidence of a difference at {n} seeds: {interval}"
    return Comparison(label=label, differences=diffs, mean=mean, low=low, high=high, better=better, verdict=verdict)


def load_finding(study: optuna.Study) -> Finding | None:
    """The finding ``snn-search confirm`` stored with the study's confirm study, if it ran."""
    confirm = companion(study, CONFIRM)
    data = confirm.user_attrs.get("finding") if confirm is not None else None
    return Finding.model_validate(data) if data else None
