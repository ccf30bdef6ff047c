"""Local training: each client trains its own ViT on its own data only, once.

Under ``accelerate launch`` with several processes, clients are dealt round-robin to the processes
(client k trains on process k % world_size) and the trained weights are gathered on every process:
in federated learning clients are independent, so this is the natural way to use several GPUs.

On a CPU, one process, the clients train side by side in worker processes of one torch thread each,
as many as the run has threads (:func:`client_workers`). A model this small gains ~10% from a second
thread and ~2x from a second client trained beside it, and a client trained on one thread has the same
weights on any machine and in any number of workers.
"""

from __future__ import annotations

import math
import os
import queue
import time
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from timm.models.vision_transformer import VisionTransformer

from fedmitr.config import ClientTrainConfig, ModelConfig
from fedmitr.data import ImageDataset, Partition, Split
from fedmitr.errors import excerpt
from fedmitr.events import EventHandler, Progress, ignore
from fedmitr.models import build_model, fit_input, model_input_size, patch_grid, random_shift, sparse_forward, token_logits
from fedmitr.training import foreground, warmup_cosine


@dataclass
class ClientResult:
    index: int  # client id, 0-based
    model: VisionTransformer  # trained, in eval mode, on the accelerator's device
    num_samples: int  # size of the client's training set
    _: KW_ONLY
    seconds: float = 0.0  # wall-clock training time
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch


def train_step(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, *, accelerator: Accelerator, label_smoothing: float = 0.0,
               token_weight: float = 0.0, foreground: torch.Tensor | None = None) -> dict[str, float]:
    """One supervised step; returns the named losses (timm's training-task convention).

    With ``token_weight`` > 0, the class head on each patch token also learns the image's class
    where ``foreground`` ([B, N] bool) says the patch shows something (LV-ViT's token labeling,
    with the image's own label as every showing patch's target).
    """
    with accelerator.autocast():
        if token_weight > 0:
            out = sparse_forward(model, images)
            logits = out.logits
            per_token = F.cross_entropy(token_logits(model, out.tokens).flatten(0, 1).float(),
                                        labels.repeat_interleave(out.tokens.shape[1]), reduction="none")
            mask = foreground.flatten().float()
            token_loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
        else:
            logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        losses = {"class": loss}
        if token_weight > 0:
            losses["token"] = token_loss
            loss = loss + token_weight * token_loss
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def train_client(index: int, data: Split, model: VisionTransformer, cfg: ClientTrainConfig, *,
                 accelerator: Accelerator, generator: torch.Generator, allow_flip: bool = False,
                 unit_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> ClientResult:
    """Train ``model`` on one client's data with cross-entropy, AdamW and shift (+flip) augmentation.

    ``unit_stats`` (the data's per-channel mean and std) let the token loss find the patches that
    show something. ``on_step(epoch, mean_loss_so_far)`` is called after every optimiser step
    (epochs 1-based).
    """
    if cfg.token_weight > 0 and unit_stats is None:
        raise ValueError("the clients' token loss needs the data's mean and std (unit_stats)")
    start = time.perf_counter()
    device = accelerator.device
    size = model_input_size(model)
    images, labels = data.images.to(device), data.labels.to(device)
    n = len(data)
    steps_per_epoch = client_steps(n, cfg) // cfg.epochs
    # Not accelerator.prepare: that would wrap the model in DDP and all-reduce gradients between
    # processes, but each client trains alone (different clients run on different processes).
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_frac)
    patch = size // patch_grid(model)
    model.train()
    losses = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x = fit_input(random_shift(images[idx], cfg.shift_px, generator, flip=allow_flip), size)
            fg = foreground(to_unit(x, unit_stats), patch) if cfg.token_weight > 0 else None
            step = train_step(model, x, labels[idx], optimizer, accelerator=accelerator,
                              label_smoothing=cfg.label_smoothing, token_weight=cfg.token_weight, foreground=fg)
            scheduler.step_update(epoch * steps_per_epoch + s + 1)
            total += step["loss"]
            if on_step is not None:
                on_step(epoch + 1, total / (s + 1))
        losses.append(total / steps_per_epoch)
    model = model.eval()
    return ClientResult(index, model, n, seconds=time.perf_counter() - start, losses=losses)


def step_seconds(model_cfg: ModelConfig, *, batch_size: int = 64, shape: tuple[int, int, int] = (10, 1, 28),
                 steps: int = 12) -> float:
    """How fast this machine trains: the median seconds of one client training step of ``model_cfg``
    on one torch thread (random images of ``shape`` = classes, channels, size; a few warm-up steps
    first). About a second for the cpu preset's ViT; the app scales its time plan by it."""
    import statistics

    from fedmitr.runtime import make_accelerator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        num_classes, channels, size = shape
        model = build_model(model_cfg, num_classes, channels, size).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        images = torch.randn(batch_size, channels, size, size, generator=generator)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        accelerator = make_accelerator(cpu=True)
        times = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            train_step(model, images, labels, optimizer, accelerator=accelerator)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def client_steps(num_samples: int, cfg: ClientTrainConfig) -> int:
    """Optimiser steps of one client's local training: ``epochs`` passes in batches of ``batch_size``."""
    return cfg.epochs * max(1, math.ceil(num_samples / cfg.batch_size))


def initial_model(model_cfg: ModelConfig, dataset: ImageDataset, seed: int) -> VisionTransformer:
    """The weights the server sends every client before local training (as in FedAvg): the same
    for all clients, so only the data and the order of the batches differ between them. With
    ``model.init`` a pretrained backbone (fedmitr.pretrain), everything but the head comes from it."""
    torch.manual_seed(seed)
    model = build_model(model_cfg, dataset.num_classes, dataset.channels, dataset.image_size)
    if model_cfg.init != "scratch":
        from fedmitr.pretrain import load_backbone

        load_backbone(model, model_cfg.init, model_cfg, image_size=dataset.image_size, channels=dataset.channels)
    return model


def train_one(k: int, dataset: ImageDataset, part: Partition, model_cfg: ModelConfig, cfg: ClientTrainConfig, *,
              accelerator: Accelerator, seed: int, init_state: dict[str, torch.Tensor],
              on_step: Callable[[int, float], None] | None = None) -> ClientResult:
    """Client ``k`` of ``part``: its own seed, its own shard, the shared initial weights; trained once.

    The one definition of a client's training, for :func:`train_clients` and for real clients on
    their own machines (the Flower app): the same ``k`` and seed give the same model anywhere.
    """
    return _Shard.of(k, dataset, part, model_cfg=model_cfg, cfg=cfg, seed=seed).train(accelerator, init_state, on_step)


@dataclass(frozen=True, kw_only=True)
class _Shard:
    """Everything one client's training needs, small enough to send to a worker process."""

    k: int
    split: Split
    model_cfg: ModelConfig
    cfg: ClientTrainConfig
    seed: int
    shape: tuple[int, int, int]  # num_classes, channels, image_size
    allow_flip: bool
    unit_stats: tuple[tuple[float, ...], tuple[float, ...]]

    @classmethod
    def of(cls, k: int, dataset: ImageDataset, part: Partition, *, model_cfg: ModelConfig, cfg: ClientTrainConfig,
           seed: int) -> "_Shard":
        idx = torch.from_numpy(part.client_indices[k])
        return cls(k=k, split=Split(dataset.train.images[idx], dataset.train.labels[idx]), model_cfg=model_cfg,
                   cfg=cfg, seed=seed, shape=(dataset.num_classes, dataset.channels, dataset.image_size),
                   allow_flip=dataset.allow_flip, unit_stats=(dataset.mean, dataset.std))

    def train(self, accelerator: Accelerator, init_state: dict[str, torch.Tensor],
              on_step: Callable[[int, float], None] | None = None) -> ClientResult:
        torch.manual_seed(self.seed * 1000 + self.k)
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.k)
        model = build_model(self.model_cfg, *self.shape)
        model.load_state_dict(init_state)
        return train_client(self.k, self.split, model, self.cfg, accelerator=accelerator, generator=generator,
                            allow_flip=self.allow_flip, unit_stats=self.unit_stats, on_step=on_step)


