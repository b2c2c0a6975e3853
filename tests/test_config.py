import subprocess
import sys

import pytest

from trainer.config import Config, ConfigError, load
from trainer.errors import UserError

from conftest import ROOT


def test_defaults_are_the_offline_digits_run():
    cfg = Config()
    assert cfg.data.name == "digits" and cfg.model.arch == "resnet20" and cfg.heads.exits == []


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\n  epochs: 3\nlambda:\n  schedule: linear\n")
    cfg = load(path, ["optim.epochs=7", "heads.exits=[layer1.0, layer2.1]", "neuron.surrogate=atan"])
    assert cfg.optim.lr == 0.05 and cfg.optim.epochs == 7
    assert cfg.heads.exits == ["layer1.0", "layer2.1"]
    assert cfg.lambda_.schedule == "linear" and cfg.neuron.surrogate == "atan"
    assert cfg.to_dict()["lambda"]["schedule"] == "linear"  # round-trips under the YAML key


def test_round_trip_through_dict():
    cfg = load(None, ["lambda.start=0.7", "data.timesteps=2"])
    assert Config.model_validate(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optim.lrr=0.1", "unknown key 'optim.lrr' (allowed: name, lr, momentum"),
        ("bogus.x=1", "unknown key 'bogus' (allowed: data, model, neuron, heads, lambda, optim, run, provenance)"),
        ("neuron.surrogate=relu", "'neuron.surrogate': Input should be 'atan', 'sigmoid', 'rectangle' or 'triangle'"),
        ("data.timesteps=0", "'data.timesteps': Input should be greater than or equal to 1"),
        ("lambda.start=1.5", "'lambda.start': Input should be less than or equal to 1"),
        ("optim.lr=fast", "'optim.lr'"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load(None, [override])
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load(bad)
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such file"):
        load(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        load(listy)


def test_cli_bad_key_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--set", "model.arch=resnet9"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.arch" in lines[0] and "resnet20" in lines[0]


def test_device_takes_an_index_and_a_missing_gpu_is_an_error():
    from trainer.fit import resolve_device

    assert load(None, ["run.device=cuda:1"]).run.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"bad value for 'run.device'.*got 'gpu'"):
        load(None, ["run.device=gpu"])
    assert resolve_device("cpu").type == "cpu"
    if not __import__("torch").cuda.is_available():  # CI: no GPU, so asking for one must fail loudly
        with pytest.raises(UserError, match="run.device is 'cuda:3' but 0 CUDA devices are visible"):
            resolve_device("cuda:3")


def test_head_exits_are_checked_against_the_architecture_on_a_dry_run():
    from trainer.probe import check

    assert list(check(load(None, ["model.arch=resnet18", "heads.exits=[layer4.1]"]))) == ["layer4.1"]
    with pytest.raises(UserError, match=r"resnet20 has no module 'layer4.1' \(closest: layer3.1, layer2.1, "):
        check(load(None, ["heads.exits=[layer4.1]"]))
    assert list(check(load(None, ["heads.exits=[default]"]))) == ["layer1.2", "layer2.2"]  # stage ends


@pytest.mark.parametrize("section,key,registry", [
    ("data", "name", "trainer.data:DATASETS"),
    ("neuron", "surrogate", "trainer.surrogate:SURROGATES"),
    ("lambda_", "schedule", "trainer.schedule:SCHEDULES"),
    ("optim", "name", "trainer.optim:OPTIMIZERS"),
])
def test_the_allowed_names_are_the_registrys(section, key, registry):
    """Each choice's allowed values are its registry's names, and a bad one's error lists them all."""
    import importlib
    from typing import get_args

    module, name = registry.split(":")
    names = list(getattr(importlib.import_module(module), name))
    field = Config.model_fields[section].annotation.model_fields[key]
    assert list(get_args(field.annotation)) == names
    with pytest.raises(ConfigError) as err:
        load(None, [f"{Config.model_fields[section].alias or section}.{key}=bogus"])
    assert all(repr(n) in str(err.value) for n in names)


def test_the_architecture_is_a_registered_name_or_an_import_path():
    from trainer.models import ARCHS

    assert load(None, ["model.arch=vgg16"]).model.arch == "vgg16"
    assert load(None, ["model.arch=examples.my_snn:build"]).model.arch == "examples.my_snn:build"
    with pytest.raises(ConfigError) as err:
        load(None, ["model.arch=bogus"])
    assert all(repr(n) in str(err.value) for n in ARCHS) and "or package.module:builder" in str(err.value)
    with pytest.raises(ConfigError, match="'model.kwargs': it is for a builder at an import path"):
        load(None, ["model.kwargs={depth: 3}"])


def test_the_registries_never_import_the_config():
    """The config reads the registries' names, so none of them may import it back (the import graph of
    the whole project is checked in tests/test_layout.py)."""
    registries = "trainer.models, trainer.data, trainer.schedule, trainer.optim, trainer.surrogate"
    code = f"import sys, {registries}; print('trainer.config' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr
