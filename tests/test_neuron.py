import itertools

import pytest
import torch

from trainer import neuron
from trainer.neuron import LIF, LIFFunction, lif_loop
from trainer.errors import UserError
from trainer.surrogate import SURROGATES


@pytest.mark.parametrize(
    "reset,detach,surrogate", list(itertools.product(["hard", "soft"], [False, True], SURROGATES))
)
def test_fused_equals_reference_loop(reset, detach, surrogate):
    torch.manual_seed(0)
    x = torch.randn(7, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(7, 3, 4, 5, dtype=torch.float64)
    args = (0.3, 0.5, reset, detach, SURROGATES[surrogate](1.7))
    ref = lif_loop(x, *args)
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
    fused = LIFFunction.apply(x, *args, False)
    (fused_grad,) = torch.autograd.grad(fused, x, grad_out)
    assert ref.sum() > 0 and (ref == 0).any()  # the inputs actually cross the threshold
    assert torch.equal(ref, fused)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "reset,detach,surrogate", list(itertools.product(["hard", "soft"], [False, True], SURROGATES))
)
def test_eager_loops_round_exactly_as_the_loops_torch_compile_traces(reset, detach, surrogate):
    """A compiled step traces ``_forward_loop``/``_backward_loop``, an eager one runs ``_forward_eager``/
    ``_backward_eager``: bit for bit the same in float32 (one rounding apart would flip spikes and move
    every gradient upstream of them)."""
    torch.manual_seed(4)
    x, grad = torch.randn(6, 4, 8, 5, 5), torch.randn(6, 4, 8, 5, 5)
    args = (0.3, 0.5, reset == "hard")
    assert torch.equal(neuron._forward_eager(x, *args), neuron._forward_loop(x, *args))
    more = (detach, SURROGATES[surrogate](1.7))
    assert torch.equal(neuron._backward_eager(grad, x, *args, *more), neuron._backward_loop(grad, x, *args, *more))


def test_compiled_path_equals_eager():
    torch.manual_seed(1)
    x = torch.randn(4, 2, 3, 6, 6, requires_grad=True)
    eager, compiled = LIF(backend="fused", compile=False), LIF(backend="fused", compile=True)
    a = eager(x)
    (ga,) = torch.autograd.grad(a.sum(), x)
    b = compiled(x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    assert torch.equal(a, b)
    torch.testing.assert_close(ga, gb)


def test_dynamics_by_hand():
    """Constant input 0.45, decay 0.5, threshold 0.5.

    hard: charges .45, .675 (spike, v=0), .45, .675 ...            -> 0 1 0 1 0 1
    soft: .45, .675 (spike, v=.175), .5375 (spike, v=.0375), .46875, .684 (spike), .542 (spike)
    """
    x = torch.full((6, 1), 0.45, dtype=torch.float64)
    hard = LIF(decay=0.5, threshold=0.5, reset="hard")(x).flatten().tolist()
    soft = LIF(decay=0.5, threshold=0.5, reset="soft")(x).flatten().tolist()
    assert hard == [0, 1, 0, 1, 0, 1]
    assert soft == [0, 1, 1, 0, 1, 1]


@pytest.mark.parametrize("surrogate", list(SURROGATES))
@pytest.mark.parametrize("alpha", [0.5, 2.0, 4.0])
def test_surrogate_integrates_to_one_and_peaks_at_threshold(surrogate, alpha):
    """Each surrogate is the derivative of a smooth step from 0 to 1."""
    xs = torch.linspace(-200, 200, 2_000_001, dtype=torch.float64)
    g = SURROGATES[surrogate](alpha).grad(xs)
    area = torch.trapezoid(g, xs).item()
    assert area == pytest.approx(1.0, abs=6e-3)  # atan's 1/x^2 tails leave ~4e-3 outside +-200
    assert g.argmax().item() in range(len(xs) // 2 - 20, len(xs) // 2 + 20) or surrogate == "rectangle"
    assert (g >= 0).all()


def test_detach_reset_changes_gradient():
    torch.manual_seed(2)
    x = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    grads = []
    for detach in (False, True):
        (g,) = torch.autograd.grad(LIF(detach_reset=detach)(x).sum(), x)
        grads.append(g)
    assert not torch.allclose(grads[0], grads[1])


def test_loop_backend_matches_fused_module():
    torch.manual_seed(3)
    x = torch.randn(4, 8, 16, dtype=torch.float64, requires_grad=True)
    a, b = LIF(backend="loop", surrogate="atan")(x), LIF(backend="fused", surrogate="atan")(x)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    assert torch.equal(a, b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("backend", ["fused", "loop"])
def test_bf16_inputs_keep_a_float32_membrane(backend):
    """Under bf16 autocast the conv outputs feeding a LIF are bf16; its state stays float32, so spikes and
    gradients are those of the float32 neuron on the same values, given back in bf16."""
    torch.manual_seed(2)
    x = torch.randn(16, 4, 32).bfloat16().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    grad = torch.randn(16, 4, 32)
    lif = LIF(backend=backend, surrogate="atan")
    s, s32 = lif(x), lif(x32)
    (g,) = torch.autograd.grad(s, x, grad.bfloat16())
    (g32,) = torch.autograd.grad(s32, x32, grad.bfloat16().float())
    assert s.dtype == g.dtype == torch.bfloat16
    assert torch.equal(s.float(), s32) and torch.equal(g, g32.bfloat16())


def test_sampled_thresholds_and_alphas_do_not_recompile(monkeypatch):
    """A search samples a new threshold and alpha per trial; the compiled loops stay one graph each."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    compiled = {}
    monkeypatch.setattr(neuron, "_compiled", lambda fn: compiled.setdefault(
        fn, torch.compile(fn, dynamic=True, backend=counter)))
    torch._dynamo.reset()
    for i in range(10):
        x = torch.randn(4, 8, 16, requires_grad=True)
        lif = LIF(decay=0.2 + 0.01 * i, threshold=0.3 + 0.05 * i, alpha=1 + 0.1 * i, compile=True)
        lif(x).sum().backward()
    assert counter.frame_count == 2  # the forward loop and the backward loop, once each


def test_an_unknown_surrogate_names_the_allowed_ones():
    with pytest.raises(UserError, match=r"unknown surrogate 'relu' \(allowed: atan, sigmoid, rectangle, triangle\)"):
        LIF(surrogate="relu")
    assert repr(LIF(surrogate="triangle", alpha=2.0).surrogate) == "triangle(alpha=2.0)"


def test_a_lif_compiles_like_any_module():
    """``compile=True`` fuses its time loops; the attribute must not shadow ``nn.Module.compile``."""
    lif = LIF(compile=True)
    assert lif.compiled is True and callable(lif.compile)