def train_clients(dataset: ImageDataset, part: Partition, model_cfg: ModelConfig, cfg: ClientTrainConfig, *,
                  accelerator: Accelerator, seed: int, on_event: EventHandler = ignore,
                  init: VisionTransformer | None = None,
                  on_trained: Callable[[ClientResult], None] | None = None,
                  workers: int | None = None) -> list[ClientResult]:
    """Train every client of ``part`` independently from ``init`` (default :func:`initial_model`).

    ``workers`` > 1 trains the clients side by side in that many worker processes of one torch thread
    each (default: :func:`client_workers`); 1 trains them here, one after the other.

    Emits one :class:`Progress` per optimiser step (so a consumer can stop a run between any two),
    counting the steps of all clients; the last step of an epoch carries that epoch's mean loss.
    ``on_trained(client)`` is called as soon as each client of this process is trained (so a
    client's result can be shown before the next one trains).
    """
    k_total = part.num_clients
    total = sum(client_steps(len(idx), cfg) for idx in part.client_indices)
    done = 0
    mine: list[ClientResult] = []
    init_state = (init if init is not None else initial_model(model_cfg, dataset, seed)).state_dict()
    workers = client_workers(accelerator, k_total) if workers is None else min(workers, k_total)
    if workers > 1:
        shards = [_Shard.of(k, dataset, part, model_cfg=model_cfg, cfg=cfg, seed=seed) for k in range(k_total)]
        return _train_in_workers(shards, init_state, workers, accelerator=accelerator, on_event=on_event,
                                 on_trained=on_trained)
    for k in range(k_total):
        if k % accelerator.num_processes != accelerator.process_index:
            continue

        def on_step(epoch: int, loss: float, k: int = k) -> None:
            nonlocal done
            done += 1
            # Under several processes each reports its own share; scaled, the bar still ends near 100%.
            on_event(Progress("clients", min(total, done * accelerator.num_processes), total,
                              f"client {k + 1}/{k_total}, epoch {epoch}/{cfg.epochs}", {"loss": loss}))

        mine.append(train_one(k, dataset, part, model_cfg, cfg, accelerator=accelerator, seed=seed,
                              init_state=init_state, on_step=on_step))
        if on_trained is not None:
            on_trained(mine[-1])
    if accelerator.num_processes == 1:
        return mine
    return _share_clients(mine, dataset, model_cfg, accelerator)


def client_workers(accelerator: Accelerator, num_clients: int) -> int:
    """Worker processes for the clients of a run: on a CPU, in one process, ``$FEDMITR_CLIENT_WORKERS``
    if set, else one per torch thread of this process; at most one per client. Else 1 (a GPU, or a
    process of ``accelerate launch``)."""
    if accelerator.device.type != "cpu" or accelerator.num_processes > 1:
        return 1
    value = os.environ.get("FEDMITR_CLIENT_WORKERS", "").strip()
    if value and (not value.isdigit() or int(value) < 1):
        raise ValueError(f"FEDMITR_CLIENT_WORKERS must be a whole number >= 1 (got {excerpt(value)})")
    return max(1, min(num_clients, int(value) if value else torch.get_num_threads()))


# A worker reports a client's progress at most this often, and at every epoch's end.
_REPORT_EVERY_S = 0.2
# The pipeline hears from the client stage at least this often (a Stop is seen between two reports).
_HEARTBEAT_S = 0.25


