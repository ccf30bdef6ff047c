"""Stage 3: information density, the high-information set and the per-patch token targets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedmitr.config import RELABEL_MODES, RelabelConfig, preset_config
from fedmitr.inversion import SyntheticBatch, invert, kept_count, stop_iterations
from fedmitr.relabel import high_set_size, information_density, neighbourhoods, relabel, score_patches

TINY = preset_config("tiny")


@pytest.mark.parametrize("mode", RELABEL_MODES)
def test_relabel_targets_are_distributions_with_label_on_high_patches(ensemble, bounds, mode):
    cfg = replace(TINY.inversion, iterations=10)
    batch = invert(ensemble, torch.arange(6), cfg, pixel_bounds=bounds, sparse=True,
                   generator=torch.Generator().manual_seed(0))
    scores = score_patches(ensemble, batch, 4)
    out = relabel(ensemble, batch, scores, RelabelConfig(mode=mode), num_classes=10)
    assert out.targets.shape == (6, 16, 10)
    assert (out.targets >= 0).all()
    torch.testing.assert_close(out.targets.sum(-1), torch.ones(6, 16))
    high = scores.high_mask
    assert (out.targets[high].argmax(-1) == batch.labels.unsqueeze(1).expand(-1, 16)[high]).all()
    assert (out.targets[high].max(-1).values == 1).all()
    assert torch.equal(out.relabelled, ~high)


def test_neighbourhoods_are_nine_distinct_patches_around_each_patch():
    hood = neighbourhoods(4)
    assert hood.shape == (16, 9)
    for i, row in enumerate(hood.tolist()):
        assert len(set(row)) == 9 and i in row



def test_information_density_is_a_distribution_over_patches(ensemble):
    images = torch.randn(5, 1, 28, 28)
    density = information_density(ensemble, images)
    assert density.shape == (5, 16) and (density >= 0).all()
    torch.testing.assert_close(density.sum(1), torch.ones(5))


def test_high_set_is_the_densest_patches(ensemble):
    batch = SyntheticBatch(images=torch.randn(4, 1, 28, 28), labels=torch.arange(4), keep_idx=torch.arange(16).expand(4, -1),
                           stop_step=torch.full((4, 16), -1), iterations=1, seconds=0.0)
    scores = score_patches(ensemble, batch, 5)
    assert (scores.high_mask.sum(1) == 5).all()
    for density, high in zip(scores.density, scores.high_mask):
        assert density[high].min() >= density[~high].max()


def test_high_set_size_defaults_to_what_sparse_inversion_keeps():
    inv = TINY.inversion
    assert high_set_size(16, RelabelConfig(), inv) == kept_count(16, inv.keep_per_stop, len(stop_iterations(inv)))
    assert high_set_size(16, RelabelConfig(high_ratio=0.5), inv) == 8
    assert high_set_size(16, RelabelConfig(high_ratio=0.01), inv) == 1
