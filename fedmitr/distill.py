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
  With ``aux_detach`` the aux head reads stop-gradient tokens: the token loss trains it alone.
* **MixToken** (``mixtoken``, whole views only, Token Labeling's augmentation): with that
  probability a step swaps a random box of patches between each image and its partner (the batch
  reversed); each patch keeps its own token target, and the class token learns the ensemble's
  logits of the mixed image (``mixtoken_teacher = "mixed"``) or the two images' soft labels mixed
  by the box's area (``"area"``, from the teacher's cache).

:func:`readouts` reads the trained student every way (class token, aux head alone, Token
Labeling's vote ``cls + lambda * max_i aux(z_i)``); :func:`gradient_variance` measures the spread
of its minibatch gradients with and without the token loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedmitr.baselines import fedavg
from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset
from fedmitr.data import Split
from fedmitr.ensemble import Ensemble, accuracy
from fedmitr.inversion import SyntheticBatch
from fedmitr.models import (Shifts, apply_shifts, build_model, fit_input, gather_tokens, model_input_size,
                            patch_grid, sample_shifts, shift_patch_maps, sparse_forward, view_keep_idx)
from fedmitr.relabel import TokenTargets, keep_mask

# The vote weights every run reads its student with (metrics.json's ``readouts``), so that the
# vote's lambda can be chosen on validation from one run.
VOTE_GRID = (0.25, 0.5, 1.0, 2.0)


class GlobalModel(nn.Module):
    """The student: a ViT of the client architecture plus an aux head on its patch tokens (as in
    LV-ViT). The aux head starts as a copy of the class head (for the default start, the clients'
    average head), so the patch tokens are read by a classifier that already means something.
    ``aux_detach``: the aux head reads stop-gradient patch features, so the token loss trains it
    without moving the backbone. ``vit`` alone is the timm model that is shared; the aux head is
    saved beside it for Token Labeling's vote (:func:`vote_logits`)."""

    def __init__(self, vit: VisionTransformer, num_classes: int, *, aux_detach: bool = False):
        super().__init__()
        self.vit = vit
        self.aux_detach = aux_detach
        self.aux_head = nn.Linear(vit.embed_dim, num_classes)
        if isinstance(vit.head, nn.Linear) and vit.head.out_features == num_classes:
            self.aux_head.load_state_dict(vit.head.state_dict())

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None):
        out = sparse_forward(self.vit, images, keep_idx)
        tokens = out.tokens.detach() if self.aux_detach else out.tokens
        return out.logits, self.aux_head(tokens)


def new_student(cfg: RunConfig, dataset: ImageDataset, ensemble: Ensemble, device: torch.device) -> GlobalModel:
    """The global model before distillation: the plain average of the clients (``distill.init =
    "fedavg"``, as FedDF starts) or a fresh initialisation (``"fresh"``), plus the aux head."""
    vit = build_model(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    if cfg.distill.init == "fedavg":
        vit.load_state_dict(fedavg(ensemble.models).state_dict())
    return GlobalModel(vit, dataset.num_classes, aux_detach=cfg.distill.aux_detach).to(device)


@dataclass(kw_only=True)
class Pool:
    """Every synthetic image so far, with what distillation needs. Tensors live on the device."""

    images: list[torch.Tensor] = field(default_factory=list)  # [B, C, H, W] per round
    keep_idx: list[torch.Tensor] = field(default_factory=list)  # [B, M] kept patches
    keep_mask: list[torch.Tensor] = field(default_factory=list)  # [B, N] bool, the same as a mask
    targets: list[torch.Tensor] = field(default_factory=list)  # [B, N, L] token targets (relabel only)
    weights: list[torch.Tensor] = field(default_factory=list)  # [B, N] token weights (relabel only)
    labels: list[torch.Tensor] = field(default_factory=list)  # [B] the class each image was made for
    pixel_bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # the valid normalised pixel range

    def add(self, batch: SyntheticBatch, targets: TokenTargets | None) -> None:
        self.images.append(batch.images)
        self.labels.append(batch.labels)
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
                           weights=torch.cat(self.weights) if self.weights else None,
                           labels=torch.cat(self.labels), pixel_bounds=self.pixel_bounds)


