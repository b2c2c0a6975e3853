"""The commands' contract: installed entry points, and every user error one line on stderr, exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent  # the venv's console scripts

SPACE = """
study: {name: cli, seed: 0, pruner: none, control: 0}
base:
  data: {limit: 32, timesteps: 2, batch_size: 16}
  model: {width: 4}
  optim: {epochs: 1}
space:
  lambda.start: {type: float, low: 0.1, high: 1.0}
"""


def run(*cmd, cwd=ROOT):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.mark.long(25)
def test_snn_search_run_and_the_documented_script_run_the_same_study(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    url = f"sqlite:///{tmp_path}/cli.db"
    first = run(BIN / "snn-search", "run", "--space", space, "--storage", url, "--n-trials", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "trial 0 complete" in first.stdout and "export: snn-search export --study cli" in first.stdout
    second = run(sys.executable, "search/run.py", "--space", space, "--storage", url, "--n-trials", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "trial 1 complete" in second.stdout  # the script topped up the same study
    exported = run(BIN / "snn-search", "export", "--study", "cli", "--storage", url, "--out", tmp_path / "out")
    assert exported.returncode == 0 and (tmp_path / "out" / "best.yaml").exists(), exported.stderr


@pytest.mark.parametrize("cmd, fragments", [
    (["search/run.py", "--space", "no/such.yaml"], ["no/such.yaml: no such file"]),
    (["-m", "search.cli", "bogus"], ["unknown command 'bogus'", "run, confirm, export, retrain, report"]),
    (["-m", "search.cli", "export", "--study", "nope", "--storage", "sqlite:///nope.db"], ["no such database file"]),
    (["-m", "search.cli", "report", "--study", "nope", "--storage", "sqlite:///nope.db"], ["no such database file"]),
    (["-m", "search.cli", "retrain", "no/such.yaml"], ["no/such.yaml: no such file"]),
    (["-m", "trainer", "--set", "data.name=mnist", "--set", "data.root={tmp}"], ["mnist not found under"]),
    (["-m", "trainer", "--set", "run.device=cuda:99"], ["run.device is 'cuda:99'", "allowed here: auto, cpu"]),
    (["-m", "trainer", "--set", "model.arch=resnet9"], ["model.arch", "resnet20"]),
    (["-m", "trainer", "--epochs", "3"], ["unrecognized arguments: --epochs"]),
    (["-m", "trainer", "--set", "optim.lr=["], ["override: 'optim.lr': not a YAML value"]),
    (["search/run.py", "--space", "spaces/lambda_decay.yaml", "--set", "run.device=cuda:99",
      "--storage", "sqlite:///{tmp}/x.db"], ["run.device is 'cuda:99'"]),
])
def test_every_user_error_is_one_line_and_exit_2(tmp_path, cmd, fragments):
    one_line_error(run(sys.executable, *[c.format(tmp=tmp_path) for c in cmd]), *fragments)


def test_workers_refuse_prefixes_instead_of_passing_them_to_children(tmp_path):
    """``--dev`` was once taken for ``--devices`` and passed through to each child, which started workers
    of its own; now it is refused before anything starts."""
    proc = run(sys.executable, "search/run.py", "--space", "spaces/lambda_decay.yaml", "--dev", "cpu,cpu",
               "--storage", f"sqlite:///{tmp_path}/x.db")
    one_line_error(proc, "--dev")
    assert not (tmp_path / "x.db").exists()


def test_snn_search_alone_lists_its_commands_in_plain_text_and_says_its_version():
    from importlib.metadata import version

    alone = subprocess.run([sys.executable, "-m", "search.cli"], cwd=ROOT, capture_output=True, text=True)
    assert alone.returncode == 2 and "``" not in alone.stdout
    assert [line.split()[0] for line in alone.stdout.splitlines() if line.startswith("  ")] == [
        "run", "confirm", "export", "retrain", "report"]
    said = subprocess.run([sys.executable, "-m", "search.cli", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert said.returncode == 0 and said.stdout == f"snn-search {version('snn-shortcut-search')}\n"
