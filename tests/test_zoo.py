"""Any spiking network: a user's own module by import path, SpikingJelly's zoo, heads at any module."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from search import export as export_cli
from search import retrain as retrain_cli
from search import run as run_cli
from trainer.config import load
from trainer.fit import fit
from trainer.probe import probe

from conftest import ROOT

DIGITS = ["data.limit=32", "data.timesteps=2", "data.batch_size=16", "optim.epochs=1", "optim.name=adamw",
          "optim.lr=0.01", "lambda.schedule=constant", "lambda.start=0.5"]
FIRES = {"v_threshold": 0.2}  # SpikingJelly's LIFNode passes its kwargs on; at threshold 1 these nets are silent on digits
ZOO = {  # SpikingJelly's models at a size that trains an epoch of digits in seconds: (kwargs, exits, spikes reach a conv)
    "sew_resnet18": ({"model": "sew_resnet18", "cnf": "ADD", **FIRES}, ["layer1", "layer2"], True),
    "ms_resnet18": ({"model": "ms_resnet18", "base_channels": 8, **FIRES}, ["layer1", "layer2"], True),
    "spiking_vgg": ({"model": "SpikingVGG", "cfg": [8, "M", 512, "M"], "batch_norm": True, "norm_layer": None, **FIRES},
                    ["features.3", "features.7"], True),  # its classifier is VGG's: 512*7*7 -> 4096 -> 4096
    "spikformer": ({"model": "Spikformer", "img_size_h": 8, "img_size_w": 8, "patch_size": 4, "embed_dims": 16,
                    "num_heads": 2, "depths": 2, **FIRES}, ["blocks.0.attn", "blocks.1"], False),  # silent after 1 epoch
}


@pytest.mark.parametrize("name", list(ZOO))
def test_spikingjelly_models_train_with_heads_and_strip_to_their_own_module(name):
    from trainer.zoo import spikingjelly

    kwargs, exits, fires = ZOO[name]
    cfg = load(None, DIGITS + ["model.arch=trainer.zoo:spikingjelly", f"model.kwargs={json.dumps(kwargs)}",
                               f"heads.exits={json.dumps(exits)}", "heads.tokens=dn"])
    result = fit(cfg)
    report = result.history[0]
    assert report.metrics["train_loss"] > 0 and 0 <= result.test["test_acc"] <= 1
    # SpikingJelly's BaseNode layers are the spiking layers the diagnostics see
    assert report.firing_rates and all(0 <= r <= 1 for r in report.firing_rates.values())
    assert report.grad_flow and all(v["mean"] >= 0 for v in report.grad_flow.values())
    assert report.metrics["macs"] > 0  # the first conv reads the images: multiply-accumulates
    assert (report.metrics["sops"] > 0) == fires  # multi-step convs fed spikes count accumulates
    assert report.metrics["lambda"] == 0.5 and len(result.history) == 1
    # the stripped model is SpikingJelly's own module, unchanged: no hooks, no heads
    assert type(result.model).__module__.startswith("spikingjelly.")
    assert not any(m._forward_hooks for m in result.model.modules())
    fresh = spikingjelly(num_classes=10, in_channels=1, **kwargs)
    fresh.load_state_dict(result.model.state_dict(), strict=True)  # what model.pt holds (the next tests read one)


def test_a_spikformer_head_reads_tokens_and_a_stateful_neuron_starts_each_batch_at_rest():
    from spikingjelly.activation_based import functional

    kwargs = ZOO["spikformer"][0] | {"depths": 1}
    cfg = load(None, ["model.arch=trainer.zoo:spikingjelly", f"model.kwargs={json.dumps(kwargs)}"])
    taps = probe(cfg).taps
    attn = taps["blocks.0.attn"]  # SpikingJelly's attention gives [T, B, D, N]: 16 features of 4 tokens
    assert attn.layout == "tokens" and attn.shape == (3, 2, 16, 4) and attn.channels("dn") == 16
    assert attn.channels("nd") == 4 and taps["blocks.0"].layout == "image"
    from trainer.heads import ShortcutHead

    for tokens, pooled in (("dn", (0, 3)), ("nd", (0, 2))):
        head = ShortcutHead(attn, 10, 0, None, tokens)
        assert head.pool == pooled and head.fc.in_features == attn.channels(tokens)
    from trainer.zoo import spikingjelly

    net = spikingjelly(num_classes=10, in_channels=1, **kwargs).eval()
    x = torch.rand(2, 3, 1, 8, 8)
    first = net(x)
    functional.reset_net(net)
    assert torch.equal(net(x), first)  # from rest, the same input gives the same output
    from trainer.fit import evaluate

    batches = [(x[0], torch.zeros(3, dtype=torch.long))] * 2  # evaluate encodes [B, C, H, W] itself
    a = evaluate(net, batches, load(None, ["data.timesteps=2"]), torch.device("cpu"))
    b = evaluate(net, batches[:1], load(None, ["data.timesteps=2"]), torch.device("cpu"))
    assert a == b  # the second batch started at rest too, or its loss would differ


BAD = '''
import torch
from torch import nn

def raises(num_classes, in_channels):
    raise ValueError("width must be even")

class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 7, 3)
    def forward(self, x):
        return self.conv(x.flatten(0, 1))

def wrong_output(num_classes, in_channels):
    return Flat()

class Broken(nn.Module):
    def forward(self, x):
        return x.reshape(7, -1)  # 384 values do not make rows of 7

def forward_raises(num_classes, in_channels):
    return Broken()

def channels(num_classes, channels):
    return Broken()
'''


@pytest.mark.parametrize("arch,fragment", [
    ("nowhere.models:build", "model.arch: cannot import 'nowhere.models' for 'nowhere.models:build' "
                             "(ModuleNotFoundError"),
    ("bad_models:absent", "model.arch: 'bad_models' has no attribute 'absent'"),
    ("bad_models:raises", "building bad_models:raises raised ValueError: 'width must be even'"),
    ("bad_models:forward_raises", "bad_models:forward_raises failed on a [T=3, B=2, 1, 8, 8] input (RuntimeError"),
    ("bad_models:wrong_output", "bad_models:wrong_output returned (6, 7, 6, 6) for a [T=3, B=2, ...] input; a model "
                                "returns logits [B, classes] or [T, B, classes] (classes = 10)"),
    # the errors that name their fix: the builder contract, SpikingJelly's zoo through its adapter
    ("bad_models:channels", "unexpected keyword argument 'in_channels'\"; a builder is called as builder("
                            "num_classes=..., in_channels=..., **model.kwargs) and returns a module taking "
                            "[T, B, C, H, W] (see docs/how-to/bring-your-own-model.md)"),
    ("spikingjelly.activation_based.model.sew_resnet:sew_resnet18",
     "SpikingJelly's builders need a neuron and multi-step mode: use model.arch=trainer.zoo:spikingjelly with "
     "model.kwargs={model: sew_resnet18}"),
])
def test_a_model_that_cannot_work_is_one_line_before_anything_trains(tmp_path, monkeypatch, capsys, arch, fragment):
    from trainer.__main__ import main

    (tmp_path / "bad_models.py").write_text(BAD)
    monkeypatch.chdir(tmp_path)  # import paths resolve in the folder a command runs in
    monkeypatch.setattr("trainer.fit.load_data", lambda *a: pytest.fail("data read before the model was checked"))
    assert main(["--set", f"model.arch={arch}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


def test_list_exits_prints_every_module_a_head_reads_with_its_shape():
    proc = subprocess.run([sys.executable, "-m", "trainer", "--list-exits", "--set", "model.arch=examples.my_snn:build"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# examples.my_snn:build on digits:")
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["block1"] == ["image", "16x8x8"] and rows["block1.conv"] == ["flat", "16x8x8"]
    assert rows["classifier"] == ["vector", "10"]
    listed = subprocess.run([sys.executable, "-m", "trainer", "--list-exits"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120).stdout.splitlines()
    assert [line.split()[0] for line in listed if line.endswith("default")] == ["layer1.2", "layer2.2"]


def test_a_search_over_my_own_model_retrains_into_my_own_class(tmp_path, capsys):
    """spaces/custom_model.yaml as shipped, shortened: 2 trials, export, retrain, and the retrained weights
    load into examples/my_snn.py's class with strict=True and answer as the saved model does."""
    from examples.my_snn import MySNN
    from trainer.checkpoint import load_model

    url = f"sqlite:///{tmp_path}/c.db"
    short = ["--set", "optim.epochs=2", "--set", "data.limit=64", "--set", "model.kwargs.width=8"]
    assert run_cli.main(["--space", str(ROOT / "spaces" / "custom_model.yaml"), "--storage", url, "--n-trials", "2",
                         "--study-dir", str(tmp_path / "study"), *short]) == 0
    out = capsys.readouterr().out
    assert out.count(" complete value=") >= 2
    import optuna

    done = optuna.load_study(study_name="custom_model", storage=url).get_trials()
    searched = done
    assert len(searched) == 2 and all(any(k.startswith("heads.exits:block") for k in t.params) for t in searched)
    assert any(name.endswith(".lif") for name in searched[0].user_attrs["firing_rates"])  # model.neurons, hooked
    from search import report as report_cli

    report = tmp_path / "report.html"  # the report's figures read the layer names this model has
    assert report_cli.main(["--study", "custom_model", "--storage", url, "--out", str(report)]) == 0
    assert "block1.lif" in report.read_text()
    assert export_cli.main(["--study", "custom_model", "--storage", url, "--out", str(tmp_path / "exp")]) == 0
    best = yaml.safe_load((tmp_path / "exp" / "best.yaml").read_text())
    assert best["model"]["arch"] == "examples.my_snn:build"
    assert retrain_cli.main([str(tmp_path / "exp" / "best.yaml"), "--out", str(tmp_path / "final"),
                             "--set", "optim.epochs=1"]) == 0
    blob = torch.load(tmp_path / "final" / "model.pt", weights_only=True)
    mine = MySNN(num_classes=10, in_channels=1, width=8)
    mine.load_state_dict(blob["state_dict"], strict=True)
    x = torch.rand(4, 3, 1, 8, 8)
    torch.testing.assert_close(mine.eval()(x), load_model(tmp_path / "final" / "model.pt")(x))