def _worker_main() -> None:
    """A worker process (``python -c``, see :class:`_Worker`): trains the pickled shards read from
    stdin one after the other, reports ``k steps epoch loss`` lines on stdout, and pickles each
    trained client into ``client<k>.pt`` in the folder named by its first argument (then says
    ``done k``)."""
    import pickle
    import sys

    from fedmitr.runtime import make_accelerator

    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    shards, init_state = pickle.load(sys.stdin.buffer)
    accelerator = make_accelerator(cpu=True)
    for shard in shards:
        per_epoch = client_steps(len(shard.split), shard.cfg) // shard.cfg.epochs
        steps, last = 0, 0.0

        def on_step(epoch: int, loss: float, shard: _Shard = shard, per_epoch: int = per_epoch) -> None:
            nonlocal steps, last
            steps += 1
            now = time.monotonic()
            if steps % per_epoch == 0 or now - last >= _REPORT_EVERY_S:
                print(shard.k, steps, epoch, loss, flush=True)  # the run gone: a broken pipe ends this process
                last = now

        r = shard.train(accelerator, init_state, on_step)
        with open(out_dir / f"client{r.index}.pt", "wb") as fh:
            pickle.dump((r.index, r.model.state_dict(), r.num_samples, r.seconds, r.losses), fh)
        print("done", r.index, flush=True)


class _Worker:
    """One worker process and the threads that read what it says (so nothing here ever blocks on it)."""

    def __init__(self, shards: list[_Shard], init_state: dict[str, torch.Tensor], out_dir: Path,
                 lines: "queue.Queue[tuple]"):
        import pickle
        import threading

        from fedmitr.runtime import worker_process

        self.errors: list[str] = []
        self.proc = worker_process("fedmitr.clients:_worker_main", str(out_dir))

        def send() -> None:
            try:
                pickle.dump((shards, init_state), self.proc.stdin)
                self.proc.stdin.close()
            except OSError:  # the worker died at once: its stderr says why
                pass

        def read_progress() -> None:
            for line in self.proc.stdout:
                words = line.split()
                if words[0] == b"done":
                    lines.put(("done", int(words[1])))
                else:
                    k, steps, epoch, loss = words
                    lines.put(("step", int(k), int(steps), int(epoch), float(loss)))

        def read_errors() -> None:
            for line in self.proc.stderr:
                self.errors = [*self.errors[-30:], line.decode(errors="replace").rstrip()]

        self._threads = [threading.Thread(target=t, daemon=True) for t in (send, read_progress, read_errors)]
        for thread in self._threads:
            thread.start()

    def check(self) -> bool:
        """True once the worker has finished; raises if it failed."""
        code = self.proc.poll()
        if code not in (None, 0):
            for thread in self._threads[2:]:
                thread.join()
            detail = "\n".join(self.errors[-12:]) or f"exit code {code}"
            raise RuntimeError(f"a client worker process failed:\n{detail}")
        if code is None:
            return False
        for thread in self._threads:  # what it said last is read to the end (it has exited: no wait)
            thread.join()
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def _deal(shards: list[_Shard], workers: int) -> list[list[_Shard]]:
    """Deal the shards to ``workers`` lists of about equal work: the biggest first, each to the
    least loaded worker."""
    loads, groups = [0] * workers, [[] for _ in range(workers)]
    for shard in sorted(shards, key=lambda s: -client_steps(len(s.split), s.cfg)):
        i = loads.index(min(loads))
        groups[i].append(shard)
        loads[i] += client_steps(len(shard.split), shard.cfg)
    return [g for g in groups if g]


