"""A privacy check before anything is shared: how close is each synthetic image to a real one?

The server never sees real images, but model inversion could in principle reconstruct a client's
training images. For every synthetic image this finds its nearest real training image across all
clients, in pixel space and in the ensemble's feature space, and compares the distance with a
reference: how close real training images of the same class are to each other (each real image's
nearest same-class neighbour). A synthetic image nearer to a real one than most real images are
to their nearest neighbour would be a warning sign of memorisation.

This check needs the real data, so it runs where the data is: here, in the simulation, next to the
training set; in a real deployment each client would run it on its own data and report only the
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmitr.ensemble import Ensemble

SPACES = ("pixel", "feature")


@dataclass
class NearestReal:
    """For N synthetic images: their nearest real training image and the distances."""

    index: np.ndarray  # [N] int, index into the training split
    distance: dict[str, np.ndarray]  # space -> [N] distance to that nearest real image
    reference: dict[str, np.ndarray]  # space -> [M] each real image's distance to its nearest same-class neighbour

    def summary(self) -> dict[str, dict[str, float]]:
        """What ``metrics.json`` records, per space: medians, the minimum, and the share of synthetic
        images nearer to a real image than 95% of real images are to their nearest neighbour."""
        out = {}
        for space in SPACES:
            d, ref = self.distance[space], self.reference[space]
            p5 = float(np.percentile(ref, 5))
            out[space] = {"median": float(np.median(d)), "min": float(d.min()),
                          "reference_median": float(np.median(ref)), "reference_p5": p5,
                          "closer_than_reference_p5": float((d < p5).mean())}
        return out


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] -> ``[N, C*H*W]``, scaled so a distance is an RMS pixel difference."""
    flat = images.flatten(1).float()
    return flat / flat.shape[1] ** 0.5


def _nearest(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the nearest key row: (distance [Q], index [Q])."""
    dists, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start:start + chunk], keys)
        best = d.min(dim=1)
        dists.append(best.values)
        idx.append(best.indices)
    return torch.cat(dists), torch.cat(idx)


def _same_class_reference(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each real point's distance to its nearest other real point of the same class."""
    out = torch.empty(points.shape[0])
    for c in labels.unique():
        members = (labels == c).nonzero(as_tuple=True)[0]
        if len(members) < 2:
            out[members] = float("nan")
            continue
        d = torch.cdist(points[members], points[members])
        d.fill_diagonal_(float("inf"))
        out[members] = d.min(dim=1).values
    return out[~out.isnan()]


@dataclass
class RealSet:
    """The training images as the check sees them, computed once for every method of a run."""

    pixels: torch.Tensor  # [M, C*H*W] scaled pixels
    features: torch.Tensor  # [M, K*D] ensemble features
    reference: dict[str, np.ndarray]  # space -> each real image's distance to its nearest same-class neighbour


def real_set(real_unit: torch.Tensor, real_normalised: torch.Tensor, real_labels: torch.Tensor,
             ensemble: Ensemble) -> RealSet:
    """``real_unit``: training pixels in [0, 1]; ``real_normalised``: what the models take."""
    pixels, features = _pixels(real_unit), ensemble.features(real_normalised)
    return RealSet(pixels, features, {"pixel": _same_class_reference(pixels, real_labels).numpy(),
                                      "feature": _same_class_reference(features, real_labels).numpy()})


def nearest_real(synthetic_unit: torch.Tensor, synthetic_normalised: torch.Tensor, real: RealSet,
                 ensemble: Ensemble) -> NearestReal:
    """The check for one set of synthetic images (pixels in [0, 1], and normalised for the models).

    The nearest image is the pixel-space one; distances are given in both spaces.
    """
    px_dist, px_idx = _nearest(_pixels(synthetic_unit), real.pixels)
    ft_dist, _ = _nearest(ensemble.features(synthetic_normalised), real.features)
    return NearestReal(index=px_idx.numpy(), distance={"pixel": px_dist.numpy(), "feature": ft_dist.numpy()},
                       reference=real.reference)
