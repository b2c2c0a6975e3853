import subprocess
import sys

import optuna
import pytest

from search.samplers import grid
from search.space import SpaceError, load_space, suggest
from trainer.config import load as load_config

from conftest import ROOT

SPACE = """
study: {name: s1, n_trials: 4, sampler: tpe, pruner: median}
base:
  data: {limit: 64}
  optim: {epochs: 2}
final:
  optim.epochs: 5
space:
  lambda.schedule: {type: categorical, choices: [linear, exponential]}
  lambda.rate: {type: float, low: 1.0, high: 8.0, log: true, when: {lambda.schedule: exponential}}
  data.timesteps: {type: int, low: 1, high: 4}
  heads.exits: {type: subset, choices: [layer1.0, layer2.0, layer3.0]}
"""


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_valid_space_loads_and_builds_trial_configs(tmp_path):
    space = load_space(write(tmp_path, SPACE), ["model.width=4"])
    assert [p.key for p in space.params] == ["lambda.schedule", "lambda.rate", "data.timesteps", "heads.exits"]
    assert space.study.directions == ["maximize"] and space.study.metrics == ["val_acc"]
    cfg = space.config({"lambda.schedule": "exponential", "heads.exits": ["layer2.0"]})
    assert cfg.model.width == 4 and cfg.lambda_.schedule == "exponential" and cfg.heads.exits == ["layer2.0"]
    assert space.final_config(cfg.to_dict()).optim.epochs == 5


