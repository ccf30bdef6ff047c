"""The server-side methods that can be run by name on the same trained clients.

This module is plain data, so the config, the CLI and the app can list and check method names
without importing torch. How a method runs is its ``runner``: the name of one of the three
server procedures in :data:`fedmitr.server.RUNNERS` (average the weights, average the logits, or
the invert -> relabel -> distil rounds). The flags say which variant of the rounds it is.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNNERS = ("fedavg", "ensemble", "rounds")  # the procedures of fedmitr.server.RUNNERS


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # one line, shown in --help, the UI and the README
    runner: str  # one of RUNNERS
    sparse: bool = False  # inversion with progressive patch stopping
    relabel: bool = False  # per-patch token targets in distillation

    @property
    def inversion(self) -> bool:
        """Whether the method synthesises images (and so has rounds, a curve and a gallery)."""
        return self.runner == "rounds"


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("fedavg", "one-shot parameter average of the client models (weighted by client size)",
                   runner="fedavg"),
        MethodSpec("ensemble", "the teacher itself: K models at inference, averaged logits (a reference)",
                   runner="ensemble"),
        MethodSpec("dense-kd", "dense inversion + class-token KD (F-ADI / FedDF-style data-free baseline)",
                   runner="rounds"),
        MethodSpec("sparse-kd", "sparse inversion + class-token KD (ablation: no token relabel)",
                   runner="rounds", sparse=True),
        MethodSpec("dense-relabel", "dense inversion + token relabel (ablation: no sparsity)",
                   runner="rounds", relabel=True),
        MethodSpec("fedmitr", "sparse inversion + token relabel + distillation (the method)",
                   runner="rounds", sparse=True, relabel=True),
    )
}


def parse_methods(text: str) -> tuple[str, ...]:
    """``"fedavg, ensemble"`` -> ``("fedavg", "ensemble")``; duplicates dropped, order kept."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    return tuple(dict.fromkeys(names))
