"""Stage 4: distil the client ensemble into one global ViT on the pool of synthetic images.

The student, the pool it learns from, the losses and one distillation step. The rounds that
interleave synthesis and distillation are in :mod:`fedmitr.server`.

A distillation step, for a batch of pool images shifted by a random +-``shift_px``:

* class token: ``T^2 KL(softmax(f_E(v)/T) || softmax(s_cls(v)/T))`` where ``v`` is the *same view*
  for teacher and student. For sparse methods ``v`` keeps only the image's active patches (those
  the inversion optimised), because the ensemble labels a sparse image correctly on its active
  patches but not on the stopped, noise-like ones (METHOD.md, prototype lessons).
* patch tokens (relabel methods): the aux head on each patch token learns that patch's target,
  ``beta * mean_i w_i SoftCE(target_i, aux(z_i))``, on every patch (``token_view = "full"``: one
  more, dense, student pass for sparse methods) or on the kept patches of the same pass
  (``"same"``). ``w_i`` is 1, or the relabel's confidence (``relabel.weighting``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer

from fedmitr.baselines import fedavg
from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset
from fedmitr.ensemble import Ensemble
from fedmitr.inversion import SyntheticBatch
from fedmitr.models import build_model, gather_tokens, patch_grid, random_shift, sparse_forward
from fedmitr.relabel import TokenTargets


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


def new_student(cfg: RunConfig, dataset: ImageDataset, ensemble: Ensemble, device: torch.device) -> GlobalModel:
    """The global model before distillation: the plain average of the clients (``distill.init =
    "fedavg"``, as FedDF starts) or a fresh initialisation (``"fresh"``), plus a fresh aux head."""
    vit = build_model(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    if cfg.distill.init == "fedavg":
        vit.load_state_dict(fedavg(ensemble.models).state_dict())
    return GlobalModel(vit, dataset.num_classes).to(device)


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


def distill_step(student: GlobalModel, ensemble: Ensemble, images: torch.Tensor, *,
                 keep_idx: torch.Tensor | None, targets: torch.Tensor | None, optimizer: torch.optim.Optimizer,
                 cfg: RunConfig, generator: torch.Generator,
                 before_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One distillation step on a batch of pool images; returns the named losses.

    ``keep_idx`` [B, M]: the patches each image kept (teacher and student see only those); None,
    or every patch, is the dense view. ``before_step`` runs between the backward pass and the
    optimiser step (data-parallel processes average their gradients there).
    """
    k = cfg.distill
    if keep_idx is not None and keep_idx.shape[1] == patch_grid(student.vit) ** 2:
        keep_idx = None  # every patch kept: the dense forward
    view = random_shift(images, k.shift_px, generator)
    with torch.no_grad():
        teacher_logits = ensemble(view, keep_idx).logits
    student_logits, aux_logits = student(view, keep_idx)
    loss_kd = kd_loss(student_logits.float(), teacher_logits, k.temperature)
    losses = {"kd": float(loss_kd.detach())}
    loss = loss_kd
    if targets is not None:
        if keep_idx is not None and k.token_view == "same":  # the kept patches' tokens of the same pass
            targets = gather_tokens(targets, keep_idx)
        elif keep_idx is not None:  # every patch: one more (dense) student pass
            _, aux_logits = student(view, None)
        # Mean over images and patches; a relabel weight is folded into its target (CE is linear in it).
        loss_tok = SoftTargetCrossEntropy()(aux_logits.float(), targets)
        loss = loss + k.token_weight * loss_tok
        losses["token"] = float(loss_tok.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    losses["total"] = float(loss.detach())
    return losses
