"""Stage 4: distil the client ensemble into one global ViT on the pool of synthetic images.

The student, the pool it learns from, the teacher's cache, the losses and one distillation step.
The rounds that interleave synthesis and distillation are in :mod:`fedmitr.server`.

A distillation step takes a batch of pool images and moves each by a random shift of up to
``shift_px`` (and a flip, where the data allows it). **Everything moves with the image**: the kept
patches of the view are the ones that hold the kept patches' pixels (:func:`~fedmitr.models.view_keep_idx`),
and each view patch's token target and weight are the area-weighted mix of the targets whose
pixels landed on it (:func:`~fedmitr.models.shift_patch_maps`), as Token Labeling moves its label
maps with a crop.

* class token: ``T^2 KL(softmax(f_E(v)/T) || softmax(s_cls(v)/T))`` where ``v`` is the *same view*
  for teacher and student: for sparse methods only the view's kept patches, because the ensemble
  labels a sparse image correctly on its kept patches but not on the stopped, noise-like ones.
* patch tokens (relabel methods): the aux head on each patch token learns that patch's target,
  ``beta * sum_i w_i SoftCE(target_i, aux(z_i)) / sum_i w_i``, on the kept patches of the same pass
  (``token_view = "same"``) or on every patch of one more, dense, student pass (``"full"``). A patch
  with weight 0 (a stopped patch that teaches nothing, a gated relabel) is left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedmitr.baselines import fedavg
from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset
from fedmitr.ensemble import Ensemble
from fedmitr.inversion import SyntheticBatch
from fedmitr.models import (Shifts, apply_shifts, build_model, gather_tokens, model_input_size, patch_grid,
                            sample_shifts, shift_patch_maps, sparse_forward, view_keep_idx)
from fedmitr.relabel import TokenTargets, keep_mask


class GlobalModel(nn.Module):
    """The student: a ViT of the client architecture plus an aux head on its patch tokens (as in
    LV-ViT). Predictions use the class-token head only, so ``vit`` alone is the model that is saved
    and shared. The aux head starts as a copy of the class head (for the default start, the
    clients' average head), so the patch tokens are read by a classifier that already means
    something."""

    def __init__(self, vit: VisionTransformer, num_classes: int):
        super().__init__()
        self.vit = vit
        self.aux_head = nn.Linear(vit.embed_dim, num_classes)
        if isinstance(vit.head, nn.Linear) and vit.head.out_features == num_classes:
            self.aux_head.load_state_dict(vit.head.state_dict())

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None):
        out = sparse_forward(self.vit, images, keep_idx)
        return out.logits, self.aux_head(out.tokens)


def new_student(cfg: RunConfig, dataset: ImageDataset, ensemble: Ensemble, device: torch.device) -> GlobalModel:
    """The global model before distillation: the plain average of the clients (``distill.init =
    "fedavg"``, as FedDF starts) or a fresh initialisation (``"fresh"``), plus the aux head."""
    vit = build_model(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    if cfg.distill.init == "fedavg":
        vit.load_state_dict(fedavg(ensemble.models).state_dict())
    return GlobalModel(vit, dataset.num_classes).to(device)


@dataclass
class Pool:
    """Every synthetic image so far, with what distillation needs. Tensors live on the device."""

    images: list[torch.Tensor] = field(default_factory=list)  # [B, C, H, W] per round
    keep_idx: list[torch.Tensor] = field(default_factory=list)  # [B, M] kept patches
    keep_mask: list[torch.Tensor] = field(default_factory=list)  # [B, N] bool, the same as a mask
    targets: list[torch.Tensor] = field(default_factory=list)  # [B, N, L] token targets (relabel only)
    weights: list[torch.Tensor] = field(default_factory=list)  # [B, N] token weights (relabel only)

    def add(self, batch: SyntheticBatch, targets: TokenTargets | None) -> None:
        self.images.append(batch.images)
        self.keep_idx.append(batch.keep_idx)
        self.keep_mask.append(keep_mask(batch, batch.stop_step.shape[1]))
        if targets is not None:
            self.targets.append(targets.targets)
            self.weights.append(targets.weights)

    def __len__(self) -> int:
        return sum(x.shape[0] for x in self.images)

    def tensors(self) -> "PoolTensors":
        return PoolTensors(images=torch.cat(self.images), keep_mask=torch.cat(self.keep_mask),
                           kept=int(self.keep_idx[-1].shape[1]),
                           targets=torch.cat(self.targets) if self.targets else None,
                           weights=torch.cat(self.weights) if self.weights else None)


@dataclass(kw_only=True)
class PoolTensors:
    images: torch.Tensor  # [P, C, H, W]
    keep_mask: torch.Tensor  # [P, N] bool
    kept: int  # M, kept patches per image (the same for every image of a run)
    targets: torch.Tensor | None  # [P, N, L]
    weights: torch.Tensor | None  # [P, N]

    def batch(self, idx: torch.Tensor) -> "PoolTensors":
        return PoolTensors(images=self.images[idx], keep_mask=self.keep_mask[idx], kept=self.kept,
                           targets=None if self.targets is None else self.targets[idx],
                           weights=None if self.weights is None else self.weights[idx])

    @property
    def sparse(self) -> bool:
        return self.kept < self.keep_mask.shape[1]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True) * t * t


def _views(images: torch.Tensor, keep: torch.Tensor | None, shifts: Shifts, kept: int, patch: int
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The shifted images and their kept patches (None: every patch)."""
    view = apply_shifts(images, shifts)
    return view, (None if keep is None else view_keep_idx(keep, shifts, patch, kept))


class TeacherCache:
    """The ensemble's logits of every view a distillation step can draw, computed once per image.

    The ensemble is fixed, so its logits for a pool image under a given shift (and flip, and so
    kept view) never change. With ``shift_px`` s there are (2s+1)^2 shifts (twice that with flips):
    when an image enters the pool its logits for all of them are computed in one batch per view,
    instead of once per step that draws it. Beyond ``max_views`` views per image (the gpu preset's
    16 px shifts: 1,089) nothing is cached and the steps compute the teacher as before.
    """

    def __init__(self, ensemble: Ensemble, *, shift_px: int, flip: bool, max_views: int = 50):
        self.ensemble, self.shift_px, self.flip = ensemble, shift_px, flip
        side = 2 * shift_px + 1
        self.num_views = side * side * (2 if flip else 1)
        self.enabled = self.num_views <= max_views
        self.table: torch.Tensor | None = None  # [P, V, L]: pool image x view

    def view_index(self, shifts: Shifts, b: int) -> torch.Tensor:
        """Which of the cached views each of ``b`` images drew."""
        side = 2 * self.shift_px + 1
        zero = torch.zeros(b, dtype=torch.long)
        dy = shifts.dy.cpu() if shifts.dy is not None else zero
        dx = shifts.dx.cpu() if shifts.dx is not None else zero
        flip = shifts.flip.cpu().long() if shifts.flip is not None else zero
        return (flip * side + dy) * side + dx

    @torch.no_grad()
    def add(self, images: torch.Tensor, keep: torch.Tensor | None, *, kept: int, patch: int) -> None:
        """Cache the logits of every view of a new round's images (``keep``: their keep mask, or None)."""
        if not self.enabled:
            return
        b, side = images.shape[0], 2 * self.shift_px + 1
        out = []
        for v in range(self.num_views):
            flip, rest = divmod(v, side * side)
            dy, dx = divmod(rest, side)
            full = torch.full((b,), 0, dtype=torch.long)
            shifts = Shifts(dy=full + dy if self.shift_px else None, dx=full + dx if self.shift_px else None,
                            flip=torch.full((b,), bool(flip)) if self.flip else None, max_shift=self.shift_px)
            view, keep_idx = _views(images, keep, shifts, kept, patch)
            out.append(self.ensemble(view, keep_idx).logits)
        new = torch.stack(out, dim=1)  # [B, V, L]
        self.table = new if self.table is None else torch.cat([self.table, new])

    def lookup(self, idx: torch.Tensor, shifts: Shifts) -> torch.Tensor:
        """``[B, L]``: the cached logits of pool images ``idx`` under ``shifts``."""
        return self.table[idx, self.view_index(shifts, len(idx)).to(self.table.device)]


def distill_step(student: GlobalModel, ensemble: Ensemble, pool: PoolTensors, idx: torch.Tensor, *,
                 optimizer: torch.optim.Optimizer, cfg: RunConfig, generator: torch.Generator,
                 allow_flip: bool = False, cache: TeacherCache | None = None,
                 before_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One distillation step on the pool images ``idx``; returns the named losses.

    ``cache``: the teacher's logits of every view, when they were computed once (same numbers).
    ``before_step`` runs between the backward pass and the optimiser step (data-parallel processes
    average their gradients there).
    """
    k = cfg.distill
    batch = pool.batch(idx)
    patch = model_input_size(student.vit) // patch_grid(student.vit)
    shifts = sample_shifts(batch.images.shape[0], k.shift_px, generator, flip=k.flip and allow_flip,
                           device=batch.images.device)
    kept_view = pool.sparse and k.view == "kept"  # else teacher and student see every patch
    view, keep_idx = _views(batch.images, batch.keep_mask if kept_view else None, shifts, pool.kept, patch)
    if cache is not None and cache.enabled:
        teacher_logits = cache.lookup(idx, shifts)
    else:
        with torch.no_grad():
            teacher_logits = ensemble(view, keep_idx).logits
    student_logits, aux_logits = student(view, keep_idx)
    loss_kd = kd_loss(student_logits.float(), teacher_logits, k.temperature)
    losses = {"kd": float(loss_kd.detach())}
    loss = loss_kd
    if batch.targets is not None:
        # The targets move with the image: each view patch mixes the targets whose pixels it holds.
        weights = shift_patch_maps(batch.weights.unsqueeze(1), shifts, patch)[:, 0]  # [B, N]
        mass = shift_patch_maps((batch.targets * batch.weights.unsqueeze(-1)).transpose(1, 2), shifts, patch)
        targets = mass.transpose(1, 2) / weights.clamp_min(1e-12).unsqueeze(-1)  # [B, N, L]
        if keep_idx is not None and k.token_view == "same":  # the kept patches' tokens of the same pass
            targets, weights = gather_tokens(targets, keep_idx), torch.gather(weights, 1, keep_idx)
        elif keep_idx is not None:  # every patch: one more (dense) student pass
            _, aux_logits = student(view, None)
        per_patch = -(targets * F.log_softmax(aux_logits.float(), dim=-1)).sum(-1)  # soft cross-entropy
        loss_tok = (weights * per_patch).sum() / weights.sum().clamp_min(1e-12)
        loss = loss + k.token_weight * loss_tok
        losses["token"] = float(loss_tok.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    losses["total"] = float(loss.detach())
    return losses
