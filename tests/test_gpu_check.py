"""The GPU checks cannot rot between GPU loans: ``benchmarks/gpu.py --smoke`` runs every stage at a tiny
size on the CPU, and each must report a figure, or a reason where it needs CUDA. Their docs page renders
the newest GPU run's JSON (that docs/benchmarks/gpu.md is current is tests/test_docs.py's check, as
docs/gen_reference.py generates it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # its scripts import each other by name

import gpu  # noqa: E402
from record import Table  # noqa: E402
from test_benchmarks import printed_tables  # noqa: E402

@pytest.fixture(scope="session")
def smoke(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> tuple[dict[str, Any], str]:
    """The smoke run's record and printed output: one run (about a minute on 2 cores) for every test here,
    whichever pytest-xdist worker asks first; the others wait for its files (pytest-xdist's recipe)."""
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    path, printed = shared / "gpu-smoke.json", shared / "gpu-smoke.out"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            out = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--json", str(path)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
            printed.write_text(out.stdout)
    return json.loads(path.read_text()), printed.read_text()


def rows(record: dict[str, Any], stage: str) -> list[list[Any]]:
    return [row for i in record["stages"][stage]["tables"] for row in record["tables"][i]["rows"]]


def is_figure(cell: Any) -> bool:
    return isinstance(cell, int | float) and not isinstance(cell, bool)


@pytest.mark.long(80)  # the smoke run; the page's test, later, reads its files
def test_every_stage_reports_a_figure_or_a_reason(smoke: tuple[dict[str, Any], str]) -> None:
    record, stdout = smoke
    assert set(record) == {"script", "date", "machine", "args", "tables", "commit", "stages"}
    assert record["script"] == "gpu.py" and record["args"]["smoke"]
    assert record["machine"]["torch"] == torch.__version__ and record["commit"]  # this is a clone
    assert list(record["stages"]) == [s.name for s in gpu.STAGES]
    for name, stage in record["stages"].items():
        assert set(stage) == {"status", "seconds", "bound_s", "reason", "tables"}, name
        assert stage["status"] in ("ok", "failed", "skipped") and stage["seconds"] >= 0, name
        if stage["status"] == "ok":
            tables = [record["tables"][i] for i in stage["tables"]]
            assert tables and all(any(is_figure(c) for row in t["rows"] for c in row) for t in tables), name
        else:
            assert isinstance(stage["reason"], str) and stage["reason"], name
    # on a CPU every stage runs; only what needs CUDA gives a reason instead of a figure, in its row
    assert {n: s["status"] for n, s in record["stages"].items()} == dict.fromkeys(record["stages"], "ok"), \
        {n: s["reason"] for n, s in record["stages"].items()}
    assert printed_tables(stdout) == [Table.from_dict(t).markdown() for t in record["tables"]]
    for row in rows(record, "lif") + rows(record, "epoch"):
        assert any(is_figure(c) for c in row[1:-1]) != bool(row[-1]) or row[-1].startswith("smoke"), row
    epoch = {row[0]: row for row in rows(record, "epoch")}
    assert epoch["compiled + CUDA graphs"][-1] == "needs CUDA"
    assert all(is_figure(epoch[name][1]) and epoch[name][6] == 0 for name in ("eager", "compiled"))  # warm
    lif = {(row[0], row[1]): row for row in rows(record, "lif")}
    assert lif[(2, "SpikingJelly cupy")][-1] == lif[(2, "SpikingJelly triton")][-1] == "needs CUDA"
    assert all(lif[(t, name)][5] and lif[(t, name)][6] for t in (2, 4)
               for name in ("ours loop", "ours fused eager"))  # spikes and gradients equal the reference's
    *per_epoch, summary = rows(record, "resume")
    assert len(per_epoch) == 3 and summary[2] and summary[4]  # on a CPU the resumed run is the unbroken one
    assert [row[1] for row in rows(record, "workers")] and all(row[1] >= 1 for row in rows(record, "workers"))


def test_the_page_shows_the_newest_gpu_run_or_says_there_is_none(smoke: tuple[dict[str, Any], str],
                                                                 tmp_path: Path) -> None:
    empty = "\n".join(gpu.page(tmp_path))
    assert "No GPU run yet: run `make gpu-check` on a GPU machine." in empty
    assert all(f"| {s.name} |" in empty for s in gpu.STAGES)
    record = {**smoke[0], "machine": {**smoke[0]["machine"], "cuda": "NVIDIA H200"}, "commit": "abc1234"}
    (tmp_path / "2026-01-02-nvidia-h200.json").write_text(json.dumps(record))
    for name in ("2026-01-01-nvidia-h100.json", "2026-01-03-cpu.json", "gpu-smoke.json", "lif.json"):
        (tmp_path / name).write_text(json.dumps({**record, "commit": "not this one"}))
    assert gpu.newest(tmp_path) == tmp_path / "2026-01-02-nvidia-h200.json"
    text = "\n".join(gpu.page(tmp_path))
    assert "**Machine:** NVIDIA H200;" in text and "**Date:** " + record["date"] in text
    assert "**Commit:** `abc1234`" in text and "not this one" not in text
    assert all(f"## {s.name}" in text for s in gpu.STAGES)
    assert all(Table.from_dict(t).markdown() in text for t in record["tables"])


@pytest.mark.waits  # for each stage's bound to pass
def test_a_stage_is_stopped_at_its_bound_and_a_failing_one_does_not_end_the_run(tmp_path: Path) -> None:
    run = gpu.Run(torch.device("cpu"), False, tmp_path)

    def slow(run: gpu.Run) -> None:
        run.table("t", "n").add(1)
        time.sleep(10)

    t0 = time.perf_counter()
    stopped = gpu.run_stage(gpu.Stage("slow", 1, "sleeps", slow), run, 100)
    assert time.perf_counter() - t0 < 5 and stopped["status"] == "failed"
    assert stopped["reason"] == "stopped at its 1 s bound" and stopped["tables"][0].rows == [[1]]  # kept
    smoke = gpu.run_stage(gpu.Stage("slow", 1, "sleeps", slow), gpu.Run(torch.device("cpu"), True, tmp_path), 100)
    assert smoke["reason"] == f"stopped at its {gpu.SMOKE_SLACK} s bound"  # a loaded CPU's slack, not the GPU's

    def broken(run: gpu.Run) -> None:
        raise ValueError("first line\nsecond | line")

    failed = gpu.run_stage(gpu.Stage("broken", 10, "raises", broken), run, 100)
    assert (failed["status"], failed["reason"]) == ("failed", "ValueError: first line")
    skipped = gpu.run_stage(gpu.Stage("late", 10, "never runs", broken), run, gpu.MIN_STAGE_S - 1)
    assert (skipped["status"], skipped["reason"]) == ("skipped", "no time left")
