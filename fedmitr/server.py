"""The server side of one-shot FL: what it does with the K trained client models it received.

Every method of :data:`fedmitr.methods.METHODS` runs through :func:`fedmitr.methods.run_method` on
a :class:`ServerContext` and returns a :class:`MethodResult`. The registry imports this module, never
the other way round. The inversion family (:class:`fedmitr.methods.Rounds`) builds one global
ViT from synthetic images, in rounds; :func:`run_rounds` reads top to bottom as the method does it:

1. **invert** the ensemble into a batch of synthetic images (the method's ``inversion`` stage);
2. **targets**: score each patch's information density and H, and (relabel methods) give every
   patch its own target (the ``targets`` stage);
3. **distil**: add the batch to the pool and take distillation steps over it (``distillation``);
4. **evaluate** the global model on the test split: one point of the accuracy curve.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset
from fedmitr.distill import Pool, TeacherCache, gradient_variance, new_student, readouts
from fedmitr.ensemble import Ensemble
from fedmitr.events import EventHandler, Metric, Progress, SyntheticRound, ignore
from fedmitr.inversion import SyntheticBatch, gradient_spread, stop_iterations
from fedmitr.relabel import PatchScores, TokenTargets, add_counts, diagnostic_counts, diagnostics, keep_mask
from fedmitr.runtime import Workers
from fedmitr.synthetic import SyntheticSet

if TYPE_CHECKING:  # the registry imports this module, never the other way round
    from fedmitr.methods import Rounds


@dataclass
class ServerContext:
    """What the server holds after the one round of communication: the clients' models as one
    ensemble, and the test split it reports on (the server's own held-out data; it never sees
    training data)."""

    cfg: RunConfig
    dataset: ImageDataset
    ensemble: Ensemble
    device: torch.device
    _: KW_ONLY
    on_event: EventHandler = ignore
    workers: Workers = Workers()  # the processes that share the server's work (torchrun / accelerate launch)

    def with_images_per_round(self, images: int) -> "ServerContext":
        """The same context with another inversion batch size (the benchmark's equal-time runs)."""
        inversion = dataclasses.replace(self.cfg.inversion, images_per_round=images)
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, inversion=inversion))


@dataclass
class MethodResult:
    name: str
    accuracy: float  # test accuracy of the method's model, 0..1
    _: KW_ONLY
    seconds: float = 0.0  # wall-clock time of the server-side method
    model: VisionTransformer | None = None  # the single global model, if the method makes one
    curve: list[float] = field(default_factory=list)  # test accuracy after each round (inversion methods)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # inversion / relabel / distill / evaluate
    synthetic_images: int = 0  # images in the final pool
    inversion_iterations: int = 0  # Adam steps per synthetic batch
    active_patches: int = 0  # patches still optimised at the end of the last batch's inversion
    patches: int = 0  # patches per image
    final_losses: dict[str, float] = field(default_factory=dict)  # named losses of the last distillation step
    relabel: dict[str, Any] = field(default_factory=dict)  # what the patches were taught (fedmitr.relabel.diagnostics)
    synthetic: SyntheticSet | None = None  # every synthetic image, for the run directory (not in metrics.json)
    # The student read every way on the evaluation split (fedmitr.distill.readouts): class token alone,
    # aux head alone (max and mean over tokens), and Token Labeling's vote for a grid of lambdas.
    readouts: dict[str, Any] = field(default_factory=dict)
    vote: float = 0.0  # lambda of the vote that `accuracy` and `curve` use (0: the class token alone)
    aux_head: torch.nn.Linear | None = None  # the student's aux head, saved beside the model for the vote
    # The paper's two gradient claims: the student's minibatch gradient variance with and without token
    # targets (fedmitr.distill.gradient_variance), and the inversion's pixel-gradient spread.
    gradient: dict[str, Any] = field(default_factory=dict)
    client_weights: list[list[float]] = field(default_factory=list)  # the ensemble's learned weights after each round

    def to_dict(self) -> dict[str, Any]:
        """The method's entry in ``metrics.json``."""
        out: dict[str, Any] = {"accuracy": self.accuracy, "seconds": self.seconds}
        if self.curve:
            out.update(curve=self.curve, stage_seconds=self.stage_seconds, synthetic_images=self.synthetic_images,
                       inversion_iterations=self.inversion_iterations, active_patches=self.active_patches,
                       patches=self.patches, final_losses=self.final_losses, relabel=self.relabel)
        if self.readouts:
            out.update(vote=self.vote, cls_accuracy=self.readouts["cls"],
                       aux_accuracy={"max": self.readouts["aux_max"], "mean": self.readouts["aux_mean"]},
                       vote_accuracy=self.readouts["vote"])
        if self.gradient:
            out["gradient_variance"] = self.gradient
        if self.client_weights:
            out["client_weights"] = self.client_weights
        return out


