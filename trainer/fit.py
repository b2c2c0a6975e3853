"""The training loop shared by ``python -m trainer`` and every search trial."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from trainer import stop
from trainer.checkpoint import load_state, restore_rng, save_model, save_state
from trainer.config import Config
from trainer.data import Batches, DataBundle, encode, input_shape, load_data
from trainer.diagnostics import FiringRates, GradFlow, GradStats
from trainer.energy import SynapticOps
from trainer.errors import SNNError, UserError
from trainer.heads import ShortcutNet
from trainer.models import logits
from trainer.optim import OPTIMIZERS
from trainer.probe import build_backbone, check_exits
from trainer.taps import reset_states, run_probe, stateful
from trainer.schedule import balance, shortcut_parts


SPLIT_STEPS = 8  # first-epoch steps whose LIF-input gradients are also measured per part of the loss


class DeviceError(UserError):
    """``run.device`` names a GPU this machine does not have."""


class DivergedError(SNNError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochReport:
    """What the callback sees after each epoch (0-based ``epoch``)."""

    epoch: int
    metrics: dict[str, float]
    grad_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    firing_rates: dict[str, float] = field(default_factory=dict)
    grad_flow: dict[str, dict[str, float]] = field(default_factory=dict)  # |dL/dx| at each LIF's input
    flow_split: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # first epoch: by loss part


@dataclass
class FitResult:
    history: list[EpochReport]
    test: dict[str, float]
    stopped_early: bool
    model: nn.Module  # the stripped inference model
    model_path: Path | None = None

    @property
    def best_val_acc(self) -> float:
        return max((r.metrics["val_acc"] for r in self.history if "val_acc" in r.metrics), default=float("nan"))


Callback = Callable[[EpochReport], bool | None]
Monitor = AbstractContextManager  # attaches hooks to a model while entered


def check_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device of this machine; a missing GPU is an error,
    not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device, count = torch.device(name), torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        raise DeviceError(f"run.device is {name!r} but {count} CUDA devices are visible "
                          f"(allowed here: auto, cpu{''.join(f', cuda:{i}' for i in range(count))})")
    return device


def resolve_device(name: str) -> torch.device:
    """``check_device``, made the current CUDA device: compiled kernels and autocast follow it."""
    device = check_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, cfg: Config, device: torch.device, monitors: Sequence[Monitor] = ()
) -> dict[str, float]:
    """Loss and accuracy of the main output; ``monitors`` (firing rates, synaptic ops) watch the passes."""
    model.eval()
    memory = stateful(model)
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    n = 0
    with ExitStack() as stack, _autocast(device, cfg.optim.amp):
        for monitor in monitors:
            stack.enter_context(monitor)
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            reset_states(memory)
            out = logits(model(encode(x, cfg.data.timesteps, cfg.data.encoding))).float()
            loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            n += len(y)
            stop.check()
    return {"loss": loss.item() / max(n, 1), "acc": correct.item() / max(n, 1)}


def heads_matter(cfg: Config, epoch: int) -> bool:
    """Whether the heads' loss has weight in this epoch or a later one. Once lambda stays 0 to the end,
    the loss is exactly the main output's, so the heads are not run at all."""
    epochs = cfg.optim.epochs
    return bool(cfg.heads.exits) and any(balance(cfg.lambda_, e, epochs) > 0 for e in range(epoch, epochs))


