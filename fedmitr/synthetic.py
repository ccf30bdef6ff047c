"""The synthetic set of an inversion method: every image it made, with its bookkeeping.

A run directory keeps it as ``synthetic/<method>.safetensors`` (uint8 pixels, small integer and
half-precision arrays: about 0.5 MB for the default run), so it can be looked at, checked for
privacy and shared as a Hugging Face ``datasets`` dataset after the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedmitr.errors import ConfigError
from fedmitr.events import SyntheticRound


@dataclass(kw_only=True)
class SyntheticSet:
    """N synthetic images of one method; patches on a ``grid`` x ``grid`` grid (P = grid**2)."""

    method: str
    grid: int  # patches per side
    iterations: int  # inversion iterations per image
    images: np.ndarray  # [N, C, H, W] uint8 pixels
    labels: np.ndarray  # [N] the class each image was inverted for (the generated label)
    round: np.ndarray  # [N] 1-based round that made the image
    stop_step: np.ndarray  # [N, P] iteration at which a patch stopped being optimised; -1 = never
    density: np.ndarray  # [N, P] information density (share of the ensemble's CLS attention)
    high_mask: np.ndarray  # [N, P] the high-information set H
    token_labels: np.ndarray  # [N, P] the class each patch token was trained on
    token_relabelled: np.ndarray  # [N, P] True where that class came from the ensemble's relabel

    ARRAYS = ("images", "labels", "round", "stop_step", "density", "high_mask", "token_labels", "token_relabelled")

    @classmethod
    def from_rounds(cls, rounds: list[SyntheticRound]) -> "SyntheticSet":
        if not rounds:
            raise ValueError("a synthetic set needs at least one round")
        images = np.concatenate([r.images for r in rounds])
        if images.dtype != np.uint8:
            images = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
        return cls(
            method=rounds[0].method, grid=rounds[0].grid, iterations=rounds[0].iterations, images=images,
            labels=np.concatenate([r.labels for r in rounds]).astype(np.int16),
            round=np.concatenate([np.full(len(r.labels), r.round, dtype=np.int16) for r in rounds]),
            stop_step=np.concatenate([r.stop_step for r in rounds]).astype(np.int16),
            density=np.concatenate([r.density for r in rounds]).astype(np.float16),
            high_mask=np.concatenate([r.high_mask for r in rounds]).astype(bool),
            token_labels=np.concatenate([r.token_labels for r in rounds]).astype(np.int16),
            token_relabelled=np.concatenate([r.token_relabelled for r in rounds]).astype(bool),
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def unit_images(self) -> np.ndarray:
        """``[N, C, H, W]`` float32 pixels in [0, 1]."""
        return self.images.astype(np.float32) / 255.0

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """One safetensors file; ``extra`` (JSON-able, e.g. class names) goes into its metadata."""
        meta = {"method": self.method, "grid": str(self.grid), "iterations": str(self.iterations),
                "extra": json.dumps(extra or {})}
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in self.ARRAYS}
        arrays["high_mask"] = arrays["high_mask"].astype(np.uint8)
        arrays["token_relabelled"] = arrays["token_relabelled"].astype(np.uint8)
        save_file(arrays, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple["SyntheticSet", dict[str, Any]]:
        """The set and the ``extra`` metadata saved with it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no synthetic set at {str(path)!r}")
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        arrays = load_file(str(path))
        values = {name: arrays[name] for name in cls.ARRAYS}
        values["high_mask"] = values["high_mask"].astype(bool)
        values["token_relabelled"] = values["token_relabelled"].astype(bool)
        return cls(method=meta.get("method", path.stem), grid=int(meta.get("grid", 0)),
                   iterations=int(meta.get("iterations", 0)), **values), json.loads(meta.get("extra", "{}"))
