"""Typed progress events. The pipeline calls ``on_event(event)``; the CLI and the app render them.

Every event is a small frozen dataclass. Handlers should be quick: they run on the training thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np

from fedmitr.runtime import DeviceInfo


@dataclass(frozen=True)
class StageStarted:
    stage: str  # e.g. "data", "clients", "fedavg", "fedmitr"
    total: int | None = None  # number of progress steps this stage will report, if known
    info: str = ""  # a human-readable detail, e.g. what the method is
    device: DeviceInfo | None = None  # where the stage runs (set for the training stages)


@dataclass(frozen=True)
class StageFinished:
    stage: str
    seconds: float  # wall-clock time of the stage


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int  # 1-based step within the stage
    total: int  # steps in the stage
    message: str = ""  # e.g. "client 2/5, epoch 3/20"
    values: dict[str, float] = field(default_factory=dict)  # named losses or metrics at this step


@dataclass(frozen=True)
class Metric:
    name: str  # e.g. "accuracy"
    value: float
    source: str  # what was measured, for display: "client 3", "ensemble", "fedmitr", ...
    step: int | None = None  # round index for curves, None for a final number
    client: int | None = None  # 0-based client index when a client's own model was measured


@dataclass(frozen=True)
class PartitionReady:
    class_counts: np.ndarray  # [K, C] int, samples of each class held by each client
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class SyntheticRound:
    """One round of synthesis for an inversion method, with everything the app draws.

    Shapes (B images, C channels, H x W pixels, N patches on a G x G grid, num_classes L):
    images [B, C, H, W] float in [0, 1]; labels [B]; stop_step [B, N] int (the iteration at which a
    patch was stopped, or -1 if it stayed active); density [B, N] float (share of the ensemble's
    CLS attention); high_mask [B, N] bool; token_labels [B, N] int (argmax of each patch's target);
    token_relabelled [B, N] bool (True where the target came from the ensemble, not the label).
    """

    method: str
    round: int  # 1-based
    images: np.ndarray
    labels: np.ndarray
    stop_step: np.ndarray
    density: np.ndarray
    high_mask: np.ndarray
    token_labels: np.ndarray
    token_relabelled: np.ndarray
    grid: int  # patches per side
    iterations: int  # inversion iterations of this batch


@dataclass(frozen=True)
class BenchCell:
    """The benchmark starts one cell of its grid: clients trained once, then every method on them."""

    cell: str  # what varies in the grid: "alpha=0.1", "alpha=iid", or "K=20" for --scale
    seed: int
    index: int  # 1-based position in the grid
    total: int  # cells in the grid


Event = Union[StageStarted, StageFinished, Progress, Metric, PartitionReady, SyntheticRound, BenchCell]
EventHandler = Callable[[Event], Any]


def ignore(event: Event) -> None:  # noqa: ARG001 - the default handler
    """Default handler: drop every event."""
