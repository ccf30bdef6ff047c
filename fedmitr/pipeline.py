"""The one-shot pipeline, top to bottom: data -> partition -> local training -> server methods.

    result = run(preset_config("cpu"), out_dir="runs/demo", on_event=print)

Every stage reports through ``on_event`` (see :mod:`fedmitr.events`); nothing here prints.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from fedmitr import baselines
from fedmitr.clients import ClientResult, evaluate, train_clients
from fedmitr.config import ConfigError, RunConfig
from fedmitr.data import ImageDataset, Partition, label_entropy, open_dataset, partition
from fedmitr.events import EventHandler, Metric, PartitionReady, StageFinished, StageStarted, ignore
from fedmitr.methods import METHODS
from fedmitr.models import build_model
from fedmitr.runtime import describe_device, make_accelerator, seed_everything


@dataclass
class MethodResult:
    name: str
    accuracy: float  # test accuracy, 0..1
    seconds: float  # wall-clock time of the server-side method
    model: VisionTransformer | None = None  # the single global model, if the method makes one
    curve: list[float] = field(default_factory=list)  # test accuracy after each round (inversion methods)
    extra: dict[str, Any] = field(default_factory=dict)  # stage timings and counters, saved to metrics.json

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": self.accuracy, "seconds": self.seconds}
        if self.curve:
            out["curve"] = self.curve
        out.update(self.extra)
        return out


@dataclass
class RunResult:
    config: RunConfig
    dataset: ImageDataset
    partition: Partition
    clients: list[ClientResult]
    methods: dict[str, MethodResult]
    metrics: dict[str, Any]  # exactly what metrics.json holds
    out_dir: Path | None


def check_out_dir(out_dir: str | Path) -> Path:
    """Fail early (before any work) if ``out_dir`` cannot be created or written."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out dir {str(path)!r} exists and is not a directory; give a directory path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"out dir {str(path)!r} is not writable ({str(probe)!r} does not allow writing); "
                          f"choose a directory you can write to")
    return path


