"""Each benchmark runs end to end at a tiny size; the tests read the JSON it writes beside its tables.

Timings at these sizes mean nothing; what is checked is what a table claims beyond time (equal spikes
and gradients, op counts, memory growth, the search comparison), so a broken benchmark fails CI. Every
run also checks that the markdown it printed is its JSON's tables rendered, so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmarks_record", ROOT / "benchmarks" / "record.py")
record = sys.modules["benchmarks_record"] = importlib.util.module_from_spec(_spec)  # benchmarks/: no package
_spec.loader.exec_module(record)


def printed_tables(stdout: str) -> list[str]:
    """The markdown tables in a script's output: each run of consecutive ``|`` lines."""
    tables: list[list[str]] = [[]]
    for line in stdout.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    return ["\n".join(t) for t in tables if t]


def bench(tmp_path: Path, script: str, *args: str) -> tuple[list[list[list[Any]]], dict[str, Any]]:
    """Run benchmarks/<script> with ``--json``; return its tables' rows and the whole record."""
    path = tmp_path / "x.json"
    out = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--json", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads(path.read_text())
    assert rec["script"] == script and datetime.date.fromisoformat(rec["date"])
    machine = rec["machine"]
    assert set(machine) == {"platform", "processor", "cores", "torch", "cuda"} and machine["cores"] >= 1
    assert machine["torch"] == torch.__version__
    assert (machine["cuda"] is None) == (not torch.cuda.is_available())
    assert "json" not in rec["args"]
    assert printed_tables(out.stdout) == [record.Table.from_dict(t).markdown() for t in rec["tables"]]
    return [t["rows"] for t in rec["tables"]], rec


def rounded(value: float, digits: int) -> float:
    """``value`` to the digits its table prints: a claim such as "the time is positive" is about the table."""
    return round(value, digits)


def test_tables_render_the_same_from_json_and_write_to_a_new_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    table = record.Table("t", "name", record.Column("ms", "{:.2f}", none="not installed"),
                         record.Column("ratio", "{:+.1%}", none="n/a"),
                         record.Column("mean ± sd", "{0[mean]:.3f} ± {0[sd]:.3f}"))
    assert table.add("a", 1.234, 0.05, {"mean": 0.5, "sd": 0.01}) == "| a | 1.23 | +5.0% | 0.500 ± 0.010 |"
    assert table.add("b", 2.0, None) == "| b | 2.00 | n/a |  |"  # a short row: the cells it lacks are blank
    assert table.add("c", None) == "| c | not installed |  |  |"
    with pytest.raises(ValueError):
        table.add("d", 1.0, 0.0, None, "one too many")
    assert table.header() == "| name | ms | ratio | mean ± sd |\n|---|---|---|---|"
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")  # the default folder, missing so far
    path = record.write_json("benchmarks/lif.py", argparse.Namespace(json=None, batch=2), [table])
    assert path == tmp_path / "results" / "lif.json"
    rec = json.loads(path.read_text())
    assert rec["args"] == {"batch": 2} and rec["tables"][0]["rows"][1] == ["b", 2.0, None]
    assert record.Table.from_dict(rec["tables"][0]).markdown() == table.markdown()


@pytest.mark.long(20)
def test_lif_benchmark_checks_every_neuron_against_the_reference(tmp_path: Path) -> None:
    (rows,), rec = bench(tmp_path, "lif.py", *"--timesteps 2 --batch 2 --rounds 2 --repeats 1".split())
    assert rec["args"].items() >= {"timesteps": [2], "batch": 2, "rounds": 2, "repeats": 1}.items()
    assert [row[1] for row in rows] == ["ours loop", "ours fused eager", "ours fused+compile",
                                        "SpikingJelly LIFNode", "snnTorch Leaky"]
    ours = {row[1]: row for row in rows if row[1].startswith("ours")}
    for row in ours.values():
        assert row[0] == 2 and rounded(row[2], 2) > 0
        assert row[5] is True and row[6] is True, row  # spikes and gradients equal the reference loop's
    assert ours["ours loop"][3] == 1.0
    for row in rows[3:]:  # the other libraries: not installed (no measurements), or measured and compared
        assert row[2:] == [None] or (isinstance(row[2], float) and isinstance(row[5], bool)), row


def test_heads_overhead_counts_the_heads_ops(tmp_path: Path) -> None:
    ((row,),), rec = bench(tmp_path, "heads_overhead.py",
                           *"--archs resnet20 --batch 2 --rounds 2 --repeats 1".split())
    assert rec["args"].items() >= {"archs": ["resnet20"], "batch": 2, "rounds": 2, "repeats": 1}.items()
    assert row[0] == "resnet20" and row[2] == "layer1.2, layer2.2"
    plain_ops, head_ops = row[6], row[7]
    assert type(plain_ops) is int and type(head_ops) is int
    assert plain_ops > 1000 and 0 < head_ops < 100, row  # two heads: a few dozen ops on a >1000-op step


