"""The runtime: accelerate set-up, and clients dealt over several processes."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState, GradientState

from fedmitr.clients import train_clients
from fedmitr.config import preset_config
from fedmitr.data import open_dataset, partition, subsample
from fedmitr.runtime import DeviceInfo, describe_device, make_accelerator

TINY = preset_config("tiny")


def test_make_accelerator_can_be_called_again_with_other_settings():
    make_accelerator()
    # What make_accelerator protects against: once accelerate's process-wide state exists, an
    # Accelerator with other settings raises.
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(True)  # noqa: SLF001
    GradientState._reset_state()  # noqa: SLF001
    Accelerator(cpu=True, mixed_precision="bf16")  # someone else's accelerator, other settings
    first = make_accelerator()
    second = make_accelerator(cpu=True)
    assert first.num_processes == 1
    assert second.device.type == "cpu"
    assert second.mixed_precision == "no"  # bf16 only on a GPU that supports it
    assert second.num_processes == 1 and second.is_main_process



def test_describe_device_is_typed_and_prints_as_before():
    torch.set_num_threads(1)
    device = describe_device(make_accelerator(cpu=True))
    assert device == DeviceInfo("cpu", "cpu", 1, 1)
    assert str(device) == "cpu (1 thread, 1 process)"
    assert str(DeviceInfo("cuda", "NVIDIA H100", 2, 8)) == "NVIDIA H100 (cuda, 2 processes)"


def _setup():
    ds = subsample(open_dataset("mnist5k"), 300, 100)
    part = partition(ds.train.labels.numpy(), 3, 0.5, 10, seed=0)
    return ds, part


def _train_on_two_processes(out_path: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    torch.set_num_threads(1)
    # The forked process inherits the parent's process-wide accelerate state (one process, from the
    # tests that ran before); drop it so the launcher's 2-process environment is read afresh.
    AcceleratorState._reset_state(True)  # noqa: SLF001
    GradientState._reset_state()  # noqa: SLF001
    ds, part = _setup()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    clients = train_clients(ds, part, TINY.model, TINY.clients, accelerator=accelerator, seed=0)
    assert [c.index for c in clients] == [0, 1, 2], "every process gets every client, in order"
    if accelerator.is_main_process:
        torch.save([{k: v.cpu() for k, v in c.model.state_dict().items()} for c in clients], out_path)


def test_two_processes_train_the_same_clients_as_one(tmp_path):
    out_path = str(tmp_path / "clients.pt")
    debug_launcher(_train_on_two_processes, args=(out_path,), num_processes=2)
    distributed = torch.load(out_path)
    ds, part = _setup()
    single = train_clients(ds, part, TINY.model, TINY.clients, accelerator=make_accelerator(cpu=True), seed=0)
    assert len(distributed) == len(single) == 3
    for state, client in zip(distributed, single):
        for key, value in client.model.state_dict().items():
            # Same seeds, same data: equal up to float reordering (other clients differ by ~1e-1).
            torch.testing.assert_close(state[key], value.cpu(), rtol=1e-3, atol=2e-4)



def test_torchrun_with_two_processes_forms_one_group_and_writes_once(tmp_path):
    """The README's command: two processes, one run; only the main process writes and prints."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "fedmitr", "run", "--preset", "tiny",
                           "--methods", "fedavg,fedmitr", "--out", str(out), "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and "(2 processes)" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"]["count"] == 2 and metrics["processes"]["agree"]
    digests = metrics["processes"]["digests"]
    assert set(digests) >= {"clients", "model:fedmitr", "pool:fedmitr"}
    assert all(len(set(v)) == 1 and len(v) == 2 for v in digests.values())
    assert "2 processes" in metrics["device"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written files
    shutil.rmtree(out)