def _train_in_workers(shards: list[_Shard], init_state: dict[str, torch.Tensor], workers: int, *,
                      accelerator: Accelerator, on_event: EventHandler,
                      on_trained: Callable[[ClientResult], None] | None) -> list[ClientResult]:
    """Train ``shards`` in ``workers`` processes and report their progress as one stage.

    Leaving early (a Stop raised by ``on_event``, a failed worker) kills the workers at once.
    """
    import pickle
    import tempfile

    k_total, epochs = len(shards), shards[0].cfg.epochs
    total = sum(client_steps(len(s.split), s.cfg) for s in shards)
    lines: queue.Queue = queue.Queue()
    steps = dict.fromkeys(range(k_total), 0)
    event = Progress("clients", 0, total, f"starting {workers} client workers")
    results: dict[int, ClientResult] = {}
    with tempfile.TemporaryDirectory(prefix="fedmitr-clients-") as tmp:
        running = [_Worker(group, init_state, Path(tmp), lines) for group in _deal(shards, workers)]
        try:
            while len(results) < k_total:
                try:
                    line = lines.get(timeout=_HEARTBEAT_S)
                except queue.Empty:
                    running = [w for w in running if not w.check()]  # raises if one failed
                    if not running and lines.empty():
                        raise RuntimeError("the client workers ended without every client trained") from None
                    on_event(event)
                    continue
                if line[0] == "step":
                    _, k, done, epoch, loss = line
                    steps[k] = done
                    event = Progress("clients", min(total, sum(steps.values())), total,
                                     f"client {k + 1}/{k_total}, epoch {epoch}/{epochs}", {"loss": loss})
                    on_event(event)
                    continue
                with open(Path(tmp) / f"client{line[1]}.pt", "rb") as fh:
                    index, state, num_samples, seconds, losses = pickle.load(fh)
                model = build_model(shards[index].model_cfg, *shards[index].shape)
                model.load_state_dict(state)
                results[index] = ClientResult(index, model.to(accelerator.device).eval(), num_samples,
                                              seconds=seconds, losses=losses)
                if on_trained is not None:
                    on_trained(results[index])
        finally:
            for worker in running:
                worker.kill()
            for worker in running:
                worker.proc.wait()  # killed, or exited: reaped at once (no zombie); milliseconds
    return [results[k] for k in range(k_total)]


def _share_clients(mine: list[ClientResult], dataset: ImageDataset, model_cfg: ModelConfig,
                   accelerator: Accelerator) -> list[ClientResult]:
    """Gather every process's trained clients onto every process (weights travel as CPU tensors)."""
    payload = [(r.index, {k: v.cpu() for k, v in r.model.state_dict().items()}, r.num_samples, r.seconds, r.losses)
               for r in mine]
    results = []
    for index, state, num_samples, seconds, losses in sorted(gather_object(payload), key=lambda p: p[0]):
        model = build_model(model_cfg, dataset.num_classes, dataset.channels, dataset.image_size)
        model.load_state_dict(state)
        results.append(ClientResult(index, model.to(accelerator.device).eval(), num_samples, seconds=seconds,
                                    losses=losses))
    return results


def to_unit(images: torch.Tensor, unit_stats: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
    """Normalised ``[B, C, H, W]`` back to pixels in [0, 1], with the data's per-channel mean and std."""
    mean, std = (torch.tensor(v, device=images.device).view(1, -1, 1, 1) for v in unit_stats)
    return (images * std + mean).clamp(0, 1)


@torch.no_grad()
def patch_accuracy(model: VisionTransformer, data: Split, unit_stats: tuple[tuple[float, ...], tuple[float, ...]],
                   batch_size: int = 500) -> float | None:
    """Do the model's patch tokens mean something? The share of the patches that show something
    (:func:`fedmitr.training.foreground`) on which the class head, applied to the patch's own final
    token, names the image's class. None when no patch shows anything."""
    device, size = next(model.parameters()).device, model_input_size(model)
    patch = size // patch_grid(model)
    training = model.training
    model.eval()
    hits = count = 0
    for start in range(0, len(data), batch_size):
        x = fit_input(data.images[start:start + batch_size].to(device), size)
        y = data.labels[start:start + batch_size].to(device)
        fg = foreground(to_unit(x, unit_stats), patch)
        pred = token_logits(model, sparse_forward(model, x).tokens).argmax(-1)  # [B, N]
        hits += int(((pred == y.unsqueeze(1)) & fg).sum())
        count += int(fg.sum())
    model.train(training)
    return hits / count if count else None
