"""Wall-clock timing shared by the benchmarks: warm up, then time ``repeats`` calls (CUDA synced)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def time_ms(step: Callable[[], T], repeats: int, cuda: bool, warmup: int = 3) -> tuple[float, T]:
    """Mean milliseconds per call of ``step`` and its last result."""
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        result = step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1000, result
