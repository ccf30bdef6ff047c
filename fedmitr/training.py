"""What the training loops share: the learning-rate schedule and which patches show something.

Client training (:mod:`fedmitr.clients`) and fractal pretraining (:mod:`fedmitr.pretrain`) both use
them; both import them from here, so neither imports the other for them (the clients do start from
a pretrained backbone: :mod:`fedmitr.clients` imports :mod:`fedmitr.pretrain`, never the reverse).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

__all__ = ["foreground", "warmup_cosine"]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float) -> CosineLRScheduler:
    """timm's cosine schedule over ``total_steps`` optimiser steps, after a linear warm-up from
    lr / warmup over the first ``warmup_frac`` of them. Call ``step_update(step)`` after each step."""
    warmup = max(1, int(total_steps * warmup_frac))
    peak = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), warmup_t=warmup,
                             warmup_lr_init=peak / warmup, warmup_prefix=True, t_in_epochs=False)


def foreground(unit: torch.Tensor, patch: int, threshold: float = 0.1) -> torch.Tensor:
    """``[B, N]`` bool: the patches of ``unit`` images ([B, C, H, W] in [0, 1]) whose mean distance
    from the image's median pixel (its background) is at least ``threshold``."""
    background = unit.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    ink = (unit - background).abs().mean(1, keepdim=True)  # [B, 1, H, W]
    return (F.avg_pool2d(ink, patch) >= threshold).flatten(1)
