"""Stage 2: sparse and dense model inversion of the client ensemble (tiny preset)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedmitr.config import ModelConfig, preset_config
from fedmitr.inversion import invert, kept_count, roll_patch_indices, stop_iterations, total_variation
from fedmitr.models import build_model, patchify, sparse_forward

TINY = preset_config("tiny")


def test_roll_patch_indices_follow_whole_patch_rolls():
    x = torch.randn(1, 1, 28, 28)
    model = build_model(ModelConfig(), 10, 1, 28)
    keep = torch.tensor([[0, 3, 6, 13]])
    rolled = torch.roll(x, shifts=(7, 14), dims=(2, 3))
    moved = roll_patch_indices(keep, 4, 1, 2)
    torch.testing.assert_close(patchify(model, rolled)[0, moved[0]], patchify(model, x)[0, keep[0]])


@pytest.mark.parametrize("sparse", [True, False])
def test_inversion_mask_bookkeeping(ensemble, bounds, sparse):
    cfg = replace(TINY.inversion, iterations=20, jitter_px=2)
    labels = torch.arange(8) % 10
    batch = invert(ensemble, labels, cfg, pixel_bounds=bounds, sparse=sparse, generator=torch.Generator().manual_seed(0))
    n = 16
    stops = stop_iterations(cfg)
    expected = kept_count(n, cfg.keep_per_stop, len(stops)) if sparse else n
    assert batch.keep_idx.shape == (8, expected)
    for row, steps in zip(batch.keep_idx, batch.stop_step):
        assert len(set(row.tolist())) == expected and row.min() >= 0 and row.max() < n
        assert (steps[row] == -1).all(), "active patches were never stopped"
        stopped = steps[steps >= 0]
        assert len(stopped) == n - expected and set(stopped.tolist()) <= set(stops)
    if sparse:  # the schedule: each stop keeps round(0.7 * active)
        counts = [(batch.stop_step[0] == s).sum().item() for s in stops]
        active = n
        for s, c in zip(stops, counts):
            assert c == active - max(1, round(active * cfg.keep_per_stop))
            active -= c
    assert batch.images.min() >= bounds[0].min() - 1e-6 and batch.images.max() <= bounds[1].max() + 1e-6
    torch.testing.assert_close(batch.labels, labels)


def test_inversion_optimises_towards_the_target_labels(ensemble, teachers, bounds):
    cfg = replace(TINY.inversion, iterations=60)
    labels = torch.arange(10)
    ce = []
    batch = invert(ensemble, labels, cfg, pixel_bounds=bounds, sparse=True, generator=torch.Generator().manual_seed(1),
                   on_step=lambda it, losses: ce.append(losses["ce"]))
    assert len(ce) == 60 and ce[-1] < 0.75 * ce[0]
    with torch.no_grad():
        logits = sum(sparse_forward(m, batch.images, batch.keep_idx).logits for m in teachers)
    assert (logits.argmax(1) == labels).float().mean() >= 0.3  # chance is 0.1



def test_stop_schedule_of_the_reference():
    cfg = replace(TINY.inversion, iterations=80)
    assert stop_iterations(cfg) == [2, 4, 8, 12]  # 2.5, 5, 10 and 15% of 80
    assert kept_count(16, 0.7, 4) == 4 and kept_count(196, 0.7, 4) == 47


def test_total_variation_is_zero_for_flat_images_and_grows_with_edges():
    flat = torch.ones(2, 1, 8, 8)
    edge = flat.clone()
    edge[1, :, :, 4:] = 0
    tv = total_variation(torch.cat([flat, edge]))
    assert tv[0] == 0 and tv[1] == 0 and tv[3] > 0


@pytest.mark.parametrize("fill", ["black", "mean"])
def test_stopped_patches_hold_exactly_the_fill_and_kept_patches_are_untouched(ensemble, bounds, tiny_data, fill):
    cfg = replace(TINY.inversion, iterations=20)
    labels = torch.arange(6)
    plain = invert(ensemble, labels, cfg, pixel_bounds=bounds, sparse=True, generator=torch.Generator().manual_seed(3))
    value = tiny_data.fill_value(fill)
    filled = invert(ensemble, labels, cfg, pixel_bounds=bounds, sparse=True, generator=torch.Generator().manual_seed(3),
                    fill_value=value)
    stopped = (filled.stop_step >= 0).view(6, 1, 4, 4).repeat_interleave(7, 2).repeat_interleave(7, 3)
    assert stopped.any() and (~stopped).any()
    assert (filled.images[stopped] == value.flatten()[0]).all()
    assert torch.equal(filled.images[~stopped], plain.images[~stopped])
    assert not (plain.images[stopped] == value.flatten()[0]).all()  # without a fill: the noise stays


def test_dense_inversion_has_nothing_to_fill(ensemble, bounds, tiny_data):
    cfg = replace(TINY.inversion, iterations=5)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = invert(ensemble, torch.arange(4), cfg, pixel_bounds=bounds, sparse=False, generator=gen())
    b = invert(ensemble, torch.arange(4), cfg, pixel_bounds=bounds, sparse=False, generator=gen(),
               fill_value=tiny_data.fill_value("black"))
    assert torch.equal(a.images, b.images)
