"""Stage 3: information density and token relabel. Every patch of a synthetic image gets a target.

**Information density** of a patch is its share of the ensemble's last-block CLS->patch attention
on the final image (mean over heads and clients, normalised to sum to 1 over the patches). The
**high-information set** H is the top patches by density.

* Patches in H keep the generated pseudo-label ``y`` (one-hot, optionally smoothed): the inversion
  put the class evidence there.
* Low-information patches get an ensemble relabel ``q_i``, one of :data:`RELABEL_MODES`, with
  weight 1 or (``weighting = "confidence"``) ``max_l q_i(l)``, so a relabel the ensemble is unsure
  of counts less:
  - ``"token"``: Token Labeling's annotator, each client's classifier head on its own final patch
    token, ``q_i = mean_k softmax(head_k(norm_k(token_i^k)) / tau)``;
  - ``"image"``: the image-level soft label ``q_i = softmax(f_E(x) / tau)`` for every low patch;
  - ``"neighbourhood"``: the ensemble's prediction on the 3x3 block of patches around patch i alone
    (a sparse forward on those 9 tokens), ``q_i = softmax(f_E(x restricted to N(i)) / tau)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fedmitr.config import RELABEL_MODES, InversionConfig, RelabelConfig
from fedmitr.ensemble import Ensemble
from fedmitr.inversion import SyntheticBatch, kept_count, stop_iterations


@dataclass
class PatchScores:
    """How much class evidence each patch of a batch carries. B images, N patches."""

    density: torch.Tensor  # [B, N] share of the ensemble's CLS attention (rows sum to 1)
    high_mask: torch.Tensor  # [B, N] bool, the high-information set H (top patches by density)


@dataclass
class TokenTargets:
    targets: torch.Tensor  # [B, N, L] per-patch targets: a distribution times the patch's weight
    relabelled: torch.Tensor  # [B, N] bool, True where the target is the ensemble relabel
    weights: torch.Tensor  # [B, N] weight of each patch in the token loss (1 unless weighting is on)


@torch.no_grad()
def information_density(ensemble: Ensemble, images: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` share of the ensemble's last-block CLS attention on each patch, from one dense pass."""
    attention = ensemble(images).attention
    return attention / attention.sum(dim=1, keepdim=True)


def high_set_size(num_patches: int, cfg: RelabelConfig, inversion: InversionConfig) -> int:
    """|H|: ``cfg.high_ratio`` of the patches, or by default as many as sparse inversion keeps active."""
    if cfg.high_ratio is None:
        return kept_count(num_patches, inversion.keep_per_stop, len(stop_iterations(inversion)))
    return max(1, round(cfg.high_ratio * num_patches))


def score_patches(ensemble: Ensemble, batch: SyntheticBatch, high_count: int) -> PatchScores:
    """Information density of every patch of the batch's images and the top ``high_count`` of each."""
    density = information_density(ensemble, batch.images)
    top = density.topk(high_count, dim=1).indices
    high_mask = torch.zeros_like(density, dtype=torch.bool).scatter_(1, top, True)
    return PatchScores(density=density, high_mask=high_mask)


@torch.no_grad()
def ensemble_relabel(ensemble: Ensemble, images: torch.Tensor, mode: str, *, temperature: float,
                     on_chunk: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Soft ensemble label of every patch, ``[B, N, L]``, by ``mode`` (see module docstring).

    ``on_chunk(done, total)`` is called after each chunk of the neighbourhood relabel's forwards.
    """
    n = ensemble.num_patches
    if mode == "image":
        logits = ensemble(images).logits
        return F.softmax(logits / temperature, dim=-1).unsqueeze(1).expand(-1, n, -1).contiguous()
    if mode == "token":
        return ensemble.token_probs(images, temperature=temperature)
    if mode == "neighbourhood":
        grid = ensemble.grid
        hood = neighbourhoods(grid).to(images.device)  # [N, 9]
        b = images.shape[0]
        # Every (image, patch) pair becomes one sparse forward on its 9 neighbouring tokens.
        rep = images.repeat_interleave(n, dim=0)  # [B*N, C, H, W]
        keep = hood.repeat(b, 1)  # [B*N, 9]
        out = []
        chunks = range(0, rep.shape[0], 1024)
        for i, start in enumerate(chunks, start=1):
            logits = ensemble(rep[start:start + 1024], keep[start:start + 1024]).logits
            out.append(F.softmax(logits / temperature, dim=-1))
            if on_chunk is not None:
                on_chunk(i, len(chunks))
        return torch.cat(out).view(b, n, -1)
    raise ValueError(f"relabel mode must be one of {', '.join(RELABEL_MODES)} (got {mode!r})")


def neighbourhoods(grid: int) -> torch.Tensor:
    """``[N, k]`` patch indices of the 3x3 block around each patch, shifted inward at the border
    so every block has the same 9 distinct patches (k = min(3, grid)**2)."""
    size = min(3, grid)
    rows = []
    for r in range(grid):
        for c in range(grid):
            r0 = min(max(r - 1, 0), grid - size)
            c0 = min(max(c - 1, 0), grid - size)
            rows.append([(r0 + i) * grid + (c0 + j) for i in range(size) for j in range(size)])
    return torch.tensor(rows, dtype=torch.long)


def relabel(ensemble: Ensemble, batch: SyntheticBatch, scores: PatchScores, cfg: RelabelConfig, *,
            num_classes: int, on_chunk: Callable[[int, int], None] | None = None) -> TokenTargets:
    """Per-patch targets for ``batch``: the generated label on H, the ensemble relabel elsewhere."""
    q = ensemble_relabel(ensemble, batch.images, cfg.mode, temperature=cfg.temperature, on_chunk=on_chunk)  # [B, N, L]
    one_hot = F.one_hot(batch.labels, num_classes).float()
    if cfg.label_smoothing > 0:
        one_hot = one_hot * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
    high = scores.high_mask.unsqueeze(-1)
    targets = torch.where(high, one_hot.unsqueeze(1).expand_as(q), q)
    weights = torch.ones_like(scores.density)
    if cfg.weighting == "confidence":  # trust a relabel as much as the ensemble is sure of it
        weights = torch.where(scores.high_mask, weights, q.max(-1).values)
    # The weight is folded into the target: the soft cross-entropy is linear in it.
    return TokenTargets(targets=targets * weights.unsqueeze(-1), relabelled=~scores.high_mask, weights=weights)
