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
    )
}


def parse_methods(text: str) -> tuple[str, ...]:
    """``"fedavg, ensemble"`` -> ``("fedavg", "ensemble")``; duplicates dropped, order kept."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    return tuple(dict.fromkeys(names))
