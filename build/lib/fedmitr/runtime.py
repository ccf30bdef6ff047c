"""Device handling through accelerate, and explicit seeding."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState


def make_accelerator(cpu: bool = False) -> Accelerator:
    """A fresh :class:`Accelerator` (CPU, GPU or MPS, picked by accelerate).

    accelerate keeps process-wide state and raises if a second Accelerator is created with other
    settings; resetting it first lets one process (a test session, the web app) run many pipelines.
    Under ``accelerate launch`` the distributed state is kept, because the launcher owns it.
    """
    state = AcceleratorState._shared_state  # noqa: SLF001 - the documented way accelerate's tests reset
    if state and state.get("distributed_type") is not None and int(state.get("num_processes", 1) or 1) > 1:
        return Accelerator(cpu=cpu)
    AcceleratorState._reset_state(True)  # noqa: SLF001
    GradientState._reset_state()  # noqa: SLF001
    mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not cpu else "no"
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", mixed)  # accelerate's own override
    return Accelerator(cpu=cpu, mixed_precision=mixed)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class DeviceInfo:
    """Where a run executes. ``str()`` is the one-line description saved in ``metrics.json``."""

    type: str  # torch device type: "cpu", "cuda", "mps"
    name: str  # e.g. "NVIDIA H100 80GB HBM3"; the device type for CPUs
    processes: int  # processes of the run (accelerate / torchrun)
    threads: int  # torch intra-op threads of this process

    def __str__(self) -> str:
        if self.type == "cuda":
            return f"{self.name} (cuda, {self.processes} process(es))"
        return f"{self.type} ({self.threads} threads, {self.processes} process(es))"


def describe_device(accelerator: Accelerator) -> DeviceInfo:
    dev = accelerator.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return DeviceInfo(dev.type, name, accelerator.num_processes, torch.get_num_threads())
