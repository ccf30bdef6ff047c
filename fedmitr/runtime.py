"""Device handling through accelerate, and the processes that share a run."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import gather_object, reduce, set_seed

from fedmitr.events import DeviceInfo

__all__ = ["DeviceInfo", "Workers", "describe_device", "end_processes", "launched_processes", "make_accelerator",
           "set_seed"]


def launched_processes() -> int:
    """How many processes ``torchrun`` or ``accelerate launch`` started for this run (1 if neither)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def make_accelerator(cpu: bool = False) -> Accelerator:
    """A fresh :class:`Accelerator` (CPU, GPU or MPS, picked by accelerate).

    accelerate keeps process-wide state and raises if a second Accelerator is created with other
    settings; resetting it first lets one process (a test session, the web app) run many pipelines.
    Under ``torchrun`` / ``accelerate launch`` the processes form one group (gloo on CPUs, NCCL on
    GPUs), which is created once and kept.
    """
    state = AcceleratorState._shared_state  # noqa: SLF001 - the documented way accelerate's tests reset
    grouped = state and state.get("distributed_type") is not None and int(state.get("num_processes", 1) or 1) > 1
    if grouped or launched_processes() > 1:
        # Keep the group; accelerate only forms a CPU process group when asked for the CPU explicitly.
        return Accelerator(cpu=cpu or not torch.cuda.is_available())
    AcceleratorState._reset_state(True)  # noqa: SLF001
    GradientState._reset_state()  # noqa: SLF001
    mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not cpu else "no"
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", mixed)  # accelerate's own override
    return Accelerator(cpu=cpu, mixed_precision=mixed)


def end_processes() -> None:
    """Leave the process group of a ``torchrun`` / ``accelerate launch`` run cleanly (a no-op for one
    process). Call it once, when the process is done: a process that exits with the group still
    open can abort in gloo's destructor while the others are still working."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class Workers:
    """The processes sharing a run's server work (``torchrun`` / ``accelerate launch``); one by default.

    Each process inverts its share of every round's images, the shares are gathered so every process
    holds the same pool, and distillation is data-parallel (each process a share of every batch,
    gradients averaged), so every process ends with the same global model.
    """

    rank: int = 0
    size: int = 1

    @classmethod
    def of(cls, accelerator: Accelerator) -> "Workers":
        return cls(accelerator.process_index, accelerator.num_processes)

    def share(self, n: int) -> slice:
        """This process's contiguous share of ``n`` items (the first processes take one more), as
        accelerate's ``split_between_processes`` deals them."""
        if self.size == 1:
            return slice(0, n)
        with PartialState().split_between_processes(list(range(n))) as mine:
            return slice(mine[0], mine[-1] + 1) if mine else slice(0, 0)

    def gather(self, obj: object) -> list:
        """``obj`` of every process, in rank order (``[obj]`` for one process)."""
        if self.size == 1:
            return [obj]
        return gather_object([obj])

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Replace the gradients of ``module`` by their mean over the processes."""
        if self.size == 1:
            return
        for p in module.parameters():
            if p.grad is not None:
                p.grad.copy_(reduce(p.grad, reduction="mean"))


def worker_process(entry: str, *args: str) -> "subprocess.Popen[bytes]":
    """A one-thread worker process of this fedmitr (also from a checkout): ``python -c "from MODULE
    import FN; FN()" ARGS``, for ``entry`` "MODULE:FN", with pipes on stdin, stdout and stderr. A plain
    subprocess, so no ``if __name__ == "__main__"`` guard is needed in a user's script."""
    import subprocess
    import sys
    from pathlib import Path

    module, fn = entry.split(":")
    # The folder that holds this package, from this file: `fedmitr.__file__` is None when a folder
    # named fedmitr in the working directory (a clone, say) shadows the package as a namespace.
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-c", f"from {module} import {fn}; {fn}()", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def describe_device(accelerator: Accelerator) -> DeviceInfo:
    dev = accelerator.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return DeviceInfo(dev.type, name, accelerator.num_processes, torch.get_num_threads(),
                      precision=str(accelerator.mixed_precision))
