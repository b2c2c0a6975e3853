"""One way to derive seeds: every stream of random numbers the project draws from a user's seed."""

from __future__ import annotations

import numpy as np


def derive(seed: int, *keys: int) -> int:
    """An independent 32-bit seed for ``keys`` (an epoch, a worker, a population, ...) drawn from ``seed``
    with numpy's ``SeedSequence``: streams for different keys never overlap, and the value is the same in
    every process (Python's ``hash`` of a tuple is too, for ints, but promises nothing of independence)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])