@pytest.mark.long(25)
def test_train_memory_grows_with_timesteps(tmp_path: Path) -> None:
    (rows,), rec = bench(tmp_path, "train_memory.py")
    assert rec["args"].items() >= {"arch": "resnet20", "size": 8, "batch": 64}.items()
    assert [r[0] for r in rows] == [2, 4, 8] and rows[0][2] == 1.0
    peaks = [rounded(r[1], 0) for r in rows]
    assert peaks[0] < peaks[1] < peaks[2], rows  # activations are kept for every timestep


TINY_BASE = """
  data: {name: digits, timesteps: 2, batch_size: 32, limit: 64}
  model: {arch: resnet20, width: 4}
  optim: {name: adamw, lr: 0.005, epochs: 4}
final: {optim.epochs: 2}
"""


@pytest.mark.long(90)
def test_search_efficiency_spends_equal_epochs_and_confirms_each_winner(tmp_path: Path) -> None:
    """Random, TPE + Hyperband and PBT at equal epochs; each winner, the control's and the recipe confirmed
    over two seeds, each paired against the control and the recipe."""
    (tmp_path / "recipe.yaml").write_text("data: {name: digits, timesteps: 2, batch_size: 32, limit: 64}\n"
                                          "model: {arch: resnet20, width: 4}\nheads: {exits: [default]}\n")
    (tmp_path / "space.yaml").write_text(
        "study: {name: tiny, seed: 0, recipe: recipe.yaml}\nbase:" + TINY_BASE + "space:\n"
        "  heads.exits: {type: subset, choices: [layer1.0, layer2.0]}\n"
        "  optim.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}\n")
    (tmp_path / "pbt.yaml").write_text(
        "study: {name: tiny_pbt, seed: 0, scheduler: pbt}\nbase:\n  heads: {exits: [default]}\n"
        "  lambda: {schedule: constant}" + TINY_BASE + "space:\n  lambda.start: {type: float, low: 0.0, high: 1.0}\n")
    (searches, found, ranks), rec = bench(tmp_path, "search_efficiency.py", "--space", str(tmp_path / "space.yaml"),
                                          "--trials", "3", "--pbt", "--pbt-space", str(tmp_path / "pbt.yaml"),
                                          "--confirm-seeds", "2")
    assert rec["args"].items() >= {"trials": 3, "seeds": [0], "pbt": True, "confirm_seeds": 2, "workers": 2}.items()
    assert [r[1] for r in searches] == ["random, no pruning", "TPE + Hyperband", "PBT"]
    rand, tpe, pop = searches
    assert rand[3:5] == [3 * 4, 3] and pop[3:5] == [3 * 4, 3]  # every trial and member trains all 4 epochs
    assert 3 * 4 <= tpe[3] < 3 * 4 + 4 and tpe[4] >= 3  # trials until it spent random's epochs, < one trial over
    assert rand[5] is None and pop[5] is None and tpe[5] > 0  # only TPE's study runs the control arm
    assert len(rand) == 7 and len(tpe) == 8 and len(pop) == 9  # to reach: random's best, then TPE's
    for reach, of in ((tpe[7], rand[3]), (pop[7], rand[3]), (pop[8], tpe[3])):
        assert reach is None or 0 < reach["epochs"] <= reach["of"] == of

    by = {r[2]: r for r in found}
    assert sorted(by) == sorted(["random, no pruning", "TPE + Hyperband", "PBT", "control arm (TPE)", "recipe"])
    assert len({r[1] for r in found}) == 5  # a label per config
    assert [by[k][3] for k in ("random, no pruning", "TPE + Hyperband", "PBT", "control arm (TPE)")] == [
        rand[3], tpe[3], pop[3], tpe[5]]
    control = [float(a) for a in by["control arm (TPE)"][5].split()]
    recipe = [float(a) for a in by["recipe"][5].split()]
    for row in found:
        accs = [float(a) for a in row[5].split()]
        assert len(accs) == 2 and row[4]["mean"] == pytest.approx(sum(accs) / 2, abs=1e-3)
        for cell, other, is_self in ((row[6], control, row[2] == "control arm (TPE)"), (row[7], recipe, row[2] == "recipe")):
            if is_self:
                assert cell is None
            else:  # paired by seed: the mean difference, inside its interval
                assert cell["mean"] == pytest.approx(sum(accs) / 2 - sum(other) / 2, abs=2e-3)
                assert cell["low"] <= cell["mean"] <= cell["high"]
                named = "the control" if other is control else "the recipe"
                assert cell["verdict"].startswith("no evidence") or f"than {named}:" in cell["verdict"]
    (rhos,) = ranks  # seed 0, then Spearman's rho after 1, 2 and 3 of the 4 epochs
    assert rhos[0] == 0 and len(rhos) == 1 + 3