@dataclass(kw_only=True)
class PoolTensors:
    images: torch.Tensor  # [P, C, H, W]
    keep_mask: torch.Tensor  # [P, N] bool
    kept: int  # M, kept patches per image (the same for every image of a run)
    targets: torch.Tensor | None  # [P, N, L]
    weights: torch.Tensor | None  # [P, N]
    labels: torch.Tensor | None = None  # [P] the class each image was made for
    pixel_bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # the valid normalised pixel range

    def batch(self, idx: torch.Tensor) -> "PoolTensors":
        return PoolTensors(images=self.images[idx], keep_mask=self.keep_mask[idx], kept=self.kept,
                           targets=None if self.targets is None else self.targets[idx],
                           weights=None if self.weights is None else self.weights[idx],
                           labels=None if self.labels is None else self.labels[idx], pixel_bounds=self.pixel_bounds)

    @property
    def sparse(self) -> bool:
        return self.kept < self.keep_mask.shape[1]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch."""
    return kd_loss_log_probs(student_logits, _teacher_log_probs(teacher_logits, temperature), temperature)


def _views(images: torch.Tensor, keep: torch.Tensor | None, shifts: Shifts, kept: int, patch: int
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The shifted images and their kept patches (None: every patch)."""
    view = apply_shifts(images, shifts)
    return view, (None if keep is None else view_keep_idx(keep, shifts, patch, kept))


class TeacherCache:
    """The ensemble's logits of every view a distillation step can draw, computed once per image.

    The clients are fixed, so each client's logits for a pool image under a given shift (and flip,
    and so kept view) never change. With ``shift_px`` s there are (2s+1)^2 shifts (twice that with
    flips): when an image enters the pool every client's logits for all of them are computed in one
    batch per view, instead of once per step that draws it. The cache keeps the clients apart, so an
    ensemble whose client weights change between rounds (Co-Boosting's) still reads it: a lookup
    averages them with the weights of the ensemble it is given. Beyond ``max_views`` views per image
    (the gpu preset's 16 px shifts: 1,089) nothing is cached and the steps compute the teacher as
    before.
    """

    def __init__(self, ensemble: Ensemble, *, shift_px: int, flip: bool, max_views: int = 50):
        self.ensemble, self.shift_px, self.flip = ensemble, shift_px, flip
        side = 2 * shift_px + 1
        self.num_views = side * side * (2 if flip else 1)
        self.enabled = self.num_views <= max_views
        self.table: torch.Tensor | None = None  # [P, V, K, L]: pool image x view x client

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
            out.append(self.ensemble.client_logits(view, keep_idx).transpose(0, 1))  # [B, K, L]
        new = torch.stack(out, dim=1)  # [B, V, K, L]
        self.table = new if self.table is None else torch.cat([self.table, new])

    def lookup(self, idx: torch.Tensor, shifts: Shifts, ensemble: Ensemble | None = None) -> torch.Tensor:
        """``[B, L]``: the ensemble's logits of pool images ``idx`` under ``shifts``, its clients'
        cached logits averaged with ``ensemble``'s weights (None: the ensemble the cache was made with)."""
        rows = self.table[idx, self.view_index(shifts, len(idx)).to(self.table.device)]  # [B, K, L]
        return (ensemble or self.ensemble).combine(rows.transpose(0, 1))


@dataclass
class MixBox:
    """One MixToken draw for a batch: the patches ``[N]`` bool whose tokens come from the partner
    image (the batch reversed, as LV-ViT pairs them) and the share of the patches they are."""

    patches: torch.Tensor
    area: float


