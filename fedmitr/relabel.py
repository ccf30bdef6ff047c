"""Stage 3: information density and token relabel. Every patch of a synthetic image gets a target.

Everything here is computed on the **kept view** of an image: the patches sparse inversion kept
active to the end (every patch for dense inversion). Stopped patches still hold the noise they
started from; no forward pass here ever sees them.

**Information density** of a patch is its share of the ensemble's last-block CLS->patch attention
on the kept view (mean over heads and clients, normalised to sum to 1 over the patches); a stopped
patch has density 0. The **high-information set** H is the densest kept patches, so H is always a
subset of the kept set.

Each patch is then taught one of (:data:`SOURCES`):

* ``label``: patches in H keep the generated pseudo-label ``y`` (one-hot, optionally smoothed);
* ``relabel``: the other kept patches get an ensemble relabel ``q_i``, one of :data:`RELABEL_MODES`,
  all on the kept view:
  - ``"token"``: Token Labeling's annotator, each client's classifier head on its own final patch
    token, ``q_i = mean_k softmax(head_k(norm_k(token_i^k)) / tau)``;
  - ``"image"``: the image-level soft label ``q_i = softmax(f_E(x_kept) / tau)``;
  - ``"neighbourhood"``: the ensemble's prediction on the kept patches of the 3x3 block around
    patch i alone, ``q_i = softmax(f_E(x restricted to N(i) ∩ kept) / tau)``;
* ``gated``: with ``gating`` on, a relabel counts only where at least ``min_agreement`` of the
  clients agree with the ensemble's class and the ensemble is at least ``min_confidence`` sure;
  otherwise its weight is 0;
* stopped patches teach what ``relabel.stopped`` says: ``"ignore"`` (nothing: weight 0, left out
  of the token loss), ``"uniform"`` (every class alike) or ``"blank"`` (the ensemble's soft label
  of an image of the background, the fill of stopped patches: what the clients say about background).

The token loss is the weighted mean of the soft cross-entropy over the patches with a weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedmitr.config import RELABEL_MODES, InversionConfig, RelabelConfig
from fedmitr.ensemble import Ensemble
from fedmitr.inversion import SyntheticBatch, kept_count, stop_iterations
from fedmitr.models import token_logits

# What a patch was taught (TokenTargets.source); the app draws each in its own colour.
LABEL, RELABEL, GATED, BACKGROUND, NOTHING = 0, 1, 2, 3, 4
SOURCES = ("label", "relabel", "gated", "background", "nothing")


@dataclass
class PatchScores:
    """How much class evidence each patch of a batch carries. B images, N patches."""

    density: torch.Tensor  # [B, N] share of the ensemble's CLS attention on the kept view (rows sum to 1)
    high_mask: torch.Tensor  # [B, N] bool, the high-information set H (the densest kept patches)


@dataclass
class TokenTargets:
    """Per-patch targets of a batch. B images, N patches, L classes."""

    targets: torch.Tensor  # [B, N, L] a distribution per patch (where the weight is 0 it is unused)
    weights: torch.Tensor  # [B, N] weight of each patch in the token loss (0: the patch teaches nothing)
    source: torch.Tensor  # [B, N] int8, one of LABEL, RELABEL, GATED, BACKGROUND, NOTHING
    agreement: torch.Tensor  # [B, N] share of the clients whose class is the relabel's (0 where no relabel)

    @property
    def relabelled(self) -> torch.Tensor:
        """[B, N] bool: the patches taught an ensemble relabel (gated ones included)."""
        return (self.source == RELABEL) | (self.source == GATED)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


def high_set_size(num_patches: int, cfg: RelabelConfig, inversion: InversionConfig) -> int:
    """|H|: ``cfg.high_ratio`` of the patches, or by default as many as sparse inversion keeps active
    (H never holds a stopped patch, so it is also at most the kept count of each image)."""
    if cfg.high_ratio is None:
        return kept_count(num_patches, inversion.keep_per_stop, len(stop_iterations(inversion)))
    return max(1, round(cfg.high_ratio * num_patches))


def _kept_view(batch: SyntheticBatch, num_patches: int) -> torch.Tensor | None:
    """The batch's kept indices, or None when every patch was kept (the dense forward)."""
    return None if batch.keep_idx.shape[1] == num_patches else batch.keep_idx


