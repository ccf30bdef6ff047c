"""Stage 3 on the kept view: information density, H, the per-patch targets and their diagnostics."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedmitr.config import RELABEL_MODES, RelabelConfig, preset_config
from fedmitr.inversion import SyntheticBatch, invert, kept_count, stop_iterations
from fedmitr.relabel import (BACKGROUND, GATED, LABEL, NOTHING, RELABEL, blank_target, diagnostic_counts,
                             diagnostics, diagnostics_text, high_set_size, information_density, keep_mask,
                             neighbourhoods, relabel, score_patches)

TINY = preset_config("tiny")


@pytest.fixture(scope="module")
def sparse_batch(ensemble, bounds):
    """Six sparse images: 8 of 16 patches kept (two stops keeping 70%)."""
    cfg = replace(TINY.inversion, iterations=12, keep_per_stop=0.7)
    return invert(ensemble, torch.arange(6), cfg, pixel_bounds=bounds, sparse=True,
                  generator=torch.Generator().manual_seed(0))


def with_stopped_noise(batch: SyntheticBatch, value: float) -> SyntheticBatch:
    """The same batch with every stopped patch's pixels replaced: nothing on the kept view may change."""
    images = batch.images.clone()
    stopped = ~keep_mask(batch, 16)
    pixels = stopped.view(-1, 1, 4, 4).float().repeat_interleave(7, 2).repeat_interleave(7, 3).bool()
    images[pixels] = value
    return replace(batch, images=images)


def test_density_and_h_come_from_the_kept_view(ensemble, sparse_batch):
    scores = score_patches(ensemble, sparse_batch, 8)
    kept = keep_mask(sparse_batch, 16)
    assert kept.sum(1).tolist() == [sparse_batch.keep_idx.shape[1]] * 6 and not kept.all()
    assert (scores.density[~kept] == 0).all()  # a stopped patch carries no density
    torch.testing.assert_close(scores.density.sum(1), torch.ones(6))
    assert (scores.high_mask & ~kept).sum() == 0  # H is a subset of the kept set, on every image
    assert (scores.high_mask.sum(1) == 8).all()
    # |H| larger than the kept set: H is the kept set.
    assert torch.equal(score_patches(ensemble, sparse_batch, 16).high_mask, kept)
    # Stopped noise does not move anything: no pass sees it.
    noisy = with_stopped_noise(sparse_batch, 3.0)
    torch.testing.assert_close(information_density(ensemble, noisy), scores.density)


@pytest.mark.parametrize("mode", RELABEL_MODES)
def test_relabels_are_computed_on_the_kept_view(ensemble, sparse_batch, mode):
    cfg = RelabelConfig(mode=mode, stopped="ignore")
    scores = score_patches(ensemble, sparse_batch, 4)
    out = relabel(ensemble, sparse_batch, scores, cfg, num_classes=10)
    noisy = relabel(ensemble, with_stopped_noise(sparse_batch, -2.0), scores, cfg, num_classes=10)
    torch.testing.assert_close(noisy.targets, out.targets)  # the stopped patches' pixels play no part
    kept = keep_mask(sparse_batch, 16)
    assert out.targets.shape == (6, 16, 10) and (out.targets >= 0).all()
    torch.testing.assert_close(out.targets.sum(-1), torch.ones(6, 16))
    assert torch.equal(out.source == LABEL, scores.high_mask)
    assert torch.equal(out.source == RELABEL, kept & ~scores.high_mask)
    assert torch.equal(out.source == NOTHING, ~kept) and (out.weights[~kept] == 0).all()
    high = scores.high_mask
    assert (out.targets[high].argmax(-1) == sparse_batch.labels.unsqueeze(1).expand(-1, 16)[high]).all()
    assert (out.agreement[out.source == RELABEL] >= 0).all() and (out.agreement[out.source == RELABEL] <= 1).all()


def test_the_neighbourhood_window_leaves_stopped_patches_out(ensemble, sparse_batch):
    """A kept patch whose whole window but itself is stopped is relabelled from itself alone."""
    scores = score_patches(ensemble, sparse_batch, 1)
    out = relabel(ensemble, sparse_batch, scores, RelabelConfig(mode="neighbourhood", stopped="ignore"), num_classes=10)
    hood = neighbourhoods(4)
    kept = keep_mask(sparse_batch, 16)
    b, i = next((b, i) for b in range(6) for i in range(16) if out.source[b, i] == RELABEL)
    window = hood[i][kept[b, hood[i]]].view(1, -1)
    with torch.no_grad():
        logits = ensemble(sparse_batch.images[b:b + 1], window).logits
    torch.testing.assert_close(out.targets[b, i], torch.softmax(logits[0], -1))


