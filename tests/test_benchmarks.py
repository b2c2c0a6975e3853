"""Each benchmark runs end to end at a tiny size and prints the table the README quotes.

Timings at these sizes mean nothing; what is checked is what a table claims beyond time (equal spikes
and gradients, op counts, memory growth, the search comparison), so a broken benchmark fails CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> list[list[list[str]]]:
    """Run benchmarks/<script>; return its tables, each as the cells of its rows (header and rule excluded)."""
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    tables: list[list[list[str]]] = [[]]
    for line in out.stdout.splitlines():
        if line.startswith("|"):
            tables[-1].append([c.strip() for c in line.strip("|").split("|")])
        elif tables[-1]:
            tables.append([])
    return [t[2:] for t in tables if t]


def test_lif_benchmark_checks_every_neuron_against_the_reference() -> None:
    (rows,) = bench("lif.py", "--timesteps", "2", "--batch", "2", "--rounds", "2", "--repeats", "1")
    ours = {row[1]: row for row in rows if row[1].startswith("ours")}
    assert set(ours) == {"ours loop", "ours fused eager", "ours fused+compile"}
    for row in ours.values():
        assert row[0] == "2" and float(row[2]) > 0
        assert row[5:7] == ["True", "True"], row  # spikes and gradients equal the reference loop's
    assert ours["ours loop"][3] == "1.00x"


def test_heads_overhead_counts_the_heads_ops() -> None:
    ((row,),) = bench("heads_overhead.py", "--archs", "resnet20", "--batch", "2", "--rounds", "2", "--repeats", "1")
    assert row[0] == "resnet20" and row[2] == "layer1.2, layer2.2"
    plain_ops, head_ops = int(row[6]), int(row[7])
    assert plain_ops > 1000 and 0 < head_ops < 100, row  # two heads: a few dozen ops on a >1000-op step


def test_train_memory_grows_with_timesteps() -> None:
    (rows,) = bench("train_memory.py")
    assert [r[0] for r in rows] == ["2", "4", "8"]
    peaks = [float(r[1]) for r in rows]
    assert peaks[0] < peaks[1] < peaks[2], rows  # activations are kept for every timestep


def test_search_efficiency_compares_both_searches() -> None:
    searches, ranks = bench("search_efficiency.py", "--trials", "3", "--set", "optim.epochs=4", "--set", "data.limit=64")
    assert [r[1] for r in searches] == ["random, no pruning", "TPE + Hyperband"]
    rand, tpe = searches
    assert int(rand[3]) == 3 * 4  # random search runs every trial to the end
    assert 0 < int(tpe[3]) <= 3 * 4
    assert tpe[6] == "not reached" or tpe[6].endswith("%"), tpe
    (rhos,) = ranks  # seed 0, then Spearman's rho after 1, 2 and 3 of the 4 epochs
    assert rhos[0] == "0" and len(rhos) == 1 + 3


def test_shortcut_heads_flow_table_shows_where_the_heads_send_gradient() -> None:
    """Heads on the first stage only: their share is positive up to that stage and zero after it."""
    *flows, cost = bench("shortcut_heads.py", "--flow", "--archs", "resnet20", "--rounds", "1",
                         "--set", "data.limit=64", "--set", "model.width=4", "--set", "heads.exits=[layer1.0]")
    assert len(flows) == 2  # atan and rectangle
    for rows in flows:
        share = {row[0]: float(row[4]) for row in rows}
        assert len(rows) == 19 and all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)
        assert share["stem_lif"] > 0 and share["layer1.0.lif1"] > 0 and share["layer3.2.lif2"] == 0
    assert cost[0][0] == "resnet20" and float(cost[0][3]) > 0


def test_data_loading_compares_on_device_batches_with_the_dataloader() -> None:
    (rows,) = bench("data_loading.py", "--images", "500", "--batch", "50", "--rounds", "1")
    assert [r[0] for r in rows] == ["ours (on device, batched)", "torchvision DataLoader, 0 workers",
                                    "torchvision DataLoader, 2 workers"]
    assert rows[1][2] == "1.0x" and all(float(r[1].replace(",", "")) > 0 for r in rows)


def test_train_step_benchmark_times_eager_and_compiled_steps() -> None:
    (rows,) = bench("train_step.py", "--batch", "2", "--timesteps", "1", "--width", "4", "--steps", "1",
                    "--rounds", "1")
    assert [(r[0], r[1]) for r in rows] == [("resnet20", "0"), ("resnet20", "6")]  # digits config's six heads
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