def test_shortcut_heads_flow_table_shows_where_the_heads_send_gradient(tmp_path: Path) -> None:
    """Heads on the first stage only: their share is positive up to that stage and zero after it."""
    args = ("--flow --archs resnet20 --rounds 1 "
            "--set data.limit=64 --set model.width=4 --set heads.exits=[layer1.0]")
    (*flows, cost), rec = bench(tmp_path, "shortcut_heads.py", *args.split())
    assert rec["args"].items() >= {"flow": True, "archs": ["resnet20"], "rounds": 1}.items()
    assert len(flows) == 2  # atan and rectangle
    for rows in flows:
        share = {row[0]: row[4] for row in rows}
        assert len(rows) == 19 and all(row[1] > 0 and row[2] > 0 for row in rows)
        assert rounded(share["stem_lif"], 2) > 0 and rounded(share["layer1.0.lif1"], 2) > 0
        assert share["layer3.2.lif2"] == 0
    assert cost[0][0] == "resnet20" and rounded(cost[0][3], 3) > 0


def test_data_loading_compares_on_device_batches_with_the_dataloader(tmp_path: Path) -> None:
    (rows,), rec = bench(tmp_path, "data_loading.py", *"--images 500 --batch 50 --rounds 1".split())
    assert rec["args"].items() >= {"images": 500, "batch": 50, "rounds": 1}.items()
    assert [r[0] for r in rows] == ["ours (on device, batched)", "torchvision DataLoader, 0 workers",
                                    "torchvision DataLoader, 2 workers"]
    assert rows[1][2] == 1.0 and all(rounded(r[1], 0) > 0 for r in rows)


@pytest.mark.long(25)
def test_train_step_benchmark_times_eager_and_compiled_steps(tmp_path: Path) -> None:
    (rows,), rec = bench(tmp_path, "train_step.py",
                         *("--archs resnet8 --batch 2 --timesteps 1 --width 4 --steps 1 --rounds 1 "
                           "--compile-backend aot_eager").split())
    assert rec["args"].items() >= {"batch": 2, "timesteps": 1, "width": 4, "steps": 1, "rounds": 1}.items()
    assert [(r[0], r[1]) for r in rows] == [("resnet8", 0), ("resnet8", 2)]  # the digits config's heads it has
    assert all(rounded(r[2], 1) > 0 and rounded(r[3], 1) > 0 for r in rows)


@pytest.mark.long(25)
def test_depth_benchmark_compares_heads_per_surrogate_and_depth(tmp_path: Path) -> None:
    (rows,), rec = bench(tmp_path, "depth.py", *"--surrogates rectangle atan --archs resnet18 --zoo sew_resnet34 "
                            "--seeds 0 1 --epochs 1 --width 2 --limit 32 --jobs 2".split())
    assert rec["args"]["surrogates"] == ["rectangle", "atan"] and rec["args"]["seeds"] == [0, 1]
    assert [(r[0], r[1], r[2]) for r in rows] == [("rectangle", "resnet18", 18), ("atan", "resnet18", 18),
                                                  ("SpikingJelly's (ATan 2)", "sew_resnet34", 34)]
    for row in rows:
        plain, heads = row[5], row[6]
        assert all(0 <= acc["mean"] <= 1 and acc["sd"] >= 0 for acc in (plain, heads))
        assert row[7] == pytest.approx(heads["mean"] - plain["mean"]) and row[9] > 0
    (rect, atan, zoo) = rows
    assert rect[3] > atan[3] > 0 and zoo[3] is None  # E[sg^2]: ours measured, SpikingJelly's fused LIF hides it
    assert rect[4] > atan[4] > 0  # the first spiking layer's share of the gradient at init: the surrogate's doing


TINY_SPACE = """
study: {name: tiny, seed: 0, pruner: none, heartbeat: 1, control: 0}
base:
  data: {timesteps: 2, batch_size: 32, limit: 128}
  model: {width: 4}
  heads: {exits: [layer1.0]}
  optim: {name: adamw, lr: 0.005, epochs: 6}
space:
  lambda.start: {type: float, low: 0.1, high: 1.0}
"""


@pytest.mark.long(30)
def test_preemption_stress_strands_and_loses_nothing(tmp_path: Path) -> None:
    """Two random SIGTERMs to a 2-worker SQLite search: the table counts what each left and what the end tallies."""
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE)
    ((row,),), rec = bench(tmp_path, "preemption.py", "--rounds", "2", "--storages", "sqlite", "--space",
                           str(space), "--n-trials", "2", "--max-delay", "8")
    assert rec["args"]["rounds"] == 2 and row[0] == "sqlite" and row[1] == 2 and row[2] >= 1
    assert row[3:6] == [0, 0, f"{2 * row[2]} / {2 * row[2]}"]  # nothing left RUNNING, no traceback, all finished
    assert row[6:8] == [0, 0]  # nothing RUNNING or WAITING at the end, no finished epoch trained again
    assert 0 < row[8] <= row[9] < 60  # seconds from the signal to the exit