def test_suggest_respects_conditions_and_subsets(tmp_path):
    space = load_space(write(tmp_path, SPACE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(30):
        trial = study.ask()
        values = suggest(trial, space.params)
        seen.append(values)
        assert ("lambda.rate" in values) == (values["lambda.schedule"] == "exponential")
        assert 1 <= values["data.timesteps"] <= 4
        assert set(values["heads.exits"]) <= {"layer1.0", "layer2.0", "layer3.0"}
        assert "heads.exits:layer1.0" in trial.params
        study.tell(trial, 0.0)
    assert {len(v["heads.exits"]) for v in seen} >= {0, 1, 2}


def test_grid_expands_every_value(tmp_path):
    text = """
study: {name: g, sampler: grid}
space:
  lambda.start: {type: float, low: 0.2, high: 0.6, step: 0.2}
  heads.exits: {type: subset, choices: [layer1.0]}
"""
    space_grid = grid(load_space(write(tmp_path, text)).params)
    assert space_grid["lambda.start"] == pytest.approx([0.2, 0.4, 0.6])
    assert space_grid["heads.exits:layer1.0"] == [False, True]


def test_grid_stays_in_range_and_refuses_a_huge_one(tmp_path):
    text = "study: {name: g, sampler: grid}\nspace: {data.timesteps: {type: int, low: 1, high: 4, step: 2}}"
    with pytest.warns(UserWarning, match="not divisible by `step`"):  # Optuna's, at load, not per trial
        assert grid(load_space(write(tmp_path, text)).params) == {"data.timesteps": [1, 3]}  # as sampled
    with pytest.raises(SpaceError, match=r"'space.data.timesteps.step': grid needs at most 1000000 points"):
        load_space(write(tmp_path, text.replace("high: 4, step: 2", "high: 100000000")))


def test_a_param_records_its_own_fields_as_its_identity(tmp_path):
    """What ``search.study.identity`` stores of each parameter: its kind's fields, defaults included."""
    assert [p.identity() for p in load_space(write(tmp_path, SPACE)).params] == [
        {"type": "categorical", "when": {}, "choices": ["linear", "exponential"]},
        {"type": "float", "when": {"lambda.schedule": ["exponential"]}, "low": 1.0, "high": 8.0, "log": True,
         "step": None},
        {"type": "int", "when": {}, "low": 1, "high": 4, "log": False, "step": None},
        {"type": "subset", "when": {}, "choices": ["layer1.0", "layer2.0", "layer3.0"]},
    ]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("study: {name: a, sampler: bayes}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "'study.sampler': unknown sampler 'bayes' (allowed: tpe, gp, cmaes, random, nsga2, grid)"),
        ("study: {name: a, pruner: asha}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "'study.pruner': unknown pruner 'asha' (allowed: median, hyperband, successive_halving, none)"),
        ("study: {name: a, metric: accuracy}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "unknown metric 'accuracy' (allowed: val_acc, val_loss, energy, sops, spike_rate, train_time)"),
        ("study: {name: a}\nspace: {lambda.start: {type: float, low: 1, high: 0}}",
         "'space.lambda.start': needs low <= high"),
        ("study: {name: a}\nspace: {lambda.start: {type: uniform}}",
         "'space.lambda.start.type': required (allowed: float, int, categorical, subset)"),
        ("study: {name: a}\nspace: {lambda.start: {type: float, low: 0, high: 1, when: {x.y: 1}}}",
         "'space.lambda.start.when': 'x.y' must be a parameter listed earlier"),
        ("study: {name: a}\nspace: {lambda.start: {type: float, low: 0, high: 2}}",
         "'lambda.start': Input should be less than or equal to 1"),
        ("study: {name: a}\nspace: {lambda.shape: {type: categorical, choices: [a]}}",
         "unknown key 'lambda.shape' (allowed: schedule, start, end"),
        ("study: {name: a}\nspace: {heads.exits: {type: subset, choices: [layer9.0]}}",
         "bad value for 'heads.exits': resnet20 has no module 'layer9.0' (closest: layer3.0,"),
        ("study: {name: a, max_retry: -1}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "'study.max_retry': must be an integer >= 0 (got -1)"),
        ("study: {name: a, metric: [val_acc, spike_rate]}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "'study.pruner': Optuna cannot prune multi-objective studies (allowed: none)"),
        ("study: {name: a, min_epochs: 0}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "'study.min_epochs': must be an integer >= 1 (got 0)"),
        ("study: {name: a}\nbogus: 1", "'bogus': unknown section (allowed: study, base, final, space)"),
        ("study: {name: a, sampler: grid}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "grid needs a step for float parameters"),
        ("study: {name: a}\nbase: {optim: {lr: -1}}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "'optim.lr': Input should be greater than 0"),
        ("study: {name: a}\nfinal: {optim.epochs: 0}\nspace: {lambda.start: {type: float, low: 0, high: 1}}",
         "final: bad value for 'optim.epochs'"),
    ],
)
def test_bad_space_gives_one_line_error_naming_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    message = str(err.value)
    assert str(path) in message and expected in message and "\n" not in message


@pytest.mark.parametrize(
    "study,param,expected",
    [
        ("", "low: .inf, high: 1", "'space.lambda.start.low': must be a finite number (got inf)"),
        ("", "low: 0, high: .nan", "'space.lambda.start.high': must be a finite number (got nan)"),
        ("", "low: 0, high: 1, step: .inf", "'space.lambda.start.step': must be a finite number > 0 (got"),
        ("", "low: 0, high: 1.0e+400", "'space.lambda.start.high': must be a finite number (got inf)"),
        ("", "low: 0, high: 1" + "0" * 400, "'space.lambda.start.high': must be a finite number (got 1000"),
        (", timeout: .inf", "low: 0, high: 1", "'study.timeout': must be seconds > 0 or null (got inf)"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, study, param, expected):
    """Optuna would take them and fail later, in a worker (``high: .inf`` raised OverflowError there)."""
    path = write(tmp_path, f"study: {{name: a{study}}}\nspace: {{lambda.start: {{type: float, {param}}}}}")
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert str(err.value).startswith(f"{path}: {expected}") and "\n" not in str(err.value)


# Four levels of ten aliases: 10**4 strings once expanded, under the file's limit of 100,000 values (a bigger
# bomb is refused before any key is read: tests/test_reliability.py), whose repr would still be 60 KB.
BOMB = "final: {l0: &l0 x, " + ", ".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]"
                                        for i in range(1, 5)) + "}\n"


@pytest.mark.parametrize(
    "study,param,key",
    [
        ("{name: a, sampler: *l4}", "low: 0, high: 1", "'study.sampler': unknown sampler [["),
        ("{name: a}", "low: *l4, high: 1", "'space.lambda.start.low': must be a finite number (got [["),
    ],
)
def test_a_refused_alias_bomb_is_quoted_in_at_most_80_characters(tmp_path, study, param, key):
    path = write(tmp_path, f"{BOMB}study: {study}\nspace: {{lambda.start: {{type: float, {param}}}}}")
    with pytest.raises(SpaceError) as err:
        load_space(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}") and "..." in message
    wording = len("unknown sampler  (allowed: tpe, gp, cmaes, random, nsga2, grid)")  # the longest around it
    assert len(message) - len(f"{path}: {key}") <= 80 + wording


def test_cli_bad_space_exits_2_and_creates_no_study(tmp_path):
    path = write(tmp_path, "study: {name: a, sampler: bayes}\nspace: {lambda.start: {type: float, low: 0, high: 1}}")
    db = tmp_path / "a.db"
    proc = subprocess.run(
        [sys.executable, "search/run.py", "--space", str(path), "--storage", f"sqlite:///{db}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "study.sampler" in proc.stderr
    assert not db.exists()


SHIPPED = sorted((ROOT / "spaces").glob("*.yaml"))
RECIPES = sorted(set((ROOT / "configs").glob("*.yaml")) - {ROOT / "configs" / "digits.yaml"})


def test_ships_the_documented_spaces():
    assert {p.stem for p in SHIPPED} >= {"lambda_decay", "head_positions", "timesteps", "full"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_takes_each_recipe_as_its_base(path):
    """--base swaps in a recipe: trials and the final model run its full length (unless --set shortens the
    trials); a space whose head exits the recipe's net lacks says so in one line."""
    for recipe in RECIPES:
        want = load_config(recipe)
        try:
            space = load_space(path, [], recipe)
        except SpaceError as err:  # the space names exits (or a model) of its own
            assert path.stem in ("full", "head_positions", "custom_model", "deep_heads"), err
            assert f"'heads.exits': {want.model.arch} has no module" in str(err)
            continue
        cfg = space.config({})
        assert (cfg.data.name, cfg.model.arch, cfg.optim.lr) == (want.data.name, want.model.arch, want.optim.lr)
        assert cfg.optim.epochs == space.final["optim.epochs"] == want.optim.epochs
        short = load_space(path, ["optim.epochs=10"], recipe)
        assert short.config({}).optim.epochs == 10 and short.final["optim.epochs"] == want.optim.epochs
    own = load_space(path)  # without --base the space's own final length holds
    assert own.final["optim.epochs"] == 30 and own.config({}).optim.epochs < 30


def test_paper_scale_command_needs_its_own_study(tmp_path, capsys):
    """The README's path from the digits default to paper scale: the same study name is refused with one
    line; a new one starts and says the recipe's epochs before anything trains."""
    from search import run as run_cli

    url = f"sqlite:///{tmp_path}/s.db"
    space = ROOT / "spaces" / "lambda_decay.yaml"
    digits = ["--space", str(space), "--storage", url, "--study-dir", str(tmp_path / "d")]
    assert run_cli.main([*digits, "--n-trials", "1", "--set", "data.limit=32", "--set", "optim.epochs=1"]) == 0
    capsys.readouterr()
    paper = [*digits, "--base", str(ROOT / "configs" / "cifar10_resnet19.yaml"), "--n-trials", "1",
             "--set", f"data.root={tmp_path}"]
    assert run_cli.main(paper) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "study 'lambda_decay' was created with base." in err and "--study-name" in err
    assert run_cli.main([*paper, "--study-name", "lambda_decay_cifar10"]) == 0
    out = capsys.readouterr().out
    assert ("trials: 300 epochs each on cifar10 (resnet19, T=4), pruned no earlier than epoch 100; final "
            "retraining (search/retrain.py): 300 epochs on train + validation") in out
    trial = optuna.load_study(study_name="lambda_decay_cifar10", storage=url).trials[0]
    assert "data.download=true" in trial.user_attrs["fail_reason"]  # CIFAR-10 is not on this disk


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_runs_a_trial(tmp_path, path, capsys):
    """Each shipped space runs a trial; a PBT space trains a population on Ray, which tests/test_pbt.py runs
    from spaces/lambda_pbt.yaml: here the Optuna backend refuses it in one line."""
    from search import run as run_cli

    url = f"sqlite:///{tmp_path}/s.db"
    args = ["--space", str(path), "--storage", url, "--n-trials", "1", "--set", "data.limit=32",
            "--set", "optim.epochs=1", "--set", "model.width=4"]
    if load_space(path).study.scheduler == "pbt":
        assert run_cli.main(args) == 2 and "add --backend ray" in capsys.readouterr().err
        return
    assert run_cli.main(args) == 0
    trial = optuna.load_study(study_name=load_space(path).study.name, storage=url).trials[0]
    assert trial.state.name == "COMPLETE" and trial.user_attrs["epochs_run"] == 1