def step_loss(net: ShortcutNet, inputs: Tensor, y: Tensor, lam: Tensor, heads: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Main logits, the shortcut loss and its two parts of one training step (``heads=False``: the
    backbone alone). ``model.compile`` compiles this whole: forward, loss and, through AOTAutograd, the
    backward."""
    main, outs = net(inputs) if heads else (logits(net.backbone(inputs)), [])
    main_part, head_part = shortcut_parts(main, outs, y, lam)
    return main, main_part if head_part is None else main_part + head_part, main_part, head_part


# Inductor's layout optimisation on a CPU hands oneDNN's convolution backward a channels-last gradient with a
# contiguous input; where the weight's layout is ambiguous (1x1, as a ResNet's stride-2 shortcut) it read the
# input as channels-last and got that weight's gradient wrong (17x in norm; torch 2.14.1, AMD EPYC, AVX2).
# The CPU's convolutions are left in the layout the eager step uses. CUDA keeps inductor's default.
def inductor_options(device_type: str) -> dict[str, Any] | None:
    """Inductor's options for a device type: the CPU's without layout optimisation (see above)."""
    return {"layout_optimization": False} if device_type == "cpu" else None


@cache
def compiled_step(device_type: str) -> Callable:
    """``step_loss`` compiled, once per process and device type: the net is an argument, so the trials of a
    worker reuse the code for every model of the same shape (lambda is a tensor: its values never recompile),
    and inductor's own cache (``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``) starts
    later processes warm. Static shapes: a ragged last batch compiles once more, and inductor's dynamic-shape
    path, which failed on this step (``cannot determine truth value of Relational``), is never taken."""
    return torch.compile(step_loss, dynamic=False, options=inductor_options(device_type))


def compiles(cfg: Config, device: torch.device) -> bool:
    """``model.compile``: ``auto`` compiles on CUDA, where small steps are launch-bound. On a CPU it
    would not pay back within a digits trial (2 cores: 50 -> 23 ms per step, ~100 s to compile cold,
    ~10 s warm), so there it is ``always``'s to ask for: a worker's later trials reuse the code."""
    return cfg.model.compile == "always" or (cfg.model.compile == "auto" and device.type == "cuda")


class TrainedEpoch(NamedTuple):
    """What one epoch of training measured, besides the monitors' statistics."""

    loss: float  # mean over the epoch's samples
    acc: float
    lam: float
    lr: float
    seconds: float


@dataclass
class Training:
    """One ``fit``: what it set up before the first epoch, and the pieces of an epoch (``train_epoch``, then
    ``validate``, then ``checkpoint``)."""

    cfg: Config
    device: torch.device
    data: DataBundle
    backbone: nn.Module  # what ``model.pt`` holds: the model as built, without heads or hooks
    net: ShortcutNet  # the backbone with its heads
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    whole: bool  # the whole step is compiled
    grads: GradStats | None  # weight gradients per conv layer (``run.grad_stats``)
    flow: GradFlow | None  # gradients at each LIF's input (``run.grad_stats``)
    out_dir: Path | None
    neurons: tuple[type, ...]  # ``model.neurons``: the user's spiking classes, hooked like ours
    memory: list[nn.Module]  # modules with a ``reset()`` (SpikingJelly's neurons): reset before each batch

    @classmethod
    def set_up(cls, cfg: Config) -> Training:
        """Device, data, net, optimizer and monitors, with the seed set before anything draws from it."""
        device = resolve_device(cfg.run.device)
        torch.manual_seed(cfg.run.seed)
        data = load_data(cfg.data, device, cfg.run.seed)
        whole = compiles(cfg, device)  # the whole step; the LIF's own compiled loops would nest in it
        lif = cfg.neuron.model_copy(update={"compile": "never"}) if whole else cfg.neuron
        neuron = lif.factory(cuda=device.type == "cuda")
        shape = input_shape(cfg.data)._replace(channels=data.in_channels, classes=data.num_classes)
        backbone = build_backbone(cfg, shape, neuron)
        taps = check_exits(cfg, run_probe(backbone, shape, cfg.model.arch))
        net = ShortcutNet(backbone, taps, data.num_classes, neuron, cfg.heads.hidden, cfg.heads.tokens).to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        optimizer = OPTIMIZERS[cfg.optim.name](net.parameters(), cfg.optim)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.optim.epochs)
        neurons = cfg.model.neuron_classes()
        grads, flow = (GradStats(backbone), GradFlow(backbone, neurons)) if cfg.run.grad_stats else (None, None)
        out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
        return cls(cfg, device, data, backbone, net, optimizer, scheduler, whole, grads, flow, out_dir, neurons,
                   stateful(backbone))

    def resume(self) -> tuple[list[EpochReport], int]:
        """With ``run.resume`` and a ``last.pt``: the net, optimizer, LR schedule and generators as they were
        after its last epoch, and (the reports so far, the next epoch); else ([], 0) and nothing changes."""
        if not (self.cfg.run.resume and self.out_dir and (state := load_state(self.out_dir, self.device))):
            return [], 0
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.reapply()
        restore_rng(state, self.device)
        return [EpochReport(**r) for r in state["history"]], state["epoch"] + 1

    def reapply(self) -> None:
        """The config's lr, weight decay and momentum over a restored optimizer, whose state carries the
        values it was saved with: population-based training resumes a copied member under perturbed values
        (Ray issue #62173). The cosine schedule to 0 scales with its base lr; unchanged values stay bit for bit."""
        optim = self.cfg.optim
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            if optim.lr != base:
                group["lr"] *= optim.lr / base
            group["initial_lr"] = optim.lr
            group["weight_decay"] = optim.weight_decay
            if "momentum" in group:
                group["momentum"] = optim.momentum
        self.scheduler.base_lrs = [optim.lr] * len(self.optimizer.param_groups)

    def sampled(self, epoch: int, step: int, lam: float, heads: bool) -> tuple[bool, bool]:
        """Whether a step measures gradient flow, and whether it also splits it by loss part. Flow needs
        hooks, which a compiled step runs without: with the whole step compiled, only the first
        ``SPLIT_STEPS`` steps of each epoch measure it, run eagerly. The split is for the first
        ``SPLIT_STEPS`` steps of the first epoch, when both parts have weight."""
        measured = self.flow is not None and (not self.whole or step < SPLIT_STEPS)
        return measured, measured and epoch == 0 and step < SPLIT_STEPS and lam > 0 and heads

    def step(self, x: Tensor, y: Tensor, lam: Tensor, heads: bool, measured: bool, split: bool
             ) -> tuple[Tensor, Tensor]:
        """One optimizer step on a batch: (main logits, loss)."""
        flow = self.flow
        run = compiled_step(self.device.type) if self.whole and not measured else step_loss
        reset_states(self.memory)
        with flow if measured else nullcontext(), _autocast(self.device, self.cfg.optim.amp):
            if measured:
                flow.capture = split
            inputs = encode(x, self.cfg.data.timesteps, self.cfg.data.encoding)
            main, loss, main_part, head_part = run(self.net, inputs, y, lam, heads)
        self.optimizer.zero_grad(set_to_none=True)
        if split:
            flow.measure_parts({"main": main_part, "heads": head_part})
        loss.backward()
        if self.grads:
            self.grads.update()
        self.optimizer.step()
        return main, loss

    def train_epoch(self, epoch: int, progress: bool = False) -> TrainedEpoch:
        """One pass over the training batches, then the LR schedule's step; a non-finite mean loss raises
        ``DivergedError``. The losses add up on the device: one host sync per epoch."""
        cfg, device = self.cfg, self.device
        lam = balance(cfg.lambda_, epoch, cfg.optim.epochs) if cfg.heads.exits else 0.0
        lam_t = torch.tensor(lam, device=device)  # a tensor: a compiled step takes any value without recompiling
        heads = heads_matter(cfg, epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        self.net.train()
        self.data.start_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        n = 0
        batches = tqdm(self.data.train, desc=f"epoch {epoch}", leave=False, disable=not progress)
        for step, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            main, loss = self.step(x, y, lam_t, heads, *self.sampled(epoch, step, lam, heads))
            loss_sum += loss.detach() * len(y)
            correct += (main.detach().argmax(1) == y).sum()
            n += len(y)
            stop.point("batch")
            stop.check()  # a safe point: the epoch is lost, the last checkpoint stays
        self.scheduler.step()
        train_loss = loss_sum.item() / n
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss is {train_loss} at epoch {epoch}")
        return TrainedEpoch(train_loss, correct.item() / n, lam, lr, time.perf_counter() - t0)

    def validate(self, epoch: int, trained: TrainedEpoch) -> EpochReport:
        """The epoch's report: training's figures, the validation pass's (loss, accuracy, synaptic ops and
        energy, firing rates) and the gradient statistics gathered while training (the monitors reset)."""
        metrics = {"train_loss": trained.loss, "train_acc": trained.acc}
        rates, ops = FiringRates(self.backbone, self.neurons), SynapticOps(self.backbone)
        if self.data.val is not None:  # none when retraining on train + val
            val = evaluate(self.backbone, self.data.val, self.cfg, self.device, (rates, ops))
            metrics |= {"val_loss": val["loss"], "val_acc": val["acc"], **ops.summary()}
        metrics |= {"lambda": trained.lam, "lr": trained.lr, "epoch_time": trained.seconds}
        grads, flow = self.grads, self.flow
        return EpochReport(epoch, metrics, grads.summary() if grads else {}, rates.summary(),
                           flow.summary() if flow else {}, flow.split() if flow else {})

    def checkpoint(self, history: list[EpochReport]) -> None:
        """``model.pt`` (stripped, with the last epoch's metrics) and ``last.pt`` (what ``resume`` reads)."""
        self.save_model(history[-1].metrics)
        save_state(self.out_dir, self.net, self.optimizer, self.scheduler, history[-1].epoch,
                   [asdict(r) for r in history], self.device)

    def save_model(self, metrics: dict[str, float]) -> Path:
        """``model.pt`` in ``run.out_dir``: the stripped backbone, its config and ``metrics``."""
        return save_model(self.out_dir, self.cfg, self.backbone, self.data.num_classes, self.data.in_channels,
                          metrics)

    def score_test(self) -> dict[str, float]:
        """The test pass of the stripped model: loss, accuracy, synaptic ops and energy."""
        ops = SynapticOps(self.backbone)
        result = evaluate(self.backbone, self.data.test, self.cfg, self.device, (ops,))
        return {"test_loss": result["loss"], "test_acc": result["acc"],
                **{f"test_{k}": v for k, v in ops.summary().items()}}


def fit(cfg: Config, callback: Callback | None = None, progress: bool = False, test: bool = True) -> FitResult:
    """Train ``cfg``; after each epoch call ``callback(report)``, which may return True to stop.

    ``test=False`` never reads the test split (search trials rank on validation only).
    A stop signal (``trainer.stop``) raises ``Stopped`` after the batch it came in (the test pass's too), or
    after the epoch's checkpoint and callback; after the last epoch's callback training ends normally.
    Exceptions raised by the callback (e.g. ``optuna.TrialPruned``) propagate. A non-finite training
    loss raises ``DivergedError``. With ``run.out_dir`` set, each epoch writes ``model.pt`` (stripped)
    and ``last.pt`` (resume state); ``run.resume`` continues from ``last.pt``.
    """
    training = Training.set_up(cfg)
    history, start = training.resume()
    epochs = cfg.optim.epochs
    bar = tqdm(range(start, epochs), desc="epochs", disable=not progress, initial=start, total=epochs)
    stopped = False
    for epoch in bar:
        stop.check()
        with stop.interruptible():  # no storage call in here: a second Ctrl-C may stop at once
            report = training.validate(epoch, training.train_epoch(epoch, progress))
        history.append(report)
        m = report.metrics
        bar.set_postfix(loss=f"{m['train_loss']:.3f}", val_acc=f"{m.get('val_acc', math.nan):.3f}",
                        lam=f"{m['lambda']:.2f}")
        if training.out_dir:
            training.checkpoint(history)
        stop.point("checkpointed")
        if callback and callback(report):
            stopped = epoch < epochs - 1
            break

    scores = training.score_test() if test else {}
    model_path = None
    if training.out_dir:
        model_path = training.save_model({**(history[-1].metrics if history else {}), **scores})
    return FitResult(history, scores, stopped, training.net.strip(), model_path)