def run_rounds(method: Rounds, ctx: ServerContext) -> MethodResult:
    """Interleaved synthesis and distillation for an inversion method (see the module docstring)."""
    cfg, dataset, ensemble, device, w = method.configure(ctx.cfg), ctx.dataset, ctx.ensemble, ctx.device, ctx.workers
    inv = cfg.inversion
    # Stopped patches become the fill (None: they keep their noise); "blank" token targets are the
    # ensemble's label of an image of it (of the data's background when there is no fill).
    fill_value = None if not method.sparse or inv.stopped_fill == "noise" else dataset.fill_value(inv.stopped_fill)
    background = dataset.fill_value("background") if fill_value is None else fill_value
    kept_view = method.sparse and cfg.distill.view == "kept"  # teacher and student see the kept patches only
    rounds, steps = cfg.distill.rounds, cfg.distill.steps_per_round
    # Process 0 draws exactly what a single process draws; the others their own streams.
    generator = torch.Generator().manual_seed(cfg.seed + 17 + 7919 * w.rank)
    torch.manual_seed(cfg.seed + 17)  # the student's aux head: the same on every process
    student = new_student(cfg, dataset, ensemble, device)
    vote = cfg.distill.vote if method.relabel else 0.0  # an aux head never taught has no vote
    aux = list(student.aux_head.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in student.parameters() if all(p is not a for a in aux)]},
         {"params": aux, "lr": cfg.distill.lr * cfg.distill.aux_lr_scale}],
        lr=cfg.distill.lr, weight_decay=cfg.distill.weight_decay)
    average = student_average(student.vit, cfg.distill.ema)
    pool = Pool(pixel_bounds=dataset.pixel_bounds())
    patch = ensemble.input_size // ensemble.grid
    cache = TeacherCache(ensemble, shift_px=cfg.distill.shift_px, flip=cfg.distill.flip and dataset.allow_flip) \
        if cfg.distill.teacher_cache else None
    counts: dict[str, Any] | None = None
    curve: list[float] = []
    seconds = {"inversion": 0.0, "relabel": 0.0, "distill": 0.0, "evaluate": 0.0}
    progress = _progress(method.name, rounds * (method.inversion.iterations(cfg) + steps), ctx.on_event)
    client_weights: list[list[float]] = []
    losses: dict[str, float] = {}
    rounds_made: list[SyntheticRound] = []
    inversions: list[SyntheticBatch] = []

    for r in range(1, rounds + 1):
        # 1. Invert: a balanced batch of labels, continuing the class cycle of earlier rounds
        # (each process inverts its share of them).
        labels = (torch.arange(inv.images_per_round) + (r - 1) * inv.images_per_round) % dataset.num_classes
        synth_steps = method.inversion.iterations(cfg)
        batch = method.inversion(
            ensemble, labels[w.share(len(labels))], cfg, pixel_bounds=dataset.pixel_bounds(), generator=generator,
            allow_flip=dataset.allow_flip, student=student.vit, fill_value=fill_value,
            on_step=lambda it, values: progress(f"round {r}/{rounds}: {method.inversion.word} {it}/{synth_steps}", values))
        seconds["inversion"] += batch.seconds
        inversions.append(batch)

        # 2. Targets: information density of every patch, H, and (relabel methods) per-patch targets.
        t0 = time.perf_counter()
        scores, targets = method.targets(
            ensemble, batch, cfg, num_classes=dataset.num_classes, background=background,
            on_chunk=lambda i, n: progress(f"round {r}/{rounds}: relabel {i}/{n}", {}, advance=False))
        if w.size > 1:  # every process gets the whole round: the same pool everywhere
            batch, scores, targets = _gather_round(w, batch, scores, targets, device)
        counts = add_counts(counts, diagnostic_counts(batch, scores, targets, dataset.num_classes))
        seconds["relabel"] += time.perf_counter() - t0
        made = round_event(method.name, r, batch, scores, targets, dataset=dataset)
        rounds_made.append(made)
        ctx.on_event(made)

        # 3. Distil over the whole pool so far.
        t0 = time.perf_counter()
        pool.add(batch, targets)
        tensors = pool.tensors()
        if method.teacher is not None:  # the ensemble itself learns from the pool (Co-Boosting's weights)
            ensemble = method.teacher(ensemble, tensors.images, tensors.labels, cfg, round_index=r, generator=generator)
            client_weights.append([] if ensemble.weights is None else [float(v) for v in ensemble.weights])
        if cache is not None:
            cache.add(batch.images, keep_mask(batch, batch.stop_step.shape[1]) if kept_view else None,
                      kept=batch.keep_idx.shape[1], patch=patch)
        student.train()
        # Each process a share of every batch; averaged gradients keep the students identical.
        per_process = -(-min(cfg.distill.batch_size, len(pool)) // w.size)
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(pool), (per_process,), generator=generator).to(device)
            losses = method.distillation(
                student, ensemble, tensors, idx, optimizer=optimizer, cfg=cfg, generator=generator,
                allow_flip=dataset.allow_flip, cache=cache, before_step=lambda: w.average_gradients(student))
            if average is not None:
                average.update_parameters(student.vit)
            progress(f"round {r}/{rounds}: distillation {step}/{steps}", losses)
        seconds["distill"] += time.perf_counter() - t0

        # 4. Evaluate: one point of the accuracy curve.
        t0 = time.perf_counter()
        model = student.vit if average is None else average.module
        curve.append(readouts(model, student.aux_head, dataset.test, votes=(vote,))["vote"][f"{vote:g}"]
                     if vote else Ensemble([model]).evaluate(dataset.test))
        seconds["evaluate"] += time.perf_counter() - t0
        ctx.on_event(Metric("accuracy", curve[-1], method.name, step=r))

    model = (student.vit if average is None else average.module).eval()
    t0 = time.perf_counter()
    read = readouts(model, student.aux_head, dataset.test) if method.relabel else {}
    gradient: dict[str, Any] = {}
    if cfg.distill.gradient_probe and w.size == 1:
        student.train()
        gradient["distill"] = gradient_variance(student, ensemble, tensors, cfg=cfg, minibatches=cfg.distill.gradient_probe,
                                                seed=cfg.seed + 29, allow_flip=dataset.allow_flip, cache=cache)
        student.eval()
    spread = gradient_spread(inversions, stop_iterations(inv))
    if spread is not None:
        gradient["inversion"] = spread
    seconds["evaluate"] += time.perf_counter() - t0
    return MethodResult(
        method.name, curve[-1], model=model, curve=curve, stage_seconds=seconds, readouts=read, vote=vote,
        aux_head=student.aux_head.eval() if method.relabel else None, gradient=gradient, client_weights=client_weights,
        synthetic_images=len(pool), inversion_iterations=inv.iterations,
        active_patches=int(pool.keep_idx[-1].shape[1]), patches=int(batch.stop_step.shape[1]), final_losses=losses,
        relabel=diagnostics(counts), synthetic=SyntheticSet.from_rounds(rounds_made),
    )


