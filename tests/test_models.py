import pytest
import torch
import torch.nn.functional as F

from trainer.config import NeuronConfig
from trainer.data import Shape
from trainer.heads import ShortcutNet
from trainer.models import ARCHS
from trainer.taps import UnknownExitError, run_probe

NEURON = NeuronConfig().factory(cuda=False)
BLOCK = r"layer\d+\.\d+"


@pytest.mark.parametrize(
    "arch,blocks",
    [("resnet19", 8), ("resnet20", 9), ("resnet18", 8), ("resnet34", 16), ("resnet50", 16),
     ("resnet101", 33), ("resnet152", 50)],
)
def test_every_block_is_an_exit_whose_spikes_a_head_reads(arch, blocks):
    import re

    model = ARCHS[arch](num_classes=7, in_channels=3, neuron=NEURON, width=4)
    probe = run_probe(model, Shape(3, (32, 32), 7), arch)
    names = [n for n in probe.taps if re.fullmatch(BLOCK, n)]
    assert len(names) == blocks and names[0] == "layer1.0"  # in forward order
    assert set(ARCHS[arch].default_exits) <= set(names) and len(ARCHS[arch].default_exits) == len(
        {n.split(".")[0] for n in names}) - 1  # each stage's end but the last
    picked = names[:: max(1, blocks // 3)]
    net = ShortcutNet.attach(model, picked, Shape(3, (32, 32), 7), NEURON, arch=arch)
    seen = {}
    for name in picked:
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    main, heads = net(torch.rand(2, 3, 3, 32, 32))
    assert main.shape == (3, 7) and [h.shape for h in heads] == [(3, 7)] * len(picked)
    for name in picked:
        assert seen[name].shape[:3] == (2, 3, probe.taps[name].channels())
        assert set(seen[name].unique().tolist()) <= {0.0, 1.0}  # block exits are spikes


def test_bottleneck_channels_expand_by_four():
    probe = run_probe(ARCHS["resnet50"](10, 3, NEURON, width=8), Shape(3, (32, 32), 10), "resnet50")
    assert probe.taps["layer1.0"].channels() == 32 and probe.taps["layer4.2"].channels() == 8 * 8 * 4
    assert ARCHS["resnet152"].layers == (3, 8, 36, 3)


@pytest.mark.parametrize("arch,stages", [("vgg11", (1, 1, 2, 2, 2)), ("vgg16", (2, 2, 3, 3, 3))])
def test_vgg_stages_pool_and_their_ends_are_the_default_exits(arch, stages):
    model = ARCHS[arch](10, 3, NEURON, width=4)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == sum(stages) == int(arch[3:]) - 3  # the original's three linear layers are one here
    probe = run_probe(model, Shape(3, (32, 32), 10), arch)
    sizes = [probe.taps[f"stage{i + 1}"].shape for i in range(5)]
    assert [s[-1] for s in sizes] == [16, 8, 4, 2, 1]  # each stage halves the map
    assert [s[2] for s in sizes] == [4, 8, 16, 32, 32]  # 64-128-256-512-512, scaled by width 4/64
    assert ARCHS[arch].default_exits == ["stage1", "stage2", "stage3", "stage4"]
    digits = run_probe(model := ARCHS[arch](10, 1, NEURON, width=4), Shape(1, (8, 8), 10), arch)
    assert digits.taps["stage5"].shape[-2:] == (1, 1)  # 8x8 digits fit: a 1x1 map pools to 1x1


def _net(exits, hidden=0):
    torch.manual_seed(0)
    backbone = ARCHS["resnet20"](10, 1, NEURON, width=8)
    return ShortcutNet.attach(backbone, exits, Shape(1, (8, 8), 10), NEURON, hidden, "resnet20")


@pytest.mark.parametrize("hidden", [0, 16])
def test_heads_return_logits_and_strip_keeps_main_output(hidden):
    net = _net(["layer1.0", "layer2.2", "layer3.1"], hidden).eval()
    x = torch.rand(4, 5, 1, 8, 8)
    main, heads = net(x)
    assert len(heads) == 3 and all(h.shape == (5, 10) for h in heads)
    stripped = net.strip()
    assert not any("heads" in k for k in stripped.state_dict())
    assert not any(m._forward_hooks for m in stripped.modules())  # the hooks went with the heads
    # a net built afresh without heads, given the stripped weights, answers as the net with heads did
    fresh = ARCHS["resnet20"](10, 1, NEURON, width=8).eval()
    fresh.load_state_dict(stripped.state_dict())  # strict: exactly the backbone's keys
    torch.testing.assert_close(fresh(x), main)
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in net.parameters())


def test_heads_read_the_hooked_outputs_as_a_manual_pass_does():
    """The hook taps give the heads exactly the block outputs of a hand-written forward."""
    net = _net(["layer1.2", "layer2.0"]).eval()
    x = torch.rand(3, 4, 1, 8, 8)
    _, heads = net(x)
    bb = net.backbone
    out = bb.stem_lif(bb.stem(x.flatten(0, 1)).unflatten(0, (3, 4)))
    manual = {}
    for stage in ("layer1", "layer2"):
        for j, block in enumerate(getattr(bb, stage)):
            out = block(out)
            manual[f"{stage}.{j}"] = out
    torch.testing.assert_close(heads[0], net.heads["layer1_2"](manual["layer1.2"]))
    torch.testing.assert_close(heads[1], net.heads["layer2_0"](manual["layer2.0"]))


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


def test_unknown_exit_names_the_closest_modules_and_the_listing_command():
    with pytest.raises(UnknownExitError, match=r"resnet20 has no module 'layer4.0' \(closest: layer3.0, layer2.0, "
                       r"layer1.0.*python -m trainer --list-exits --set model.arch=resnet20"):
        _net(["layer4.0"])
    with pytest.raises(UnknownExitError, match=r"'heads.hidden': a hidden layer needs feature maps, and 'fc' gives "
                       r"vector \(3, 2, 10\)"):
        _net(["fc"], hidden=16)


def test_heads_read_folded_maps_and_vectors_too():
    """A conv inside a block gives [T*B, C, H, W]: its head unfolds time first; a linear layer's [T, B, D]."""
    net = _net(["layer1.0.conv1", "fc"]).eval()
    x = torch.rand(3, 4, 1, 8, 8)
    seen = {}
    net.backbone.layer1[0].conv1.register_forward_hook(lambda m, a, out: seen.__setitem__("conv", out))
    _, (conv_head, fc_head) = net(x)
    assert seen["conv"].shape == (12, 8, 8, 8)
    torch.testing.assert_close(conv_head, net.heads["layer1_0_conv1"](seen["conv"].unflatten(0, (3, 4))))
    assert fc_head.shape == (4, 10)


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
