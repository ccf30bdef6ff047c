"""The one-shot pipeline, top to bottom: data -> partition -> local training -> server methods.

    result = run(preset_config("cpu"), out_dir="runs/demo", on_event=print)

1. :func:`prepare` checks the config and does the cheap work that can fail (load and split the
   data, build the clients' shared initial model), before anything heavy or written.
2. :func:`train` trains every client once on its own data: the only round of communication.
3. :func:`run` hands the trained clients to the server (:mod:`fedmitr.server`), runs each chosen
   method on them, and writes the run directory.

Every stage reports through ``on_event`` (see :mod:`fedmitr.events`); nothing here prints.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer

from fedmitr.clients import ClientResult, client_steps, client_workers, initial_model, patch_accuracy, train_clients
from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset, Partition, Split, label_entropy, open_dataset, partition, validation_view
from fedmitr.ensemble import Ensemble
from fedmitr.errors import ConfigError
from fedmitr.events import (EventHandler, Metric, PartitionReady, PrivacyChecked, Progress, RunFinished, StageFinished,
                            StageStarted, fan_out, ignore)
from fedmitr.methods import check_config, get_method, run_method
from fedmitr.models import fit_input
from fedmitr.privacy import NearestReal, nearest_real, real_set
from fedmitr.rundir import RunDir, check_out_dir
from fedmitr.runtime import DeviceInfo, Workers, describe_device, make_accelerator, set_seed
from fedmitr.server import MethodResult, ServerContext
from fedmitr.side_by_side import method_workers, run_methods


@dataclass
class Prepared:
    """A checked config's data, split and the clients' shared starting point."""

    dataset: ImageDataset
    partition: Partition
    init: VisionTransformer  # the weights the server sends every client (see clients.initial_model)


@dataclass
class Federation:
    """The clients after their one round of local training, and what it cost."""

    dataset: ImageDataset
    partition: Partition
    clients: list[ClientResult]
    _: KW_ONLY
    client_accuracy: list[float]  # test accuracy of each client's own model
    # per client: on its own data's patches that show something, how often its head on the patch's
    # token names the image's class (do the patch tokens mean something?); None where not measured
    patch_accuracy: list[float | None] | None = None
    accelerator: Accelerator
    device: DeviceInfo
    seconds: dict[str, float]  # "data" and "clients", wall-clock
    client_workers: int = 1  # clients trained at a time in one-thread worker processes (1: here)

    @property
    def ensemble(self) -> Ensemble:
        """The clients' models as the server's teacher."""
        return Ensemble([c.model for c in self.clients], [c.num_samples for c in self.clients])


@dataclass(kw_only=True)
class RunResult:
    config: RunConfig
    dataset: ImageDataset
    partition: Partition
    clients: list[ClientResult]
    methods: dict[str, MethodResult]
    metrics: dict[str, Any]  # exactly what metrics.json holds
    out_dir: Path | None


def prepare(cfg: RunConfig, dataset: ImageDataset | None = None, on_event: EventHandler = ignore) -> Prepared:
    """Validate ``cfg`` and do the cheap, fallible work before anything heavy.

    An invalid value, an impossible split, an unknown architecture, a patch grid that does not
    divide the image, or pretrained weights that cannot be fetched all fail here. ``dataset``, if
    given, is used instead of loading ``cfg.data.dataset`` (it must be that dataset).
    """
    check_config(cfg)
    dataset, part = load_data(cfg, dataset, on_event)
    return Prepared(dataset, part, initial_model(cfg.model, dataset, cfg.seed))


def load_data(cfg: RunConfig, dataset: ImageDataset | None = None, on_event: EventHandler = ignore
              ) -> tuple[ImageDataset, Partition]:
    """The dataset of ``cfg`` (its validation view if asked) and its client split: deterministic,
    so a real client on its own machine computes the same split and keeps its own shard."""
    d = cfg.data
    if dataset is None:
        dataset = open_dataset(d.dataset, d.max_train_samples, d.max_test_samples, on_progress=lambda done, total: (
            on_event(Progress("data", done, total, f"decoding images {done}/{total}"))))
        if d.evaluate_on == "validation":
            dataset = validation_view(dataset)
    part = partition(dataset.train.labels.numpy(), d.num_clients, d.alpha, dataset.num_classes,
                     seed=cfg.seed, min_samples=d.min_client_samples)
    return dataset, part


def train(cfg: RunConfig, on_event: EventHandler = ignore, dataset: ImageDataset | None = None) -> Federation:
    """Prepare the data and train every client once: everything before the server's work."""
    t0 = time.perf_counter()
    # May raise: nothing but the decoding progress of a Hub dataset is reported before this.
    prepared = prepare(cfg, dataset, on_event)
    dataset, part = prepared.dataset, prepared.partition
    seconds = {"data": time.perf_counter() - t0}
    on_event(StageStarted("data", info=f"{dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test"))
    on_event(PartitionReady(part.class_counts, dataset.class_names))
    on_event(StageFinished("data", seconds["data"]))

    accelerator = make_accelerator()
    set_seed(cfg.seed)
    device = describe_device(accelerator)
    steps = sum(client_steps(len(idx), cfg.clients) for idx in part.client_indices)
    workers = client_workers(accelerator, cfg.data.num_clients)
    side_by_side = f"; {workers} clients at a time, one thread each" if workers > 1 else ""
    on_event(StageStarted("clients", total=steps, info=f"{device}{side_by_side}", device=device))
    t0 = time.perf_counter()
    measured: dict[int, float] = {}

    def evaluated(client: ClientResult) -> None:  # each client's bar appears as soon as it is trained
        measured[client.index] = Ensemble([client.model]).evaluate(dataset.test)
        on_event(Metric("accuracy", measured[client.index], f"client {client.index + 1}", client=client.index))

    clients = train_clients(dataset, part, cfg.model, cfg.clients, accelerator=accelerator, seed=cfg.seed,
                            on_event=on_event, init=prepared.init, on_trained=evaluated)
    for c in clients:  # the clients of the other processes (torchrun / accelerate launch)
        if c.index not in measured:
            evaluated(c)
    client_accuracy = [measured[c.index] for c in clients]
    patch = [patch_accuracy(c.model, Split(dataset.train.images[torch.from_numpy(part.client_indices[c.index])],
                                           dataset.train.labels[torch.from_numpy(part.client_indices[c.index])]),
                            (dataset.mean, dataset.std)) for c in clients]
    seconds["clients"] = time.perf_counter() - t0
    on_event(StageFinished("clients", seconds["clients"]))
    return Federation(dataset, part, clients, client_accuracy=client_accuracy, patch_accuracy=patch,
                      accelerator=accelerator, device=device, seconds=seconds, client_workers=workers)


