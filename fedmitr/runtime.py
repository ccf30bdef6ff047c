"""Device handling through accelerate, and explicit seeding."""

from __future__ import annotations

import random

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
    return Accelerator(cpu=cpu, mixed_precision=mixed)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def describe_device(accelerator: Accelerator) -> str:
    dev = accelerator.device
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (cuda, {accelerator.num_processes} process(es))"
    return f"{dev.type} ({torch.get_num_threads()} threads, {accelerator.num_processes} process(es))"
