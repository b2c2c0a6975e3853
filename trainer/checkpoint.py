"""Checkpoints: ``model.pt`` holds the stripped inference model, ``last.pt`` the full training state.

``model.pt`` = {config, num_classes, in_channels, state_dict (backbone only), metrics}; ``load_model``
rebuilds the backbone from it. ``last.pt`` adds heads, optimizer, LR schedule and history for resume.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import Config, build
from trainer.errors import UserError
from trainer.files import atomic_write


MODEL_FILE = "model.pt"
STATE_FILE = "last.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save``, serialised in memory and written whole (``atomic_write``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def save_model(
    out_dir: Path, cfg: Config, backbone: nn.Module, num_classes: int, in_channels: int,
    metrics: dict[str, float],
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    _atomic_save(
        {
            "config": cfg.to_dict(),
            "num_classes": num_classes,
            "in_channels": in_channels,
            "state_dict": backbone.state_dict(),
            "metrics": metrics,
        },
        path,
    )
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The inference model (no heads) in eval mode."""
    blob = torch.load(path, map_location=device, weights_only=True)
    cfg = build(blob["config"], str(path))
    neuron = cfg.neuron.factory(cuda=torch.device(device).type == "cuda")
    model = cfg.model.build(blob["num_classes"], blob["in_channels"], neuron)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


def rng_state(device: torch.device) -> dict[str, Any]:
    """The generators training draws from: the CPU's (shuffles, initialisation) and, on a GPU, the
    training device's (Poisson encoding draws its spikes there)."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set the generators saved by ``rng_state``; ``torch.load(map_location=...)`` may have moved the
    states to the GPU, and the setters take CPU byte tensors."""
    torch.set_rng_state(state["rng"].cpu())
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)


def save_state(out_dir: Path, net: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, history: list[dict],
               device: torch.device) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save(
        {
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "history": history,
            **rng_state(device),
        },
        out_dir / STATE_FILE,
    )


class UnreadableStateError(UserError):
    """A ``last.pt`` that is truncated, garbage, or holds anything but tensors and plain types."""


STATE_KEYS = {"net", "optimizer", "scheduler", "epoch", "history", "rng", "cuda_rng"}


def load_state(out_dir: Path, device: torch.device) -> dict[str, Any] | None:
    """``last.pt``, or None without one. It is only ever read with ``weights_only=True`` (tensors and plain
    types: a pickle that would run code is refused, never executed), and what cannot be read or is not a
    resume state raises ``UnreadableStateError`` naming the file."""
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, garbage or forged: torch raises many kinds
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UnreadableStateError(f"{path}: not a resume state ({type(err).__name__}: {reason})") from None
    if not isinstance(state, dict) or not STATE_KEYS <= set(state) or not isinstance(state["history"], list):
        raise UnreadableStateError(f"{path}: not a resume state (keys {sorted(state) if isinstance(state, dict) else type(state).__name__})")
    return state


def load_history(out_dir: Path) -> list[dict]:
    """The per-epoch reports saved in ``last.pt`` (empty without one): what a resumed run starts from."""
    state = load_state(out_dir, torch.device("cpu"))
    return state["history"] if state else []