@pytest.mark.parametrize("stopped", ["uniform", "blank"])
def test_stopped_patches_teach_a_background_target_when_asked(ensemble, sparse_batch, bounds, stopped):
    scores = score_patches(ensemble, sparse_batch, 4)
    black = bounds[0]  # the digits' background, the fill of their stopped patches
    out = relabel(ensemble, sparse_batch, scores, RelabelConfig(stopped=stopped, stopped_weight=1.0), num_classes=10,
                  background=black)
    kept = keep_mask(sparse_batch, 16)
    assert (out.source[~kept] == BACKGROUND).all() and (out.weights[~kept] == 1).all()
    expected = torch.full((10,), 0.1) if stopped == "uniform" else blank_target(ensemble, black, 1.0, 1)
    torch.testing.assert_close(out.targets[~kept], expected.expand(int((~kept).sum()), -1))


def test_gating_keeps_only_relabels_the_clients_agree_on(ensemble, sparse_batch):
    scores = score_patches(ensemble, sparse_batch, 2)
    free = relabel(ensemble, sparse_batch, scores, RelabelConfig(stopped="ignore"), num_classes=10)
    candidates = free.source == RELABEL
    threshold = free.agreement[candidates].max().item()  # the best-agreed relabels pass, the others not
    gated = relabel(ensemble, sparse_batch, scores,
                    RelabelConfig(gating=True, min_agreement=threshold, min_confidence=0.0, stopped="ignore"),
                    num_classes=10)
    passed = candidates & (free.agreement >= threshold)
    assert torch.equal(gated.source == RELABEL, passed) and torch.equal(gated.source == GATED, candidates & ~passed)
    assert (gated.weights[gated.source == GATED] == 0).all() and (gated.weights[passed] == 1).all()
    assert 0 < passed.sum() < candidates.sum()  # some pass, some do not: the test can tell


def test_diagnostics_count_what_each_patch_taught(ensemble, sparse_batch):
    scores = score_patches(ensemble, sparse_batch, 4)
    out = relabel(ensemble, sparse_batch, scores, RelabelConfig(stopped="ignore"), num_classes=10)
    d = diagnostics(diagnostic_counts(sparse_batch, scores, out, 10))
    kept = keep_mask(sparse_batch, 16)
    assert d["high_kept_share"] == 1.0 and d["kept_share"] == pytest.approx(kept.float().mean().item())
    assert d["taught"]["label"] == pytest.approx(4 / 16) and d["taught"]["nothing"] == pytest.approx((~kept).float().mean().item())
    assert sum(d["relabel_histogram"]) == int((out.source == RELABEL).sum()) == d["relabelled_kept_patches"]
    assert d["label_histogram"] == [1] * 6 + [0] * 4
    wrong = (out.targets.argmax(-1) != sparse_batch.labels.unsqueeze(1)) & (out.source == RELABEL)
    assert d["kept_relabel_disagrees_share"] == pytest.approx(int(wrong.sum()) / d["relabelled_kept_patches"])
    assert 0 < d["mean_relabel_confidence"] <= 1
    assert "H is kept" in diagnostics_text(d) and "Relabels" in diagnostics_text(d)


def test_neighbourhoods_are_nine_distinct_patches_around_each_patch():
    hood = neighbourhoods(4)
    assert hood.shape == (16, 9)
    for i, row in enumerate(hood.tolist()):
        assert len(set(row)) == 9 and i in row


def test_dense_images_are_scored_on_every_patch(ensemble):
    batch = SyntheticBatch(images=torch.randn(4, 1, 28, 28), labels=torch.arange(4),
                           keep_idx=torch.arange(16).expand(4, -1), stop_step=torch.full((4, 16), -1), iterations=1,
                           seconds=0.0)
    scores = score_patches(ensemble, batch, 5)
    assert (scores.high_mask.sum(1) == 5).all() and (scores.density > 0).all()
    for density, high in zip(scores.density, scores.high_mask):
        assert density[high].min() >= density[~high].max()


def test_high_set_size_defaults_to_what_sparse_inversion_keeps():
    inv = TINY.inversion
    assert high_set_size(16, RelabelConfig(high_ratio=None), inv) == kept_count(16, inv.keep_per_stop, len(stop_iterations(inv)))
    assert high_set_size(16, RelabelConfig(high_ratio=0.5), inv) == 8
    assert high_set_size(16, RelabelConfig(high_ratio=0.01), inv) == 1
