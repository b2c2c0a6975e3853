"""Every private PyTorch name this project touches, and nothing else (Optuna's and Ray's are in
``search/compat.py``): an upgrade that renames one breaks here, in one file; ``tests/test_layout.py`` holds
the list each compat module may use and fails on any other private name anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the dispatch-level hook of every op; not re-exported

__all__ = ["TorchDispatchMode", "dynamo_counters", "foreach_norm"]


def foreach_norm(tensors: Sequence[torch.Tensor], order: float) -> list[torch.Tensor]:
    """The ``order``-norm of each tensor in a few multi-tensor kernels (what ``clip_grad_norm_`` uses)."""
    return list(torch._foreach_norm(list(tensors), order))


def dynamo_counters() -> Any:
    """torch.compile's event counters (``counters["inductor"]["cudagraph_skips"]``, ...)."""
    from torch._dynamo.utils import counters  # importing dynamo takes a second: only where it is asked

    return counters
