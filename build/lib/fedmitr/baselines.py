"""One-shot baselines on the trained clients: the logit ensemble and FedAvg (parameter average)."""

from __future__ import annotations

import copy

import torch
from timm.models.vision_transformer import VisionTransformer


def fedavg(models: list[VisionTransformer], num_samples: list[int] | None = None) -> VisionTransformer:
    """One-shot FedAvg: the parameters of ``models`` averaged, weighted by client size.

    Clients start from the same server-sent initialisation (see ``train_clients``), which is the
    fairest setting for FedAvg; after one long round of local training on skewed data their
    parameters still drift apart, which is why a single average is a weak one-shot model.
    """
    if not models:
        raise ValueError("fedavg needs at least one model")
    weights = torch.tensor(num_samples if num_samples is not None else [1] * len(models), dtype=torch.float64)
    if len(weights) != len(models) or (weights <= 0).any():
        raise ValueError(f"num_samples must hold one positive count per model (got {num_samples})")
    weights = weights / weights.sum()
    states = [m.state_dict() for m in models]
    averaged = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            averaged[key] = sum(w * s[key].double() for w, s in zip(weights.tolist(), states)).to(ref.dtype)
        else:
            averaged[key] = ref.clone()
    out = copy.deepcopy(models[0])
    out.load_state_dict(averaged)
    return out.eval()
