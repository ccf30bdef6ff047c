"""The ensemble of the clients' models: the server's teacher, as one object.

``f_E(x) = mean_k f_k(x)``: the clients' logits averaged. Every server stage asks it the same few
things, so they live here once:

* :meth:`Ensemble.forward`: logits and the last block's CLS->patch attention on a *view* of the
  images, all patches or only the kept ones (the sparse forward of :mod:`fedmitr.models`);
* :meth:`Ensemble.token_probs`: each client's classifier on its own final patch tokens (Token
  Labeling's annotator), averaged;
* :meth:`Ensemble.predict_logits` / :meth:`Ensemble.evaluate`: plain inference on real images;
* :meth:`Ensemble.features`: the clients' class-token features (the privacy check's space).

Inversion, relabel, distillation, the privacy check, the Hub's evaluation and the Flower server
use it. An ensemble of one model is that model (``Ensemble([model]).evaluate(split)``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedmitr.data import Split
from fedmitr.models import (SparseOutput, fit_input, gather_tokens, model_input_size, patch_grid, patchify,
                            sparse_forward, token_logits)


@dataclass
class EnsembleOutput:
    logits: torch.Tensor  # [B, L] float32, mean of the clients' logits
    attention: torch.Tensor  # [B, M] float32, last block's CLS->patch attention, mean over heads and clients


class Ensemble:
    """K client models of one architecture, queried together (see the module docstring)."""

    def __init__(self, models: Sequence[VisionTransformer], num_samples: Sequence[int] | None = None,
                 weights: torch.Tensor | None = None):
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = list(models)
        # Per-client weights of the average (Co-Boosting learns them); None: the plain mean.
        self.weights = None if weights is None else weights.detach().float().cpu()
        if self.weights is not None and (self.weights.shape != (len(self.models),) or float(self.weights.sum()) <= 0):
            raise ValueError(f"weights must hold one non-negative weight per model with a positive sum "
                             f"(got {tuple(self.weights.shape)} for {len(self.models)} models)")
        self.num_samples = list(num_samples) if num_samples is not None else [1] * len(self.models)
        if len(self.num_samples) != len(self.models):
            raise ValueError(f"num_samples must hold one count per model (got {len(self.num_samples)} for "
                             f"{len(self.models)} models)")

    def __len__(self) -> int:
        return len(self.models)

    def weighted(self, weights: torch.Tensor) -> "Ensemble":
        """The same clients averaged with ``weights`` [K] (non-negative, normalised to sum to 1)."""
        return Ensemble(self.models, self.num_samples, weights)

    def _combine(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """The clients' ``values`` averaged: the plain mean, or weighted by :attr:`weights`."""
        if self.weights is None:
            total = 0.0
            for v in values:
                total = total + v
            return total / len(values)
        w = (self.weights / self.weights.sum()).to(values[0].device)
        return sum(wk * v for wk, v in zip(w, values))

    @property
    def grid(self) -> int:
        """Patches per side."""
        return patch_grid(self.models[0])

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def input_size(self) -> int:
        return model_input_size(self.models[0])

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    @contextmanager
    def frozen(self, *extra: torch.nn.Module) -> Iterator[None]:
        """Eval mode and no parameter gradients for the clients (and ``extra`` modules) inside the
        context (gradients still flow to the inputs, as inversion needs); restored after."""
        modules = self.models + list(extra)
        training = [m.training for m in modules]
        for m in modules:
            m.eval().requires_grad_(False)
        try:
            yield
        finally:
            for m, flag in zip(modules, training):
                m.train(flag).requires_grad_(True)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> EnsembleOutput:
        """The ensemble on ``images`` [B, C, H, W], restricted to the patches ``keep_idx`` [B, M]
        (None: every patch). Differentiable with respect to ``images``."""
        # Unfold and gather the active pixel patches once for all clients (same architecture).
        patches = None if keep_idx is None else gather_tokens(patchify(self.models[0], images), keep_idx)
        outs = [sparse_forward(m, images, keep_idx, patches) for m in self.models]
        return EnsembleOutput(self._combine([o.logits.float() for o in outs]),
                              self._combine([o.cls_attention.float() for o in outs]))

    __call__ = forward

    def client_logits(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """``[K, B, L]``: each client's logits on the view, before the average (what
        :meth:`combine` averages into exactly :meth:`forward`'s logits, with any weights)."""
        patches = None if keep_idx is None else gather_tokens(patchify(self.models[0], images), keep_idx)
        return torch.stack([sparse_forward(m, images, keep_idx, patches).logits.float() for m in self.models])

    def combine(self, client_logits: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: clients' logits ``[K, B, L]`` averaged as :meth:`forward` averages them."""
        return self._combine(list(client_logits))

    def client_outputs(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> list[SparseOutput]:
        """Each client's own output on the view (logits, attention, final patch tokens): where the
        clients' agreement matters, not only their mean."""
        patches = None if keep_idx is None else gather_tokens(patchify(self.models[0], images), keep_idx)
        return [sparse_forward(m, images, keep_idx, patches) for m in self.models]

    @torch.no_grad()
    def token_probs(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
        """``[B, M, L]``: per patch token, ``mean_k softmax(head_k(norm_k(token^k)) / temperature)``,
        each client's classifier on its own final patch tokens of the view (Token Labeling)."""
        probs = 0.0
        for m in self.models:
            out = sparse_forward(m, images, keep_idx)
            probs = probs + F.softmax(token_logits(m, out.tokens).float() / temperature, dim=-1)
        return probs / len(self.models)

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Logits averaged over the models on real images, ``[N, L]`` on the CPU (resized to the
        models' input size if needed)."""
        device, size = self.device, self.input_size
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = fit_input(images[start:start + batch_size].to(device), size)
            each = [m(x).float() for m in self.models]
            out.append((torch.stack(each).mean(0) if self.weights is None else self._combine(each)).cpu())
        return torch.cat(out)

    def evaluate(self, split: Split) -> float:
        """Accuracy (0..1) on ``split``; the models' train/eval modes are restored afterwards."""
        training = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        try:
            return accuracy(self.predict_logits(split.images), split.labels)
        finally:
            for m, flag in zip(self.models, training):
                m.train(flag)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """``[N, K*D]``: every client's final class-token feature, concatenated (the ensemble's view)."""
        device, size = self.device, self.input_size
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = fit_input(images[start:start + batch_size].to(device), size)
            out.append(torch.cat([m.forward_features(x)[:, 0].float() for m in self.models], dim=1).cpu())
        return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())
