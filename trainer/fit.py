"""The training loop shared by ``python -m trainer`` and every search trial."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from trainer.checkpoint import load_state, restore_rng, save_model, save_state
from trainer.config import Config
from trainer.data import Batches, encode, load_data
from trainer.diagnostics import FiringRates, GradFlow, GradStats
from trainer.energy import SynapticOps
from trainer.errors import UserError
from trainer.heads import ShortcutNet
from trainer.models import build_backbone, make_neuron
from trainer.schedule import balance, shortcut_parts


SPLIT_STEPS = 8  # first-epoch steps whose LIF-input gradients are also measured per part of the loss


class DeviceError(UserError, RuntimeError):
    """``run.device`` names a GPU this machine does not have."""


class DivergedError(RuntimeError):
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


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a missing GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"run.device is {name!r} but {torch.cuda.device_count()} CUDA devices are visible "
                        f"(allowed here: auto, cpu{''.join(f', cuda:{i}' for i in range(torch.cuda.device_count()))})")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # compiled kernels and autocast follow the current device
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
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    n = 0
    with ExitStack() as stack, _autocast(device, cfg.optim.amp):
        for monitor in monitors:
            stack.enter_context(monitor)
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(encode(x, cfg.data.timesteps, cfg.data.encoding)).float()
            loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            n += len(y)
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
    main, outs = net(inputs) if heads else (net.backbone(inputs), [])
    main_part, head_part = shortcut_parts(main, outs, y, lam)
    return main, main_part if head_part is None else main_part + head_part, main_part, head_part


@cache
def compiled_step() -> Callable:
    """``step_loss`` compiled, once per process: the net is an argument, so the trials of a worker reuse
    the code for every model of the same shape (lambda is a tensor: its values never recompile), and
    inductor's cache in ``~/.cache/snn-search/inductor`` (or ``TORCHINDUCTOR_CACHE_DIR``) starts later
    processes warm. Static shapes: a ragged last batch compiles once more, and inductor's dynamic-shape
    path, which failed on this step (``cannot determine truth value of Relational``), is never taken."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "snn-search" / "inductor"))
    return torch.compile(step_loss, dynamic=False)


def compiles(cfg: Config, device: torch.device) -> bool:
    """``model.compile``: ``auto`` compiles on CUDA, where small steps are launch-bound. On a CPU it
    would not pay back within a digits trial (2 cores: 50 -> 23 ms per step, ~100 s to compile cold,
    ~10 s warm), so there it is ``always``'s to ask for: a worker's later trials reuse the code."""
    return cfg.model.compile == "always" or (cfg.model.compile == "auto" and device.type == "cuda")


def _optimizer(cfg: Config, net: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def fit(cfg: Config, callback: Callback | None = None, progress: bool = False, test: bool = True) -> FitResult:
    """Train ``cfg``; after each epoch call ``callback(report)``, which may return True to stop.

    ``test=False`` never reads the test split (search trials rank on validation only).
    Exceptions raised by the callback (e.g. ``optuna.TrialPruned``) propagate. A non-finite training
    loss raises ``DivergedError``. With ``run.out_dir`` set, each epoch writes ``model.pt`` (stripped)
    and ``last.pt`` (resume state); ``run.resume`` continues from ``last.pt``.
    """
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    data = load_data(cfg.data, device, cfg.run.seed)
    whole = compiles(cfg, device)  # the whole step; the LIF's own compiled loops would nest in it
    neuron = make_neuron(cfg.neuron.model_copy(update={"compile": "never"}) if whole else cfg.neuron,
                         device.type == "cuda")
    backbone = build_backbone(cfg.model, neuron, data.num_classes, data.in_channels)
    net = ShortcutNet(backbone, cfg.heads.exits, data.num_classes, neuron, cfg.heads.hidden).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, net)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.optim.epochs)
    grads = GradStats(backbone) if cfg.run.grad_stats else None
    flow = GradFlow(backbone) if cfg.run.grad_stats else None
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None

    history: list[EpochReport] = []
    start_epoch = 0
    if cfg.run.resume and out_dir and (state := load_state(out_dir, device)):
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state, device)
        history = [EpochReport(**r) for r in state["history"]]
        start_epoch = state["epoch"] + 1

    epochs = cfg.optim.epochs
    bar = tqdm(range(start_epoch, epochs), desc="epochs", disable=not progress, initial=start_epoch, total=epochs)
    stopped = False
    for epoch in bar:
        lam = balance(cfg.lambda_, epoch, epochs) if cfg.heads.exits else 0.0
        lam_t = torch.tensor(lam, device=device)  # a tensor: a compiled step takes any value without recompiling
        heads_on = heads_matter(cfg, epoch)
        lr = optimizer.param_groups[0]["lr"]
        net.train()
        data.start_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        n = 0
        for step, (x, y) in enumerate(tqdm(data.train, desc=f"epoch {epoch}", leave=False, disable=not progress)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # gradient flow needs hooks, which a compiled step runs without: then it samples eager steps
            measured = flow is not None and (not whole or step < SPLIT_STEPS)
            split = measured and epoch == 0 and step < SPLIT_STEPS and lam > 0 and heads_on
            run = compiled_step() if whole and not measured else step_loss
            with flow if measured else nullcontext(), _autocast(device, cfg.optim.amp):
                if measured:
                    flow.capture = split
                main, loss, main_part, head_part = run(net, encode(x, cfg.data.timesteps, cfg.data.encoding), y,
                                                       lam_t, heads_on)
            optimizer.zero_grad(set_to_none=True)
            if split:
                flow.measure_parts({"main": main_part, "heads": head_part})
            loss.backward()
            if grads:
                grads.update()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (main.detach().argmax(1) == y).sum()
            n += len(y)
        scheduler.step()
        train_loss = loss_sum.item() / n
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss is {train_loss} at epoch {epoch}")
        train_time = time.perf_counter() - t0

        metrics = {"train_loss": train_loss, "train_acc": correct.item() / n}
        rates, ops = FiringRates(backbone), SynapticOps(backbone)
        if data.val is not None:  # none when retraining on train + val
            val = evaluate(backbone, data.val, cfg, device, (rates, ops))
            metrics |= {"val_loss": val["loss"], "val_acc": val["acc"], **ops.summary()}
        metrics |= {"lambda": lam, "lr": lr, "epoch_time": train_time}
        report = EpochReport(epoch, metrics, grads.summary() if grads else {}, rates.summary(),
                             flow.summary() if flow else {}, flow.split() if flow else {})
        history.append(report)
        bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{metrics.get('val_acc', math.nan):.3f}", lam=f"{lam:.2f}")
        if out_dir:
            save_model(out_dir, cfg, backbone, data.num_classes, data.in_channels, metrics)
            save_state(out_dir, net, optimizer, scheduler, epoch, [asdict(r) for r in history], device)
        if callback and callback(report):
            stopped = epoch < epochs - 1
            break

    scores = {}
    if test:
        ops = SynapticOps(backbone)
        result = evaluate(backbone, data.test, cfg, device, (ops,))
        scores = {"test_loss": result["loss"], "test_acc": result["acc"]}
        scores |= {f"test_{k}": v for k, v in ops.summary().items()}
    model_path = None
    if out_dir:
        last = history[-1].metrics if history else {}
        model_path = save_model(out_dir, cfg, backbone, data.num_classes, data.in_channels, {**last, **scores})
    return FitResult(history, scores, stopped, backbone, model_path)
