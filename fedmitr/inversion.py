"""Stage 2: (sparse) model inversion of the client ensemble.

Pixels of a batch start as N(0, 1) noise in normalised space and are optimised with Adam so that
the ensemble f_E (mean of client logits) predicts balanced target labels, with a total-variation
(and optional L2) prior. In *sparse* inversion, at a few early iterations the patches that the
ensemble's last-block CLS attention ranks lowest are stopped: they are removed from the token
sequence of every later forward pass (cheaper), and only the TV prior still moves their pixels.
Dense inversion is the same function with no stops.

After sparse inversion the stopped patches' pixels become a fill (``stopped_fill``, the data's
background by default), as SMI's knowledge transfer zeroes them: the synthetic image then looks
like a real one, the evidence on the kept patches and background elsewhere, and the student can
learn from whole images. ``stop_step`` still records where and when each patch stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedmitr.config import InversionConfig
from fedmitr.ensemble import Ensemble
from fedmitr.models import sparse_forward


@dataclass(kw_only=True)
class SyntheticBatch:
    """Synthetic images and their bookkeeping. B images, N = grid * grid patches."""

    images: torch.Tensor  # [B, C, H, W] normalised pixels (the lowest-loss version of each image)
    labels: torch.Tensor  # [B] the class each image was inverted for (the generated pseudo-label)
    keep_idx: torch.Tensor  # [B, M] patches still active at the end of the optimisation (all N if dense)
    stop_step: torch.Tensor  # [B, N] iteration at which each patch was stopped; -1 = never stopped
    iterations: int  # optimisation steps taken
    seconds: float  # wall-clock time of the inversion
    grad_norms: torch.Tensor | None = None  # [T, B] norm of each image's pixel gradient at each iteration


def gradient_spread(batches: list[SyntheticBatch], stops: list[int]) -> dict[str, Any] | None:
    """How steady the inversion's pixel gradients were, over the iterations after the last stop
    (every iteration for dense inversion after the same one, so both are read on the same
    iterations): ``over_iterations``, the coefficient of variation (std / mean) across
    iterations of the batch's mean gradient norm, and ``over_images``, the mean over iterations of
    the coefficient of variation across images; each averaged over the batches, with the mean norm."""
    norms = [b.grad_norms for b in batches if b.grad_norms is not None]
    if not norms:
        return None
    first = max(stops, default=0)  # iterations are 1-based: row `first` is the first after the last stop
    over_iterations, over_images, mean_norm = [], [], []
    for g in norms:
        g = g[first:] if g.shape[0] - first >= 2 else g
        per_iteration = g.mean(1)
        over_iterations.append(float(per_iteration.std() / per_iteration.mean().clamp_min(1e-12)))
        over_images.append(float((g.std(1) / g.mean(1).clamp_min(1e-12)).mean()))
        mean_norm.append(float(g.mean()))
    n = len(norms)
    return {"over_iterations": sum(over_iterations) / n, "over_images": sum(over_images) / n,
            "mean_norm": sum(mean_norm) / n, "from_iteration": first + 1}


def stop_iterations(cfg: InversionConfig) -> list[int]:
    """Iterations (1-based) after which patches are stopped: ``stop_at`` fractions of ``iterations``."""
    return sorted({max(1, min(cfg.iterations - 1, round(f * cfg.iterations))) for f in cfg.stop_at})


def kept_count(num_patches: int, keep: float, stops: int) -> int:
    """Active patches left after ``stops`` stops that each keep the top ``keep`` fraction."""
    m = num_patches
    for _ in range(stops):
        m = max(1, round(m * keep))
    return m


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-image TV prior ``[B]``: L2 norms of horizontal, vertical and both diagonal differences."""
    diffs = (
        x[:, :, :, 1:] - x[:, :, :, :-1],
        x[:, :, 1:, :] - x[:, :, :-1, :],
        x[:, :, 1:, 1:] - x[:, :, :-1, :-1],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
    )
    return sum(d.flatten(1).norm(dim=1) for d in diffs)


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence ``[B]`` (nats) between two softmax distributions."""
    p, q = logits_p.softmax(-1), logits_q.softmax(-1)
    m = (0.5 * (p + q)).clamp_min(1e-8).log()
    return 0.5 * (F.kl_div(m, p, reduction="none").sum(-1) + F.kl_div(m, q, reduction="none").sum(-1))


def roll_patch_indices(keep_idx: torch.Tensor, grid: int, dy_patches: int, dx_patches: int) -> torch.Tensor:
    """Where patch indices land after ``torch.roll`` of the image by whole patches (with wrap-around)."""
    if dy_patches == 0 and dx_patches == 0:
        return keep_idx
    rows = (keep_idx // grid + dy_patches) % grid
    cols = (keep_idx % grid + dx_patches) % grid
    return rows * grid + cols


def fill_stopped(images: torch.Tensor, stop_step: torch.Tensor, fill_value: torch.Tensor) -> torch.Tensor:
    """``images`` [B, C, H, W] with every pixel of a stopped patch (``stop_step`` [B, N] >= 0) set to
    ``fill_value`` [1, C, 1, 1]."""
    b, n = stop_step.shape
    grid = round(n ** 0.5)
    patch = images.shape[-1] // grid
    stopped = (stop_step >= 0).view(b, 1, grid, grid)
    stopped = stopped.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return torch.where(stopped, fill_value.to(images.device, images.dtype), images)


def invert(ensemble: Ensemble, labels: torch.Tensor, cfg: InversionConfig, *,
           pixel_bounds: tuple[torch.Tensor, torch.Tensor], sparse: bool, generator: torch.Generator,
           allow_flip: bool = False, student: VisionTransformer | None = None,
           fill_value: torch.Tensor | None = None,
           on_step: Callable[[int, dict[str, float]], None] | None = None) -> SyntheticBatch:
    """Synthesise one batch of images for ``labels`` [B] from ``ensemble``.

    ``pixel_bounds`` are the normalised values of black and white, each ``[1, C, 1, 1]``.
    ``fill_value`` ``[1, C, 1, 1]``: what the stopped patches' pixels become at the end (None: they
    keep their noise).
    ``on_step(iteration, losses)`` is called after every step (losses: ce, tv, total, active).
    ``student`` with ``cfg.adv_weight > 0`` adds Adaptive DeepInversion's competition term,
    ``adv_weight * (1 - JS(teacher || student))``: images on which the current global model still
    disagrees with the ensemble are favoured, the ones distillation learns most from.
    """
    with ensemble.frozen(*([student] if student is not None and cfg.adv_weight > 0 else [])):
        batch = _invert(ensemble, labels, cfg, pixel_bounds=pixel_bounds, sparse=sparse, generator=generator,
                        allow_flip=allow_flip, student=student if cfg.adv_weight > 0 else None, on_step=on_step)
    if fill_value is not None and sparse:
        batch.images = fill_stopped(batch.images, batch.stop_step, fill_value)
    return batch


def _invert(ensemble: Ensemble, labels: torch.Tensor, cfg: InversionConfig, *,
            pixel_bounds: tuple[torch.Tensor, torch.Tensor], sparse: bool, generator: torch.Generator,
            allow_flip: bool, student: VisionTransformer | None,
            on_step: Callable[[int, dict[str, float]], None] | None) -> SyntheticBatch:
    start = time.perf_counter()
    ref = ensemble.models[0]
    device = ensemble.device
    grid = ensemble.grid
    n_patches = grid * grid
    size = ensemble.input_size
    patch = size // grid
    b = labels.shape[0]
    labels = labels.to(device)
    low, high = (t.to(device) for t in pixel_bounds)

    x = torch.randn((b, ref.patch_embed.proj.in_channels, size, size), generator=generator).to(device)
    x = torch.max(torch.min(x, high), low).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    stops = stop_iterations(cfg) if sparse else []
    keep_idx = torch.arange(n_patches, device=device).expand(b, -1).contiguous()
    stop_step = torch.full((b, n_patches), -1, dtype=torch.long, device=device)
    best_loss = torch.full((b,), math.inf, device=device)
    best_x = x.detach().clone()
    grad_norms = []

    for it in range(1, cfg.iterations + 1):
        collect_attention = it in stops
        # No jitter on the iteration just before a stop, so the attention lines up with the patches.
        j = 0 if collect_attention else cfg.jitter_px
        dy, dx = (torch.randint(-j, j + 1, (2,), generator=generator).tolist() if j > 0 else (0, 0))
        view = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else x
        flipped = allow_flip and cfg.flip and bool(torch.rand(1, generator=generator) < 0.5) and not collect_attention
        if flipped:
            view = view.flip(-1)
        view_idx = roll_patch_indices(keep_idx, grid, round(dy / patch), round(dx / patch))
        if flipped:
            view_idx = (view_idx // grid) * grid + (grid - 1 - view_idx % grid)
        out = ensemble(view, None if view_idx.shape[1] == n_patches else view_idx)
        logits, attention = out.logits, out.attention
        ce = F.cross_entropy(logits, labels, reduction="none")
        tv = total_variation(x)
        per_image = ce + cfg.tv_weight * tv + cfg.l2_weight * x.flatten(1).pow(2).sum(1)
        if student is not None:
            s_logits = sparse_forward(student, view, None if view_idx.shape[1] == n_patches else view_idx).logits
            per_image = per_image + cfg.adv_weight * (1 - js_divergence(logits, s_logits.float()))
        loss = per_image.mean()

        with torch.no_grad():
            improved = per_image < best_loss
            best_loss = torch.where(improved, per_image, best_loss)
            best_x[improved] = x[improved]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(x.grad.detach().flatten(1).norm(dim=1))
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.max(torch.min(x, high), low))

        if collect_attention:
            # attention is over view_idx == keep_idx here (no roll); keep the top share.
            m_new = max(1, round(keep_idx.shape[1] * cfg.keep_per_stop))
            order = attention.detach().argsort(dim=1, descending=True)
            stopped = torch.gather(keep_idx, 1, order[:, m_new:])
            stop_step.scatter_(1, stopped, it)
            keep_idx = torch.gather(keep_idx, 1, order[:, :m_new]).sort(dim=1).values
            # Losses on fewer tokens are not comparable with earlier ones: the best image is
            # chosen among iterations on the final active set only.
            best_loss.fill_(math.inf)
        if on_step is not None:
            on_step(it, {"ce": float(ce.detach().mean()), "tv": float(tv.detach().mean()), "total": float(loss.detach()),
                         "active": float(keep_idx.shape[1])})

    return SyntheticBatch(images=best_x.detach(), labels=labels, keep_idx=keep_idx, stop_step=stop_step,
                          iterations=cfg.iterations, seconds=time.perf_counter() - start,
                          grad_norms=torch.stack(grad_norms).float().cpu())