def keep_mask(batch: SyntheticBatch, num_patches: int) -> torch.Tensor:
    """``[B, N]`` bool: the patches inversion kept active to the end."""
    mask = torch.zeros(batch.keep_idx.shape[0], num_patches, dtype=torch.bool, device=batch.keep_idx.device)
    return mask.scatter_(1, batch.keep_idx, True)


@torch.no_grad()
def information_density(ensemble: Ensemble, batch: SyntheticBatch) -> torch.Tensor:
    """``[B, N]`` share of the ensemble's last-block CLS attention on each patch of the kept view;
    0 for a stopped patch."""
    n = ensemble.num_patches
    attention = ensemble(batch.images, _kept_view(batch, n)).attention  # [B, M]
    density = torch.zeros(attention.shape[0], n, device=attention.device)
    density.scatter_(1, batch.keep_idx, attention)
    return density / density.sum(dim=1, keepdim=True)


def score_patches(ensemble: Ensemble, batch: SyntheticBatch, high_count: int) -> PatchScores:
    """Information density of every patch of the batch and H: the ``high_count`` densest kept
    patches of each image (all of them when fewer are kept)."""
    density = information_density(ensemble, batch)
    count = min(high_count, batch.keep_idx.shape[1])
    top = density.topk(count, dim=1).indices  # stopped patches have density 0: never picked
    high_mask = torch.zeros_like(density, dtype=torch.bool).scatter_(1, top, True)
    return PatchScores(density=density, high_mask=high_mask)


@dataclass
class Relabels:
    """The ensemble's relabel of the patches asked for: ``probs`` [P, L], ``agreement`` [P]."""

    probs: torch.Tensor
    agreement: torch.Tensor


