"""Typed progress events. The pipeline calls ``on_event(event)``; the CLI and the app render them.

Every event is a small frozen dataclass of plain values and NumPy arrays: it pickles (ZeroGPU
streams events across processes) and it is written to a run's ``events.jsonl``
(:mod:`fedmitr.rundir`), from which a finished run can be replayed exactly as it was streamed.
Handlers should be quick: they run on the training thread.

This module imports no torch, so the command line and the app can use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np


@dataclass(frozen=True)
class DeviceInfo:
    """Where a run executes. ``str()`` is the one-line description saved in ``metrics.json``."""

    type: str  # torch device type: "cpu", "cuda", "mps"
    name: str  # e.g. "NVIDIA H100 80GB HBM3"; the device type for CPUs
    processes: int  # processes of the run (accelerate / torchrun)
    threads: int  # torch intra-op threads of this process
    precision: str = "no"  # accelerate's mixed precision of client training: "no" (fp32) or "bf16"

    def __str__(self) -> str:
        mixed = f", {self.precision} autocast" if self.precision not in ("no", "") else ""
        processes = f"{self.processes} process" + ("es" if self.processes != 1 else "")
        if self.type == "cuda":
            return f"{self.name} (cuda, {processes}{mixed})"
        return f"{self.type} ({self.threads} thread{'s' if self.threads != 1 else ''}, {processes}{mixed})"


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


@dataclass(frozen=True, kw_only=True)
class SyntheticRound:
    """One round of synthesis for an inversion method, with everything the app draws.

    Shapes (B images, C channels, H x W pixels, N patches on a G x G grid, num_classes L):
    images [B, C, H, W] uint8 pixels (float in [0, 1] is accepted too); labels [B]; stop_step [B, N] int (the iteration
    at which a patch was stopped, or -1 if it stayed active); density [B, N] float (share of the
    ensemble's CLS attention); high_mask [B, N] bool; token_labels [B, N] int (argmax of each
    patch's target); token_relabelled [B, N] bool (True where the target came from the ensemble,
    not the label).
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
    token_weight: np.ndarray | None = None  # [B, N] weight of each patch in the token loss (None: no token loss)
    token_source: np.ndarray | None = None  # [B, N] what each patch was taught (fedmitr.relabel.SOURCES)


@dataclass(frozen=True)
class PrivacyChecked:
    """The privacy check of one inversion method: the nearest real training image of each of its
    synthetic images (indices into the training split, in the order the images were made)."""

    method: str
    nearest_index: np.ndarray  # [N] int
    distance: dict[str, np.ndarray]  # "pixel" / "feature" -> [N] distance to that image
    summary: dict[str, dict[str, float]]  # what metrics.json records (see fedmitr.privacy.NearestReal)


@dataclass(frozen=True)
class RunFinished:
    """The last event of a run: its ``metrics.json`` content."""

    metrics: dict[str, Any]


@dataclass(frozen=True)
class BenchCell:
    """The benchmark starts one cell of its grid: clients trained once, then every method on them."""

    cell: str  # what varies in the grid: "alpha=0.1", "alpha=iid", or "K=20" for --scale
    seed: int
    index: int  # 1-based position in the grid
    total: int  # cells in the grid


Event = Union[StageStarted, StageFinished, Progress, Metric, PartitionReady, SyntheticRound, PrivacyChecked,
              RunFinished, BenchCell]
EventHandler = Callable[[Event], Any]
EVENT_TYPES: dict[str, type] = {t.__name__: t for t in Event.__args__}  # type: ignore[attr-defined]


def ignore(event: Event) -> None:  # noqa: ARG001 - the default handler
    """Default handler: drop every event."""


def fan_out(*handlers: EventHandler) -> EventHandler:
    """One handler that passes every event to each of ``handlers`` in turn."""

    def handle(event: Event) -> None:
        for h in handlers:
            h(event)

    return handle
