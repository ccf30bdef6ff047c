"""Hand-built pipeline events for the app's tests (no training needed)."""

from __future__ import annotations

import numpy as np

from fedmitr.events import SyntheticRound


def make_round(method: str = "fedmitr", round_: int = 1, batch: int = 4, grid: int = 4, channels: int = 1,
               size: int = 28, sparse: bool = True, seed: int = 0) -> SyntheticRound:
    """A SyntheticRound as an inversion method would emit it, with known stops and targets."""
    rng = np.random.default_rng(seed)
    n = grid * grid
    stop_step = np.full((batch, n), -1)
    if sparse:
        stop_step[:, :4] = 2  # first stop: patches 0-3
        stop_step[:, 4:7] = 5  # second stop: patches 4-6
    density = rng.random((batch, n))
    density /= density.sum(1, keepdims=True)
    high = np.zeros((batch, n), dtype=bool)
    high[np.arange(batch)[:, None], np.argsort(-density, axis=1)[:, :5]] = True
    labels = np.arange(batch) % 10
    token_labels = np.where(high, labels[:, None], (labels[:, None] + 1) % 10)
    return SyntheticRound(
        method=method, round=round_, images=rng.random((batch, channels, size, size)).astype(np.float32),
        labels=labels, stop_step=stop_step, density=density, high_mask=high, token_labels=token_labels,
        token_relabelled=~high, grid=grid, iterations=20,
    )

