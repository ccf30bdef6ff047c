"""The ViT factory and the sparse forward: CLS plus a subset of patch tokens over timm's modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedmitr.config import ModelConfig
from fedmitr.errors import ConfigError
from fedmitr.models import build_model, random_shift, sparse_forward


def test_sparse_forward_with_all_patches_matches_timm():
    model = build_model(ModelConfig(), 10, 1, 28).eval()
    x = torch.randn(4, 1, 28, 28)
    expected = model(x)
    dense = sparse_forward(model, x)
    all_idx = sparse_forward(model, x, torch.arange(16).expand(4, -1))
    torch.testing.assert_close(dense.logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(all_idx.logits, expected, rtol=1e-4, atol=1e-5)
    assert dense.cls_attention.shape == (4, 16) and dense.tokens.shape == (4, 16, 64)
    # CLS attends to itself too, so its attention over the patches sums to < 1 (and > 0).
    assert ((dense.cls_attention.sum(1) > 0) & (dense.cls_attention.sum(1) < 1)).all()


def test_sparse_forward_uses_only_kept_patches_and_less_work():
    model = build_model(ModelConfig(), 10, 1, 28).eval()
    x = torch.randn(2, 1, 28, 28)
    keep = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]])
    out = sparse_forward(model, x, keep)
    assert out.tokens.shape == (2, 4, 64) and out.cls_attention.shape == (2, 4)
    # Pixels of stopped patches do not influence the output at all.
    x2 = x.clone().view(2, 1, 4, 7, 4, 7)
    x2[0, :, 3, :, 0, :] += 10.0  # patch 12 of image 0, not kept
    torch.testing.assert_close(sparse_forward(model, x2.view(2, 1, 28, 28), keep).logits, out.logits)

    def flops(keep_idx):
        with FlopCounterMode(display=False) as counter:
            sparse_forward(model, x, keep_idx)
        return counter.get_total_flops()

    assert flops(keep) < 0.4 * flops(None)



def test_a_patch_grid_that_does_not_divide_the_image_is_a_config_error():
    with pytest.raises(ConfigError, match="not divisible by patch_grid 5"):
        build_model(ModelConfig(patch_grid=5), 10, 1, 28)


def test_random_shift_moves_whole_images_by_at_most_the_shift():
    x = torch.zeros(8, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    rows, cols = (out[:, 0] == 1.0).nonzero(as_tuple=True)[1:]
    assert len(rows) == 8 and (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert torch.equal(random_shift(x, 0), x)
