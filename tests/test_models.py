import pytest
import torch
import torch.nn.functional as F

from trainer.config import NeuronConfig
from trainer.heads import ShortcutNet, UnknownExitError
from trainer.models import ARCHS, block_exits

NEURON = NeuronConfig().factory(cuda=False)


@pytest.mark.parametrize(
    "arch,blocks",
    [("resnet19", 8), ("resnet20", 9), ("resnet18", 8), ("resnet34", 16), ("resnet50", 16),
     ("resnet101", 33), ("resnet152", 50)],
)
def test_archs_expose_every_block_exit(arch, blocks):
    model = ARCHS[arch](num_classes=7, in_channels=3, neuron=NEURON, width=4)
    assert len(model.exits) == blocks
    assert list(model.exits)[0] == "layer1.0"
    x = torch.rand(2, 3, 3, 32, 32)
    names = list(model.exits)[:: max(1, blocks // 3)]
    logits, feats = model.forward_taps(x, names)
    assert logits.shape == (3, 7)
    for name in names:
        assert feats[name].shape[:3] == (2, 3, model.exits[name])
        assert set(feats[name].unique().tolist()) <= {0.0, 1.0}  # block exits are spikes


def test_bottleneck_channels_expand_by_four():
    model = ARCHS["resnet50"](10, 3, NEURON, width=8)
    assert model.exits["layer1.0"] == 32 and model.exits["layer4.2"] == 8 * 8 * 4
    assert ARCHS["resnet152"].layers == (3, 8, 36, 3)


def _net(exits, hidden=0):
    torch.manual_seed(0)
    backbone = ARCHS["resnet20"](10, 1, NEURON, width=8)
    return ShortcutNet(backbone, exits, 10, NEURON, hidden)


@pytest.mark.parametrize("hidden", [0, 16])
def test_heads_return_logits_and_strip_keeps_main_output(hidden):
    net = _net(["layer1.0", "layer2.2", "layer3.1"], hidden).eval()
    x = torch.rand(4, 5, 1, 8, 8)
    main, heads = net(x)
    assert len(heads) == 3 and all(h.shape == (5, 10) for h in heads)
    stripped = net.strip()
    assert not any("heads" in k for k in stripped.state_dict())
    # a net built afresh without heads, given the stripped weights, answers as the net with heads did
    fresh = ARCHS["resnet20"](10, 1, NEURON, width=8).eval()
    fresh.load_state_dict(stripped.state_dict())  # strict: exactly the backbone's keys
    torch.testing.assert_close(fresh(x), main)
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_block_exits_names_match_the_built_net(arch):
    assert block_exits(arch) == list(ARCHS[arch](10, 3, NEURON, width=2).exits)


def test_head_is_the_time_average_of_a_pooled_linear_classifier():
    """The head pools before its classifier; that must equal averaging per-timestep logits."""
    net = _net(["layer2.0"]).double()
    x = torch.rand(4, 5, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    head = net.heads["layer2_0"]
    per_step = head.fc(x.mean(dim=(3, 4))).mean(0)
    torch.testing.assert_close(head(x), per_step)
    (g,) = torch.autograd.grad(head(x).sum(), x)
    (g_ref,) = torch.autograd.grad(per_step.sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_unknown_exit_names_allowed_ones():
    with pytest.raises(UnknownExitError, match=r"heads.exits: unknown block exit 'layer4.0' .*layer3.2"):
        _net(["layer4.0"])


def test_head_loss_trains_only_the_layers_below_its_exit():
    """A head at layer1.0 sends gradient to the stem and layer1.0, and none to later blocks."""
    net = _net(["layer1.0"])
    x = torch.rand(4, 16, 1, 8, 8)
    _, heads = net(x)
    F.cross_entropy(heads[0], torch.randint(0, 10, (16,))).backward()
    bb = net.backbone
    assert bb.stem[0].weight.grad.abs().sum() > 0
    assert bb.layer1[0].conv1[0].weight.grad.abs().sum() > 0
    assert bb.layer1[1].conv1[0].weight.grad is None and bb.layer3[2].conv2[0].weight.grad is None