def prepare(cfg: RunConfig, dataset: ImageDataset | None = None) -> tuple[ImageDataset, Partition]:
    """Validate ``cfg`` and do the cheap, fallible work (load data, split it) before anything heavy."""
    cfg.validate()
    d = cfg.data
    if dataset is None:
        dataset = open_dataset(d.dataset, d.max_train_samples, d.max_test_samples)
    part = partition(dataset.train.labels.numpy(), d.num_clients, d.alpha, dataset.num_classes,
                     seed=cfg.seed, min_samples=d.min_client_samples)
    # Build one model now: an unknown architecture, a patch grid that does not divide the image, or
    # pretrained weights that cannot be fetched fail here, before any training (weights are cached).
    build_model(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    return dataset, part


def run(cfg: RunConfig, out_dir: str | Path | None = None, on_event: EventHandler = ignore,
        dataset: ImageDataset | None = None) -> RunResult:
    """Run the whole one-shot pipeline of ``cfg`` and (if ``out_dir``) write the run directory.

    Invalid input raises :class:`ConfigError` (or ``DatasetUnavailable``/``ModelUnavailable``)
    before any training starts and before anything is written.
    """
    t_start = time.perf_counter()
    out_path = check_out_dir(out_dir) if out_dir is not None else None

    t0 = time.perf_counter()
    dataset, part = prepare(cfg, dataset)  # may raise: nothing reported or written before this
    seconds = {"data": time.perf_counter() - t0}
    on_event(StageStarted("data", info=f"{dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test"))
    on_event(PartitionReady(part.class_counts, dataset.class_names))
    on_event(StageFinished("data", seconds["data"]))

    accelerator = make_accelerator()
    seed_everything(cfg.seed)
    device = describe_device(accelerator)
    on_event(StageStarted("clients", total=cfg.data.num_clients * cfg.clients.epochs, info=device))
    t0 = time.perf_counter()
    clients = train_clients(dataset, part, cfg.model, cfg.clients, accelerator, cfg.seed, on_event)
    client_acc = [evaluate(c.model, dataset.test) for c in clients]
    for c, acc in zip(clients, client_acc):
        on_event(Metric("accuracy", acc, f"client {c.index + 1}"))
    seconds["clients"] = time.perf_counter() - t0
    on_event(StageFinished("clients", seconds["clients"]))

    methods: dict[str, MethodResult] = {}
    for name in cfg.methods:
        on_event(StageStarted(name, info=METHODS[name].summary))
        t0 = time.perf_counter()
        result = run_method(name, cfg, dataset, clients, accelerator, on_event)
        result.seconds = time.perf_counter() - t0
        methods[name] = result
        on_event(Metric("accuracy", result.accuracy, name))
        on_event(StageFinished(name, result.seconds))
    seconds["total"] = time.perf_counter() - t_start

    metrics = {
        "config": cfg.to_dict(),
        "dataset": {
            "name": dataset.name, "source": dataset.source, "num_classes": dataset.num_classes,
            "class_names": list(dataset.class_names), "image_size": dataset.image_size,
            "channels": dataset.channels, "num_train": len(dataset.train), "num_test": len(dataset.test),
        },
        "device": device,
        "partition": {
            "alpha": part.alpha,
            "class_counts": part.class_counts.tolist(),
            "label_entropy": label_entropy(part.class_counts),
        },
        "clients": [
            {"index": c.index, "accuracy": acc, "num_samples": c.num_samples, "seconds": c.seconds,
             "final_loss": c.losses[-1] if c.losses else None}
            for c, acc in zip(clients, client_acc)
        ],
        "methods": {name: r.to_dict() for name, r in methods.items()},
        "seconds": seconds,
    }
    if out_path is not None and accelerator.is_main_process:
        write_run_dir(out_path, cfg, metrics, clients, methods)
    return RunResult(cfg, dataset, part, clients, methods, metrics, out_path)


def run_method(name: str, cfg: RunConfig, dataset: ImageDataset, clients: list[ClientResult],
               accelerator, on_event: EventHandler, images_per_round: int | None = None) -> MethodResult:
    """Run one server-side method by name on the trained clients.

    ``images_per_round`` overrides the inversion batch size (the benchmark's equal-time runs).
    """
    models = [c.model for c in clients]
    if name == "ensemble":
        return MethodResult(name, evaluate(models, dataset.test), 0.0)
    if name == "fedavg":
        model = baselines.fedavg(models, [c.num_samples for c in clients])
        return MethodResult(name, evaluate(model, dataset.test), 0.0, model=model)
    spec = METHODS.get(name)
    if spec is None or not spec.inversion:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    from fedmitr.distill import run_inversion_method

    out = run_inversion_method(spec, cfg, dataset, models, accelerator.device, on_event, images_per_round)
    return MethodResult(name, out["curve"][-1], 0.0, model=out["model"], curve=out["curve"], extra=out["extra"])


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_run_dir(out_dir: Path, cfg: RunConfig, metrics: dict[str, Any], clients: list[ClientResult],
                  methods: dict[str, MethodResult]) -> None:
    """``config.json``, ``metrics.json``, ``clients/client_K.safetensors``, ``models/METHOD.safetensors``."""
    (out_dir / "clients").mkdir(parents=True, exist_ok=True)
    for c in clients:
        save_file(_cpu_state(c.model), str(out_dir / "clients" / f"client_{c.index}.safetensors"))
    for name, r in methods.items():
        if r.model is not None:
            (out_dir / "models").mkdir(exist_ok=True)
            save_file(_cpu_state(r.model), str(out_dir / "models" / f"{name}.safetensors"))
    _atomic_write(out_dir / "config.json", cfg.to_json() + "\n")
    # metrics.json last: its presence means the run directory is complete.
    _atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