def sample_mixtoken(grid: int, generator: torch.Generator, device: torch.device) -> MixBox:
    """A random box of patches, as CutMix draws one: a mixing ratio ``lam ~ U(0, 1)``, a box of
    ``sqrt(1 - lam)`` of each side (at least one patch) at a uniform centre, clipped to the grid."""
    lam = float(torch.rand(1, generator=generator))
    side = max(1, int(round(grid * (1 - lam) ** 0.5)))
    cy, cx = (int(v) for v in torch.randint(0, grid, (2,), generator=generator))
    y0, y1 = max(cy - side // 2, 0), min(cy - side // 2 + side, grid)
    x0, x1 = max(cx - side // 2, 0), min(cx - side // 2 + side, grid)
    box = torch.zeros(grid, grid, dtype=torch.bool)
    box[y0:y1, x0:x1] = True
    box = box.flatten().to(device)
    return MixBox(patches=box, area=float(box.float().mean()))


def mix_images(images: torch.Tensor, box: MixBox, patch: int) -> torch.Tensor:
    """``[B, C, H, W]``: each image with the box's patches taken from its partner (the batch
    reversed). Swapping whole patches of pixels is exactly MixToken's swap of patch tokens after
    the patch embedding, which embeds each patch on its own."""
    grid = int(round(box.patches.numel() ** 0.5))
    pixels = box.patches.view(1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return torch.where(pixels, images.flip(0), images)


def _teacher_log_probs(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(teacher_logits.float() / temperature, dim=-1)


def step_losses(student: GlobalModel, ensemble: Ensemble, pool: PoolTensors, idx: torch.Tensor, *, cfg: RunConfig,
                generator: torch.Generator, allow_flip: bool = False, cache: TeacherCache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The class-token KD loss and the token loss (None without token targets) of one distillation
    batch, the pool images ``idx`` (see the module docstring), before any backward pass."""
    k = cfg.distill
    batch = pool.batch(idx)
    patch = model_input_size(student.vit) // patch_grid(student.vit)
    shifts = sample_shifts(batch.images.shape[0], k.shift_px, generator, flip=k.flip and allow_flip,
                           device=batch.images.device)
    kept_view = pool.sparse and k.view == "kept"  # else teacher and student see every patch
    view, keep_idx = _views(batch.images, batch.keep_mask if kept_view else None, shifts, pool.kept, patch)
    # MixToken (whole views only): a box of patches from the partner image, drawn with the step's generator.
    box = None
    if k.mixtoken > 0 and keep_idx is None and float(torch.rand(1, generator=generator)) < k.mixtoken:
        box = sample_mixtoken(patch_grid(student.vit), generator, view.device)
    use_cache = cache is not None and cache.enabled and not (box is not None and k.mixtoken_teacher == "mixed")
    if use_cache:
        teacher_logits = cache.lookup(idx, shifts, ensemble)
    else:
        with torch.no_grad():
            teacher_logits = ensemble(view if box is None else mix_images(view, box, patch), keep_idx).logits
    teacher = _teacher_log_probs(teacher_logits, k.temperature)
    if box is not None and use_cache:  # the class target mixed by area: (1 - r) p_a + r p_partner
        r = torch.tensor(box.area, device=teacher.device)
        teacher = torch.logaddexp(teacher + torch.log1p(-r), teacher.flip(0) + torch.log(r))
    if box is not None:
        view = mix_images(view, box, patch)
    student_logits, aux_logits = student(view, keep_idx)
    loss_kd = kd_loss_log_probs(student_logits.float(), teacher, k.temperature)
    if batch.targets is None:
        return loss_kd, None
    # The targets move with the image: each view patch mixes the targets whose pixels it holds.
    weights = shift_patch_maps(batch.weights.unsqueeze(1), shifts, patch)[:, 0]  # [B, N]
    mass = shift_patch_maps((batch.targets * batch.weights.unsqueeze(-1)).transpose(1, 2), shifts, patch)
    targets = mass.transpose(1, 2) / weights.clamp_min(1e-12).unsqueeze(-1)  # [B, N, L]
    if box is not None:  # each patch keeps its own target: the box's come from the partner
        targets = torch.where(box.patches.view(1, -1, 1), targets.flip(0), targets)
        weights = torch.where(box.patches.view(1, -1), weights.flip(0), weights)
    if keep_idx is not None and k.token_view == "same":  # the kept patches' tokens of the same pass
        targets, weights = gather_tokens(targets, keep_idx), torch.gather(weights, 1, keep_idx)
    elif keep_idx is not None:  # every patch: one more (dense) student pass
        _, aux_logits = student(view, None)
    per_patch = -(targets * F.log_softmax(aux_logits.float(), dim=-1)).sum(-1)  # soft cross-entropy
    loss_tok = (weights * per_patch).sum() / weights.sum().clamp_min(1e-12)
    return loss_kd, loss_tok


def kd_loss_log_probs(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(p_teacher || softmax(student/T))`` from the teacher's log-probabilities at ``T``."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), teacher_log_probs, reduction="batchmean",
                    log_target=True) * t * t


def distill_step(student: GlobalModel, ensemble: Ensemble, pool: PoolTensors, idx: torch.Tensor, *,
                 optimizer: torch.optim.Optimizer, cfg: RunConfig, generator: torch.Generator,
                 allow_flip: bool = False, cache: TeacherCache | None = None,
                 before_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One distillation step on the pool images ``idx``; returns the named losses.

    ``cache``: the teacher's logits of every view, when they were computed once (same numbers).
    ``before_step`` runs between the backward pass and the optimiser step (data-parallel processes
    average their gradients there).
    """
    loss_kd, loss_tok = step_losses(student, ensemble, pool, idx, cfg=cfg, generator=generator,
                                    allow_flip=allow_flip, cache=cache)
    losses = {"kd": float(loss_kd.detach())}
    loss = loss_kd
    if loss_tok is not None:
        loss = loss + cfg.distill.token_weight * loss_tok
        losses["token"] = float(loss_tok.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    losses["total"] = float(loss.detach())
    return losses


def gradient_variance(student: GlobalModel, ensemble: Ensemble, pool: PoolTensors, *, cfg: RunConfig,
                      minibatches: int, seed: int, allow_flip: bool = False,
                      cache: TeacherCache | None = None) -> dict[str, dict[str, float]]:
    """The spread of the student's minibatch gradients on the final pool, over the backbone's
    (``student.vit``'s) parameters, for the class-token KD loss alone and (with token targets) for
    KD + beta * token loss: the same ``minibatches`` draws for both, from a generator of its own
    (the run's draws are untouched).

    Each entry: ``variance`` = mean_i ||g_i - g_mean||^2, ``relative`` = that over ||g_mean||^2
    (scale-free: the loss's size does not count), and ``mean_norm`` = mean_i ||g_i||.
    """
    params = [p for p in student.vit.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    size = min(cfg.distill.batch_size, len(pool.images))
    grads: dict[str, list[torch.Tensor]] = {"kd": []}
    for _ in range(minibatches):
        idx = torch.randint(0, len(pool.images), (size,), generator=generator).to(pool.images.device)
        loss_kd, loss_tok = step_losses(student, ensemble, pool, idx, cfg=cfg, generator=generator,
                                        allow_flip=allow_flip, cache=cache)
        losses = {"kd": loss_kd}
        if loss_tok is not None:
            losses["kd+token"] = loss_kd + cfg.distill.token_weight * loss_tok
        for name, loss in losses.items():
            g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
            grads.setdefault(name, []).append(flat.detach())
    student.zero_grad(set_to_none=True)
    out = {}
    for name, gs in grads.items():
        g = torch.stack(gs)  # [G, P]
        mean = g.mean(0)
        variance = float((g - mean).pow(2).sum(1).mean())
        out[name] = {"variance": variance, "relative": variance / max(float(mean.pow(2).sum()), 1e-30),
                     "mean_norm": float(g.norm(dim=1).mean())}
    return out


@torch.no_grad()
def readouts(vit: VisionTransformer, aux_head: nn.Linear, split: Split, *, votes: tuple[float, ...] = VOTE_GRID,
             batch_size: int = 500) -> dict[str, Any]:
    """What the student predicts on real images ``split``, read in every way: the class token alone
    (``cls``), the aux head alone over the patch tokens (``aux_max``: max over tokens of each
    class's logit, as Token Labeling's vote reads it; ``aux_mean``: the mean over tokens), and
    Token Labeling's vote ``cls + lambda * max_i aux(z_i)`` for each ``lambda`` in ``votes``.
    Accuracies 0..1; the modules' train/eval modes are restored."""
    modules = (vit, aux_head)
    training = [m.training for m in modules]
    for m in modules:
        m.eval()
    device = next(vit.parameters()).device
    size = model_input_size(vit)
    cls, aux_max, aux_mean = [], [], []
    try:
        for start in range(0, split.images.shape[0], batch_size):
            x = fit_input(split.images[start:start + batch_size].to(device), size)
            features = vit.forward_features(x)
            cls.append(vit.forward_head(features).float().cpu())
            aux = aux_head(features[:, vit.num_prefix_tokens:]).float()
            aux_max.append(aux.max(1).values.cpu())
            aux_mean.append(aux.mean(1).cpu())
    finally:
        for m, flag in zip(modules, training):
            m.train(flag)
    c, a_max, a_mean = torch.cat(cls), torch.cat(aux_max), torch.cat(aux_mean)
    labels = split.labels
    return {"cls": accuracy(c, labels), "aux_max": accuracy(a_max, labels), "aux_mean": accuracy(a_mean, labels),
            "vote": {f"{v:g}": accuracy(c + v * a_max, labels) for v in votes}}