def student_average(vit: VisionTransformer, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the student's weights, updated after every distillation
    step (``decay`` 0: none). It is what each round evaluates and what the method returns: the
    student's last steps on a small synthetic pool swing, and the average steadies them."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(vit, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _gather_round(w: Workers, batch: SyntheticBatch, scores: PatchScores, targets: TokenTargets | None,
                  device: torch.device) -> tuple[SyntheticBatch, PatchScores, TokenTargets | None]:
    """Every process's share of a round, concatenated in rank order, on every process."""
    mine = (batch.images, batch.labels, batch.keep_idx, batch.stop_step, scores.density, scores.high_mask,
            None if targets is None else targets.tensors())
    parts = w.gather(_to_cpu(mine))

    def cat(i: int) -> torch.Tensor:
        return torch.cat([p[i] for p in parts]).to(device)

    batch = SyntheticBatch(images=cat(0), labels=cat(1), keep_idx=cat(2), stop_step=cat(3),
                           iterations=batch.iterations, seconds=batch.seconds)
    scores = PatchScores(density=cat(4), high_mask=cat(5))
    if targets is not None:
        names = [f.name for f in dataclasses.fields(TokenTargets)]
        targets = TokenTargets(**{name: torch.cat([p[6][j] for p in parts]).to(device) for j, name in enumerate(names)})
    return batch, scores, targets


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, tuple):
        return tuple(_to_cpu(o) for o in obj)
    return obj


def _progress(stage: str, total: int, on_event: EventHandler) -> Callable[..., None]:
    """A callback that reports one step of ``stage`` each time it is called: every inversion
    iteration and distillation step (and, without advancing, every chunk of a long relabel), so a
    consumer can stop a run between any two of them."""
    done = 0

    def step(message: str, values: dict[str, float], advance: bool = True) -> None:
        nonlocal done
        done += advance
        on_event(Progress(stage, done, total, message, values))

    return step


def round_event(method: str, r: int, batch: SyntheticBatch, scores: PatchScores, targets: TokenTargets | None, *,
                dataset: ImageDataset) -> SyntheticRound:
    """Everything the app draws of one round: images, stops, density, H and each patch's label."""
    n = batch.stop_step.shape[1]
    if targets is None:
        token_labels = batch.labels.unsqueeze(1).expand(-1, n)
        relabelled = torch.zeros_like(scores.high_mask)
        token_weight = token_source = None
    else:
        token_labels = targets.targets.argmax(-1)
        relabelled = targets.relabelled
        token_weight = targets.weights.cpu().numpy().astype(np.float16)
        token_source = targets.source.cpu().numpy()
    unit = dataset.to_unit(batch.images).cpu().numpy()
    return SyntheticRound(
        method=method, round=r,
        images=(np.clip(unit, 0, 1) * 255 + 0.5).astype(np.uint8),  # as the run directory keeps them
        labels=batch.labels.cpu().numpy(),
        stop_step=batch.stop_step.cpu().numpy(),
        density=scores.density.cpu().numpy(),
        high_mask=scores.high_mask.cpu().numpy(),
        token_labels=token_labels.cpu().numpy(),
        token_relabelled=relabelled.cpu().numpy(),
        grid=int(round(n ** 0.5)),
        iterations=batch.iterations,
        token_weight=token_weight,
        token_source=token_source,
    )