def run(cfg: RunConfig, out_dir: str | Path | RunDir | None = None, on_event: EventHandler = ignore,
        dataset: ImageDataset | None = None) -> RunResult:
    """Run the whole one-shot pipeline of ``cfg`` and (if ``out_dir``) write the run directory
    (a :class:`RunDir` is taken as already checked).

    Invalid input raises :class:`ConfigError` (or ``DatasetUnavailable``/``ModelUnavailable``)
    before any training starts and before anything is written.
    """
    t_start = time.perf_counter()
    run_dir = out_dir if isinstance(out_dir, RunDir) or out_dir is None else RunDir(check_out_dir(out_dir))
    if run_dir is not None:
        on_event = fan_out(run_dir.record, on_event)  # the run directory keeps the event stream
    fed = train(cfg, on_event, dataset)
    return serve(cfg, fed, run_dir=run_dir, on_event=on_event, started=t_start)


def serve(cfg: RunConfig, fed: Federation, *, run_dir: RunDir | None = None, on_event: EventHandler = ignore,
          privacy: bool = True, extra_metrics: dict[str, Any] | None = None,
          started: float | None = None) -> RunResult:
    """The server's side of a run: every method of ``cfg`` on the trained clients of ``fed``, the
    privacy check (``privacy``: it needs the clients' data, which only a simulation holds), and the
    run directory. ``extra_metrics`` are added to ``metrics.json`` (e.g. which clients replied).
    ``on_event`` should already include ``run_dir.record`` if the events are to be kept."""
    t_start = time.perf_counter() if started is None else started
    workers = Workers.of(fed.accelerator)
    server = ServerContext(cfg, fed.dataset, fed.ensemble, fed.accelerator.device, on_event=on_event, workers=workers)
    finished: dict[str, MethodResult] = {}

    def done(result: MethodResult) -> None:
        finished[result.name] = result
        on_event(Metric("accuracy", result.accuracy, result.name))
        on_event(StageFinished(result.name, result.seconds))

    side_by_side = None
    if fed.accelerator.device.type == "cpu" and workers.size == 1:
        # Each method on one torch thread, side by side in worker processes where that pays: its
        # numbers depend on the seed and the settings alone (fedmitr.side_by_side).
        side_by_side = method_workers(fed.accelerator, cfg.methods)
        run_methods(cfg, fed.dataset, fed.ensemble, workers=side_by_side, on_event=on_event, on_result=done)
    else:  # a GPU, or the processes of torchrun / accelerate launch: one method after another, together
        for name in cfg.methods:
            on_event(StageStarted(name, info=get_method(name).summary))
            done(run_method(name, server))
    methods = {name: finished[name] for name in cfg.methods}
    checks = privacy_check(fed, methods, on_event) if privacy and any(r.synthetic for r in methods.values()) else {}
    seconds = {**fed.seconds, "total": time.perf_counter() - t_start}

    metrics = run_metrics(cfg, fed, methods, seconds)
    if checks:
        metrics["privacy"] = {name: check.summary() for name, check in checks.items()}
    metrics["processes"] = process_record(workers, fed, methods)
    metrics["client_workers"] = fed.client_workers
    if side_by_side is not None:  # on a CPU: every method on one thread, in this many workers (0: here)
        metrics["method_workers"] = side_by_side
    metrics.update(extra_metrics or {})
    on_event(RunFinished(metrics))
    if run_dir is not None and fed.accelerator.is_main_process:
        write_run_dir(run_dir, cfg, metrics, fed=fed, methods=methods, privacy=checks)
    fed.accelerator.wait_for_everyone()  # no process leaves while the main one still writes
    return RunResult(config=cfg, dataset=fed.dataset, partition=fed.partition, clients=fed.clients, methods=methods,
                     metrics=metrics, out_dir=run_dir.path if run_dir is not None else None)