def _agreement(client_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Share of the clients (``client_logits`` [K, P, L]) whose class is the ensemble's (``probs`` [P, L])."""
    return (client_logits.argmax(-1) == probs.argmax(-1)).float().mean(0)


@torch.no_grad()
def ensemble_relabel(ensemble: Ensemble, batch: SyntheticBatch, wanted: torch.Tensor, mode: str, *,
                     temperature: float, on_chunk: Callable[[int, int], None] | None = None) -> Relabels:
    """The relabel of the kept patches in ``wanted`` ([B, N] bool), on the kept view, by ``mode``.

    Returns the relabels in the order of ``wanted.nonzero()``. ``on_chunk(done, total)`` follows
    the neighbourhood relabel's forwards.
    """
    n = ensemble.num_patches
    b_idx, p_idx = wanted.nonzero(as_tuple=True)
    keep = _kept_view(batch, n)
    if mode == "image":
        outs = ensemble.client_outputs(batch.images, keep)
        logits = torch.stack([o.logits.float() for o in outs])  # [K, B, L]
        probs = F.softmax(logits.mean(0) / temperature, dim=-1)
        return Relabels(probs[b_idx], _agreement(logits, probs)[b_idx])
    if mode == "token":
        outs = ensemble.client_outputs(batch.images, keep)
        full = batch.keep_idx  # [B, M]: token j of the kept view is patch full[b, j]
        slot = torch.full((batch.images.shape[0], n), -1, dtype=torch.long, device=full.device)
        slot.scatter_(1, full, torch.arange(full.shape[1], device=full.device).expand_as(full))
        j = slot[b_idx, p_idx]  # [P], every wanted patch is kept
        logits = torch.stack([token_logits(m, o.tokens[b_idx, j]).float()
                              for m, o in zip(ensemble.models, outs)])  # [K, P, L]
        probs = F.softmax(logits / temperature, dim=-1).mean(0)
        return Relabels(probs, _agreement(logits, probs))
    if mode == "neighbourhood":
        hood = neighbourhoods(ensemble.grid).to(batch.images.device)[p_idx]  # [P, 9]
        kept = keep_mask(batch, n)[b_idx.unsqueeze(1), hood]  # [P, 9]: which window patches are kept
        probs = torch.empty(len(b_idx), ensemble.models[0].num_classes, device=batch.images.device)
        agreement = torch.empty(len(b_idx), device=batch.images.device)
        # One sparse forward per window size: the stopped patches of a window are left out.
        sizes = kept.sum(1)
        groups = [int(s) for s in sizes.unique()]
        done = 0
        for s in groups:
            rows = (sizes == s).nonzero(as_tuple=True)[0]
            for start in range(0, len(rows), 1024):
                chunk = rows[start:start + 1024]
                window = hood[chunk][kept[chunk]].view(len(chunk), s)
                outs = ensemble.client_outputs(batch.images[b_idx[chunk]], window)
                logits = torch.stack([o.logits.float() for o in outs])
                p = F.softmax(logits.mean(0) / temperature, dim=-1)
                probs[chunk], agreement[chunk] = p, _agreement(logits, p)
            done += 1
            if on_chunk is not None:
                on_chunk(done, len(groups))
        return Relabels(probs, agreement)
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


@torch.no_grad()
def blank_target(ensemble: Ensemble, background: torch.Tensor, temperature: float, channels: int) -> torch.Tensor:
    """``[L]``: the ensemble's soft label of an empty image (every pixel the ``background`` value
    ``[1, C, 1, 1]``, the fill of stopped patches): what the clients say about background."""
    size = ensemble.input_size
    image = background.to(ensemble.device).expand(1, channels, size, size).contiguous()
    return F.softmax(ensemble(image).logits[0] / temperature, dim=-1)


def relabel(ensemble: Ensemble, batch: SyntheticBatch, scores: PatchScores, cfg: RelabelConfig, *,
            num_classes: int, background: torch.Tensor | None = None,
            on_chunk: Callable[[int, int], None] | None = None) -> TokenTargets:
    """Per-patch targets for ``batch`` (see the module docstring)."""
    b, n = scores.density.shape
    device = scores.density.device
    kept = keep_mask(batch, n)
    targets = torch.full((b, n, num_classes), 1.0 / num_classes, device=device)
    weights = torch.zeros(b, n, device=device)
    source = torch.full((b, n), NOTHING, dtype=torch.int8, device=device)
    agreement = torch.zeros(b, n, device=device)

    # H: the generated label.
    one_hot = F.one_hot(batch.labels, num_classes).float()
    if cfg.label_smoothing > 0:
        one_hot = one_hot * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
    high = scores.high_mask
    targets[high] = one_hot.unsqueeze(1).expand(-1, n, -1)[high]
    weights[high], source[high] = 1.0, LABEL

    # The other kept patches: the ensemble's relabel on the kept view.
    wanted = kept & ~high
    if wanted.any():
        found = ensemble_relabel(ensemble, batch, wanted, cfg.mode, temperature=cfg.temperature, on_chunk=on_chunk)
        targets[wanted], agreement[wanted] = found.probs, found.agreement
        confidence = found.probs.max(-1).values
        weight = confidence if cfg.weighting == "confidence" else torch.ones_like(confidence)
        passed = torch.ones_like(confidence, dtype=torch.bool)
        if cfg.gating:
            passed = (found.agreement >= cfg.min_agreement) & (confidence >= cfg.min_confidence)
        weights[wanted] = torch.where(passed, weight, torch.zeros_like(weight))
        source[wanted] = torch.where(passed, torch.full_like(passed, RELABEL, dtype=torch.int8),
                                     torch.full_like(passed, GATED, dtype=torch.int8))

    # Stopped patches.
    stopped = ~kept
    if stopped.any() and cfg.stopped != "ignore" and cfg.stopped_weight > 0:
        if cfg.stopped == "image":  # each image's own soft label, on its kept view
            with torch.no_grad():
                logits = ensemble(batch.images, _kept_view(batch, n)).logits  # [B, L]
            per_image = F.softmax(logits / cfg.temperature, dim=-1)
            targets[stopped] = per_image.unsqueeze(1).expand(-1, n, -1)[stopped]
        elif cfg.stopped == "uniform":
            targets[stopped] = torch.full((num_classes,), 1.0 / num_classes, device=device)
        else:
            if background is None:
                raise ValueError("relabel.stopped = 'blank' needs the data's background value")
            targets[stopped] = blank_target(ensemble, background, cfg.temperature, batch.images.shape[1])
        weights[stopped], source[stopped] = cfg.stopped_weight, BACKGROUND
    return TokenTargets(targets=targets, weights=weights, source=source, agreement=agreement)


# --- diagnostics -------------------------------------------------------------------------------------

def diagnostic_counts(batch: SyntheticBatch, scores: PatchScores, targets: TokenTargets | None,
                      num_classes: int) -> dict[str, Any]:
    """Counts over one batch, summed over rounds and turned into :func:`diagnostics`."""
    kept = keep_mask(batch, scores.density.shape[1])
    high = scores.high_mask
    out: dict[str, Any] = {"high": int(high.sum()), "high_kept": int((high & kept).sum()),
                           "patches": int(high.numel()), "kept": int(kept.sum()),
                           "label_histogram": np.bincount(batch.labels.cpu().numpy(), minlength=num_classes)}
    if targets is None:
        return out
    taught = targets.source == RELABEL
    cls = targets.targets.argmax(-1)
    kept_relabel = taught & kept
    out.update({
        "sources": np.bincount(targets.source.flatten().long().cpu().numpy(), minlength=len(SOURCES)),
        "relabel_histogram": np.bincount(cls[taught].cpu().numpy(), minlength=num_classes),
        "kept_relabelled": int(kept_relabel.sum()),
        "kept_relabel_disagrees": int((kept_relabel & (cls != batch.labels.unsqueeze(1))).sum()),
        "confidence_sum": float(targets.targets.max(-1).values[taught].sum()),
        "agreement_sum": float(targets.agreement[taught].sum()),
    })
    return out


def add_counts(total: dict[str, Any] | None, counts: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return dict(counts)
    return {k: total[k] + v for k, v in counts.items()}


def diagnostics(counts: dict[str, Any] | None) -> dict[str, Any]:
    """What ``metrics.json`` records of a method's relabel: the share of H that is kept, the class
    histogram of the relabels against the generated labels, how often a relabelled kept patch
    disagrees with its image's label, the mean relabel confidence, and what each patch taught."""
    if not counts:
        return {}
    out: dict[str, Any] = {
        "high_kept_share": counts["high_kept"] / max(1, counts["high"]),
        "kept_share": counts["kept"] / max(1, counts["patches"]),
        "label_histogram": [int(v) for v in counts["label_histogram"]],
    }
    if "sources" not in counts:
        return out
    taught = int(counts["sources"][RELABEL])
    out.update({
        "taught": {name: int(v) / max(1, counts["patches"]) for name, v in zip(SOURCES, counts["sources"])},
        "relabel_histogram": [int(v) for v in counts["relabel_histogram"]],
        "relabelled_kept_patches": counts["kept_relabelled"],
        "kept_relabel_disagrees_share": counts["kept_relabel_disagrees"] / max(1, counts["kept_relabelled"]),
        "mean_relabel_confidence": counts["confidence_sum"] / max(1, taught) if taught else None,
        "mean_relabel_agreement": counts["agreement_sum"] / max(1, taught) if taught else None,
    })
    return out


def diagnostics_text(diagnostics: Mapping | None, class_names: Sequence[str] | None = None) -> str:
    """The run's relabel diagnostics in a few lines (``metrics.json``'s ``relabel`` of a method)."""
    if not diagnostics:
        return ""
    lines = [f"**H is kept:** {diagnostics['high_kept_share']:.0%} of the high-information patches are patches "
             f"sparse inversion kept ({diagnostics['kept_share']:.0%} of all patches were kept)."]
    taught = diagnostics.get("taught")
    if taught:
        parts = [f"{share:.0%} {name}" for name, share in taught.items() if share > 0]
        lines.append("**Patches taught:** " + ", ".join(parts) + ".")
        if not taught.get("relabel") and not taught.get("gated"):
            lines.append("**No patch was relabelled in this run:** H held every kept patch, so each kept patch was "
                         "taught the generated label.")
        if diagnostics.get("mean_relabel_confidence") is not None:
            names = list(class_names) if class_names else [str(c) for c in range(len(diagnostics["label_histogram"]))]
            hist = ", ".join(f"{names[c]}: {n}" for c, n in enumerate(diagnostics["relabel_histogram"]) if n)
            lines.append(f"**Relabels:** mean confidence {diagnostics['mean_relabel_confidence']:.0%}, the clients "
                         f"agree {diagnostics['mean_relabel_agreement']:.0%}; "
                         f"{diagnostics['kept_relabel_disagrees_share']:.0%} of the relabelled kept patches name "
                         f"another class than their image's. Relabels by class: {hist}; images by class: "
                         f"{', '.join(str(n) for n in diagnostics['label_histogram'])}.")
    return " ".join(lines)
