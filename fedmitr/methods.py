"""The server-side methods that can be run by name on the same trained clients."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # one line, shown in --help, the UI and the README
    sparse: bool = False  # inversion with progressive patch stopping
    relabel: bool = False  # per-patch token targets in distillation
    inversion: bool = False  # needs model inversion + distillation


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("fedavg", "one-shot parameter average of the client models (weighted by client size)"),
        MethodSpec("ensemble", "the teacher itself: K models at inference, averaged logits (a reference)"),
        MethodSpec("dense-kd", "dense inversion + class-token KD (F-ADI / FedDF-style data-free baseline)",
                   inversion=True),
        MethodSpec("sparse-kd", "sparse inversion + class-token KD (ablation: no token relabel)",
                   sparse=True, inversion=True),
        MethodSpec("dense-relabel", "dense inversion + token relabel (ablation: no sparsity)",
                   relabel=True, inversion=True),
        MethodSpec("fedmitr", "sparse inversion + token relabel + distillation (the method)",
                   sparse=True, relabel=True, inversion=True),
    )
}


def parse_methods(text: str) -> tuple[str, ...]:
    """``"fedavg, ensemble"`` -> ``("fedavg", "ensemble")``; duplicates dropped, order kept."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    return tuple(dict.fromkeys(names))