def _digest(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in (tensors.values() if isinstance(tensors, dict) else tensors):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def process_record(workers: Workers, fed: Federation, methods: dict[str, MethodResult]) -> dict[str, Any]:
    """How many processes shared the run, and a digest of what each one holds at the end: the
    clients, every global model and every synthetic pool (equal digests: the processes agree)."""
    mine = {"clients": _digest([v for c in fed.clients for v in c.model.state_dict().values()])}
    for name, r in methods.items():
        if r.model is not None:
            mine[f"model:{name}"] = _digest(r.model.state_dict())
        if r.synthetic is not None:
            mine[f"pool:{name}"] = _digest([torch.from_numpy(r.synthetic.images)])
    every = workers.gather(mine)
    return {"count": workers.size, "digests": {key: [d[key] for d in every] for key in mine},
            "agree": all(d == every[0] for d in every)}


def privacy_check(fed: Federation, methods: dict[str, MethodResult], on_event: EventHandler = ignore
                  ) -> dict[str, NearestReal]:
    """The nearest real training image of every synthetic image, per inversion method (see
    :mod:`fedmitr.privacy`), each reported as a :class:`PrivacyChecked` event. It runs here because
    the simulation holds every client's data; in a real deployment each client would run it on
    its own data."""
    t0 = time.perf_counter()
    on_event(StageStarted("privacy", info="nearest real training image of every synthetic image"))
    train, ensemble = fed.dataset.train, fed.ensemble
    real = real_set(fed.dataset.to_unit(train.images), train.images, train.labels, ensemble)
    checks = {}
    for name, result in methods.items():
        if result.synthetic is not None:
            unit = torch.from_numpy(result.synthetic.unit_images())  # at the model's input size
            normalised = (unit - torch.tensor(fed.dataset.mean).view(1, -1, 1, 1)) / torch.tensor(
                fed.dataset.std).view(1, -1, 1, 1)
            checks[name] = check = nearest_real(fit_input(unit, fed.dataset.image_size), normalised, real, ensemble)
            on_event(PrivacyChecked(name, check.index, check.distance, check.summary()))
    on_event(StageFinished("privacy", time.perf_counter() - t0))
    return checks


def run_metrics(cfg: RunConfig, fed: Federation, methods: dict[str, MethodResult],
                seconds: dict[str, float]) -> dict[str, Any]:
    """The content of ``metrics.json``."""
    dataset, part = fed.dataset, fed.partition
    return {
        "config": cfg.to_dict(),
        "dataset": {
            "name": dataset.name, "source": dataset.source, "num_classes": dataset.num_classes,
            "class_names": list(dataset.class_names), "image_size": dataset.image_size,
            "channels": dataset.channels, "num_train": len(dataset.train), "num_test": len(dataset.test),
            "mean": list(dataset.mean), "std": list(dataset.std),  # the inputs' normalisation, per channel
        },
        "device": str(fed.device),
        "partition": {
            "alpha": part.alpha,
            "class_counts": part.class_counts.tolist(),
            "label_entropy": label_entropy(part.class_counts),
        },
        "clients": [
            {"index": c.index, "accuracy": acc, "num_samples": c.num_samples, "seconds": c.seconds,
             "final_loss": c.losses[-1] if c.losses else None, "patch_accuracy": patch}
            for c, acc, patch in zip(fed.clients, fed.client_accuracy,
                                     fed.patch_accuracy or [None] * len(fed.clients))
        ],
        "methods": {name: r.to_dict() for name, r in methods.items()},
        "seconds": seconds,
    }


def write_run_dir(run_dir: RunDir, cfg: RunConfig, metrics: dict[str, Any], *, fed: Federation,
                  methods: dict[str, MethodResult], privacy: dict[str, NearestReal] | None = None) -> None:
    """Everything the run made, through :class:`RunDir`; ``metrics.json`` last."""
    for c in fed.clients:
        run_dir.save_client(c.index, c.model)
    for name, r in methods.items():
        if r.model is not None:
            run_dir.save_model(name, r.model)
            if r.aux_head is not None:
                run_dir.save_aux_head(name, r.aux_head, r.vote)
        if r.synthetic is not None:
            check = (privacy or {}).get(name)
            run_dir.save_synthetic(name, r.synthetic, {
                "class_names": list(fed.dataset.class_names),
                "nearest_real_index": check.index.tolist() if check else None,
                "nearest_real_distance": {k: v.tolist() for k, v in check.distance.items()} if check else None})
    run_dir.write_config(cfg)
    run_dir.write_events()
    run_dir.write_metrics(metrics)
