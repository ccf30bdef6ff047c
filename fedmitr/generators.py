"""Synthesis by a generator: the paper's strongest data-free baselines, DENSE and Co-Boosting.

Where FedMITR optimises pixels (:mod:`fedmitr.inversion`), these two train a small conv generator
``G(z)`` against the client ensemble, then distil the student on its images. Both are written in
this project's form (a synthesis stage, a teacher stage and a distillation stage of
:class:`fedmitr.methods.Rounds`), from their papers' mechanisms:

* **DENSE** (Zhang et al., NeurIPS 2022), ``dense-gen``: each round ``G`` and ``z`` are
  re-initialised and trained with ``CE(f_E(G(z)), y)`` plus the adversarial term that rewards the
  student's disagreement with the ensemble (``-KL(f_E || f_S)`` on the images where their classes
  differ) plus a stand-in for its BatchNorm-statistics term. Our ViTs have no BatchNorm, and their
  LayerNorms keep no statistics of the clients' data; sending such statistics would add to what a
  client discloses in one-shot FL, so the stand-in is the images' total variation
  (``generator.prior_weight``, 0 = none), chosen on validation.
* **Co-Boosting** (Dai et al., ICLR 2024), ``co-boosting``: the same generator, with the
  hard-sample weight ``(1 - p_y)^h`` on the CE and the adversarial term on every image
  (:func:`generate`); after each round the ensemble's per-client weights take signed-gradient steps
  that lower the weighted ensemble's CE on the pool, clamped to [0, 1], and teach from then on
  (:func:`learn_client_weights`); each distillation batch is made harder by signed-gradient steps
  on its pixels that raise the student's disagreement with the ensemble (:func:`perturb`).

A generator has no patch mask: every patch of its images is kept, so they have no relabel map.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedmitr.config import GeneratorConfig
from fedmitr.ensemble import Ensemble
from fedmitr.inversion import SyntheticBatch, total_variation
from fedmitr.models import sparse_forward


class ConvGenerator(nn.Module):
    """``z`` [B, nz] -> images [B, C, S, S] in normalised pixels, between ``low`` and ``high``.

    DENSE's generator, narrowed for small images: a linear layer to a ``width`` x S/4 x S/4 map,
    two (upsample x2, 3x3 conv, BatchNorm, LeakyReLU) blocks, a 3x3 conv to C channels and a
    sigmoid scaled into the valid pixel range. A size not divisible by 4 is resized at the end.
    """

    def __init__(self, nz: int, channels: int, size: int, *, width: int, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.start, self.size, self.width = max(1, size // 4), size, width
        self.project = nn.Sequential(nn.Linear(nz, width * self.start * self.start), nn.BatchNorm1d(width * self.start ** 2))
        half = max(1, width // 2)
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, half, 3, padding=1), nn.BatchNorm2d(half), nn.LeakyReLU(0.2),
            nn.Conv2d(half, channels, 3, padding=1))
        self.register_buffer("low", low.clone())
        self.register_buffer("high", high.clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, self.width, self.start, self.start)
        x = self.body(x)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.low + (self.high - self.low) * torch.sigmoid(x)


def reset(module: nn.Module, generator: torch.Generator) -> None:
    """DENSE's and Co-Boosting's re-initialisation, drawn from ``generator``: N(0, 0.02) weights and
    zero biases for convs and linear layers, N(1, 0.02) BatchNorm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02, generator=generator)
            nn.init.zeros_(m.bias)


def disagreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """``[B]``: ``KL(softmax(teacher/T) || softmax(student/T))`` per image."""
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def generate(ensemble: Ensemble, labels: torch.Tensor, cfg: GeneratorConfig, *,
             pixel_bounds: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator,
             student: VisionTransformer | None = None, hard: bool = False,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> SyntheticBatch:
    """Train a freshly initialised generator and its latents ``z`` for ``cfg.iterations`` steps so
    that the ensemble predicts ``labels`` [B] on ``G(z)``; return the lowest-loss image of each.

    Loss per image: ``w * CE(f_E(x), y) - adv_weight * KL(f_E(x) || f_S(x)) * mask + prior_weight *
    TV(x)``, where ``w = (1 - p_y)^h`` and ``mask = 1`` with ``hard`` (Co-Boosting), and ``w = 1``
    and ``mask`` = [the student's class differs from the ensemble's] without (DENSE).
    """
    start = time.perf_counter()
    device = ensemble.device
    ref = ensemble.models[0]
    channels, size, n = ref.patch_embed.proj.in_channels, ensemble.input_size, ensemble.num_patches
    b = labels.shape[0]
    labels = labels.to(device)
    low, high = (t.to(device) for t in pixel_bounds)
    g = ConvGenerator(cfg.nz, channels, size, width=cfg.width, low=low, high=high).to(device)
    reset(g, generator)
    z = torch.randn((b, cfg.nz), generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": g.parameters()}, {"params": [z]}], lr=cfg.lr, betas=(0.5, 0.999))
    best_loss = torch.full((b,), float("inf"), device=device)
    best_x = torch.zeros((b, channels, size, size), device=device)
    use_student = student is not None and cfg.adv_weight > 0
    g.train()
    with ensemble.frozen(*([student] if use_student else [])):
        for it in range(1, cfg.iterations + 1):
            x = g(z)
            logits = ensemble(x).logits
            ce = F.cross_entropy(logits, labels, reduction="none")
            if hard and cfg.hard > 0:
                p_y = F.softmax(logits, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)
                ce = (1 - p_y.detach()).pow(cfg.hard) * ce
            per_image = ce
            adv = torch.zeros_like(ce)
            if use_student:
                s_logits = sparse_forward(student, x).logits.float()
                adv = disagreement(logits, s_logits)
                if not hard:  # DENSE: only where the student's class is not the ensemble's
                    adv = adv * (s_logits.argmax(1) != logits.argmax(1)).float()
                per_image = per_image - cfg.adv_weight * adv
            if cfg.prior_weight > 0:
                per_image = per_image + cfg.prior_weight * total_variation(x)
            loss = per_image.mean()
            with torch.no_grad():
                improved = per_image < best_loss
                best_loss = torch.where(improved, per_image, best_loss)
                best_x[improved] = x[improved]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(g.parameters(), max_norm=10.0)
            optimizer.step()
            if on_step is not None:
                on_step(it, {"ce": float(ce.detach().mean()), "adv": float(adv.detach().mean()),
                             "total": float(loss.detach())})
    keep_idx = torch.arange(n, device=device).expand(b, -1).contiguous()
    return SyntheticBatch(images=best_x.detach(), labels=labels, keep_idx=keep_idx,
                          stop_step=torch.full((b, n), -1, dtype=torch.long, device=device),
                          iterations=cfg.iterations, seconds=time.perf_counter() - start)


@torch.no_grad()
def _client_logits(ensemble: Ensemble, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``[K, P, L]``: every client's logits on the pool images."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        out.append(torch.stack([sparse_forward(m, x).logits.float() for m in ensemble.models]))
    return torch.cat(out, dim=1)


def learn_client_weights(ensemble: Ensemble, images: torch.Tensor, labels: torch.Tensor, cfg: GeneratorConfig, *,
                         round_index: int, generator: torch.Generator, batch_size: int = 64) -> Ensemble:
    """Co-Boosting's ensemble: ``weight_passes`` passes over the pool (``images`` [P, C, H, W] with
    the ``labels`` they were made for) in minibatches, each a signed-gradient step
    ``w <- clamp(w - mu * decay^(round - 1) * sign(dCE(f_w(x), y)/dw), 0, 1)`` on the per-client
    weights of the average (start: all 1). Returns the ensemble weighted by them."""
    weights = (ensemble.weights.clone() if ensemble.weights is not None else torch.ones(len(ensemble)))
    step = cfg.weight_lr * cfg.weight_decay ** (round_index - 1)
    if step <= 0 or cfg.weight_passes <= 0:
        return ensemble
    with ensemble.frozen():
        logits = _client_logits(ensemble, images).cpu()  # the clients are fixed: only the mixing moves
    labels = labels.cpu()
    for _ in range(cfg.weight_passes):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            w = weights.clone().requires_grad_(True)
            mixed = (w.view(-1, 1, 1) * logits[:, idx]).sum(0) / w.sum().clamp_min(1e-6)
            (grad,) = torch.autograd.grad(F.cross_entropy(mixed, labels[idx]), w)
            weights = (weights - step * grad.sign()).clamp(0.0, 1.0)
    if float(weights.sum()) <= 0:  # every weight at 0: keep the last usable mix
        return ensemble
    return ensemble.weighted(weights)


def perturb(student: nn.Module, ensemble: Ensemble, images: torch.Tensor, cfg: GeneratorConfig, *,
            pixel_bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Co-Boosting's harder samples for the student: ``perturb_steps`` signed-gradient steps of size
    ``perturb_eps`` on the pixels that raise ``KL(f_E(x) || f_S(x))``, clamped to the valid range."""
    low, high = (t.to(images.device) for t in pixel_bounds)
    x = images.detach()
    for _ in range(cfg.perturb_steps):
        x = x.clone().requires_grad_(True)
        with ensemble.frozen():
            teacher = ensemble(x).logits
        loss = disagreement(teacher, student(x)[0].float()).mean()
        (grad,) = torch.autograd.grad(loss, x)
        x = torch.max(torch.min(x.detach() + cfg.perturb_eps * grad.sign(), high), low)
    return x.detach()
