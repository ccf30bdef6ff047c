"""Stage 4: distil the client ensemble into one global ViT on synthetic images, in rounds.

Each round: synthesise a batch (stage 2), relabel its patches (stage 3), add it to the pool, take
``steps_per_round`` distillation steps over the pool, and evaluate the global model on the test
split (one point of the accuracy curve).

A distillation step, for a batch of pool images shifted by a random +-``shift_px``:

* class token: ``T^2 KL(softmax(f_E(v)/T) || softmax(s_cls(v)/T))`` where ``v`` is the *same view*
  for teacher and student. For sparse methods ``v`` keeps only the image's active patches (those
  the inversion optimised), because the ensemble labels a sparse image correctly on its active
  patches but not on the stopped, noise-like ones (METHOD.md, prototype lessons).
* patch tokens (relabel methods): the student also sees every patch, and its aux head on each
  patch token learns that patch's target: ``beta * mean_i SoftCE(target_i, aux(z_i))``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedmitr.baselines import fedavg
from fedmitr.clients import evaluate
from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset
from fedmitr.events import EventHandler, Metric, Progress, SyntheticRound, ignore
from fedmitr.inversion import SyntheticBatch, ensemble_forward, invert
from fedmitr.methods import MethodSpec
from fedmitr.models import build_model, random_shift, sparse_forward
from fedmitr.relabel import TokenTargets, relabel


class GlobalModel(nn.Module):
    """The student: a fresh ViT of the client architecture plus an aux head on its patch tokens
    (as in LV-ViT). Predictions use the class-token head only, so ``vit`` alone is the model that
    is saved and shared."""

    def __init__(self, vit: VisionTransformer, num_classes: int):
        super().__init__()
        self.vit = vit
        self.aux_head = nn.Linear(vit.embed_dim, num_classes)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None):
        out = sparse_forward(self.vit, images, keep_idx)
        return out.logits, self.aux_head(out.tokens)


@dataclass
class Pool:
    """Every synthetic image so far, with what distillation needs. Tensors live on the device."""

    images: list[torch.Tensor] = field(default_factory=list)  # [B, C, H, W] per round
    keep_idx: list[torch.Tensor] = field(default_factory=list)  # [B, M] active patches
    targets: list[torch.Tensor] = field(default_factory=list)  # [B, N, L] token targets (relabel only)

    def add(self, batch: SyntheticBatch, targets: TokenTargets | None) -> None:
        self.images.append(batch.images)
        self.keep_idx.append(batch.keep_idx)
        if targets is not None:
            self.targets.append(targets.targets)

    def __len__(self) -> int:
        return sum(x.shape[0] for x in self.images)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return (torch.cat(self.images), torch.cat(self.keep_idx),
                torch.cat(self.targets) if self.targets else None)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True) * t * t


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over all leading dims of ``-sum_l target_l log softmax(logits)_l``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def distill_step(student: GlobalModel, teachers: list[VisionTransformer], images: torch.Tensor,
                 keep_idx: torch.Tensor | None, targets: torch.Tensor | None, optimizer: torch.optim.Optimizer,
                 cfg: RunConfig, generator: torch.Generator) -> dict[str, float]:
    """One distillation step on a batch of pool images; returns the named losses."""
    k = cfg.distill
    view = random_shift(images, k.shift_px, generator)
    with torch.no_grad():
        teacher_logits, _ = ensemble_forward(teachers, view, keep_idx)
    student_logits, aux_logits = student(view, keep_idx)
    loss_kd = kd_loss(student_logits.float(), teacher_logits, k.temperature)
    losses = {"kd": float(loss_kd.detach())}
    loss = loss_kd
    if targets is not None:
        if keep_idx is not None:  # the token loss needs every patch: one more (dense) student pass
            _, aux_logits = student(view, None)
        loss_tok = soft_cross_entropy(aux_logits.float(), targets)
        loss = loss + k.token_weight * loss_tok
        losses["token"] = float(loss_tok.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses["total"] = float(loss.detach())
    return losses


def run_inversion_method(spec: MethodSpec, cfg: RunConfig, dataset: ImageDataset, teachers: list[VisionTransformer],
                         device: torch.device, on_event: EventHandler = ignore,
                         images_per_round: int | None = None) -> dict:
    """Interleaved synthesis + distillation for one method. Returns the global model and its record.

    ``images_per_round`` overrides the config (the benchmark's equal-wall-clock comparison gives
    sparse methods more images for the same inversion time).
    """
    inv = cfg.inversion
    if images_per_round is not None:
        inv = replace(inv, images_per_round=images_per_round)
    generator = torch.Generator().manual_seed(cfg.seed + 17)
    torch.manual_seed(cfg.seed + 17)
    vit = build_model(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    if cfg.distill.init == "fedavg":
        vit.load_state_dict(fedavg(teachers).state_dict())
    student = GlobalModel(vit, dataset.num_classes).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.distill.lr, weight_decay=cfg.distill.weight_decay)
    pool = Pool()
    curve: list[float] = []
    seconds = {"inversion": 0.0, "relabel": 0.0, "distill": 0.0, "evaluate": 0.0}
    rounds = cfg.distill.rounds
    total_steps = rounds * (inv.iterations + cfg.distill.steps_per_round)
    done = 0
    last_losses: dict[str, float] = {}

    for r in range(1, rounds + 1):
        labels = (torch.arange(inv.images_per_round) + (r - 1) * inv.images_per_round) % dataset.num_classes

        def on_step(it: int, losses: dict[str, float]) -> None:
            if it % 10 == 0 or it == inv.iterations:
                on_event(Progress(spec.name, done + it, total_steps,
                                  f"round {r}/{rounds}: inversion {it}/{inv.iterations}", losses))

        batch = invert(teachers, labels, inv, dataset.pixel_bounds(), spec.sparse, generator,
                       high_ratio=cfg.relabel.high_ratio, allow_flip=dataset.allow_flip, on_step=on_step,
                       student=student.vit)
        done += inv.iterations
        seconds["inversion"] += batch.seconds
        t0 = time.perf_counter()
        targets = relabel(teachers, batch, cfg.relabel, dataset.num_classes) if spec.relabel else None
        seconds["relabel"] += time.perf_counter() - t0
        pool.add(batch, targets)
        on_event(_round_event(spec, r, batch, targets, dataset))

        t0 = time.perf_counter()
        images, keep_idx, token_targets = pool.tensors()
        student.train()
        for step in range(1, cfg.distill.steps_per_round + 1):
            idx = torch.randint(0, images.shape[0], (min(cfg.distill.batch_size, images.shape[0]),),
                                generator=generator).to(device)
            last_losses = distill_step(
                student, teachers, images[idx], keep_idx[idx] if spec.sparse else None,
                token_targets[idx] if token_targets is not None else None, optimizer, cfg, generator)
            if step % 10 == 0 or step == cfg.distill.steps_per_round:
                on_event(Progress(spec.name, done + step, total_steps,
                                  f"round {r}/{rounds}: distillation {step}/{cfg.distill.steps_per_round}",
                                  last_losses))
        done += cfg.distill.steps_per_round
        seconds["distill"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        acc = evaluate(student.vit, dataset.test)
        seconds["evaluate"] += time.perf_counter() - t0
        curve.append(acc)
        on_event(Metric("accuracy", acc, spec.name, step=r))

    student.vit.eval()
    return {
        "model": student.vit,
        "curve": curve,
        "extra": {
            "stage_seconds": seconds,
            "synthetic_images": len(pool),
            "inversion_iterations": inv.iterations,
            "active_patches": int(pool.keep_idx[-1].shape[1]),
            "patches": int(batch.stop_step.shape[1]),
            "final_losses": last_losses,
        },
    }


def _round_event(spec: MethodSpec, r: int, batch: SyntheticBatch, targets: TokenTargets | None,
                 dataset: ImageDataset) -> SyntheticRound:
    n = batch.stop_step.shape[1]
    if targets is None:
        token_labels = batch.labels.unsqueeze(1).expand(-1, n)
        relabelled = torch.zeros_like(batch.high_mask)
    else:
        token_labels = targets.targets.argmax(-1)
        relabelled = targets.relabelled
    return SyntheticRound(
        method=spec.name, round=r,
        images=dataset.to_unit(batch.images).cpu().numpy(),
        labels=batch.labels.cpu().numpy(),
        stop_step=batch.stop_step.cpu().numpy(),
        density=batch.density.cpu().numpy(),
        high_mask=batch.high_mask.cpu().numpy(),
        token_labels=token_labels.cpu().numpy(),
        token_relabelled=relabelled.cpu().numpy(),
        grid=int(round(n ** 0.5)),
        iterations=batch.iterations,
    )
