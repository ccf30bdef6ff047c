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


def test_patch_maps_move_with_whole_patch_shifts_and_flips():
    """A shift by exactly one patch moves every patch's value to its neighbour; a flip mirrors them."""
    from fedmitr.models import Shifts, apply_shifts, shift_patch_maps

    values = torch.arange(16.0).view(1, 1, 16)  # patch i holds the value i (a 4x4 grid of 7 px patches)
    s = 7
    down = Shifts(dy=torch.tensor([0]), dx=torch.tensor([s]), flip=None, max_shift=s)  # view row r = source r - 1
    moved = shift_patch_maps(values, down, 7).view(4, 4)
    assert moved[1:].tolist() == values.view(4, 4)[:-1].tolist()  # rows move down by one patch
    assert moved[0].tolist() == values.view(4, 4)[0].tolist()  # the edge repeats (replicate padding)
    flipped = shift_patch_maps(values, Shifts(dy=None, dx=None, flip=torch.tensor([True]), max_shift=0), 7)
    assert flipped.view(4, 4).tolist() == values.view(4, 4).flip(-1).tolist()
    # The image moves the same way: patch 5's pixels land where patch 9 was.
    image = values.view(1, 1, 4, 4).repeat_interleave(7, 2).repeat_interleave(7, 3)
    assert apply_shifts(image, down)[0, 0, 14, 7].item() == 5.0


def test_a_sub_patch_shift_mixes_patch_values_by_area():
    from fedmitr.models import Shifts, shift_patch_maps

    values = torch.zeros(1, 1, 16)
    values[0, 0, 5] = 1.0  # one patch (row 1, col 1) holds 1
    right = Shifts(dy=torch.tensor([3]), dx=torch.tensor([1]), flip=None, max_shift=3)  # 2 px right
    moved = shift_patch_maps(values, right, 7).view(4, 4)
    assert moved[1, 1].item() == pytest.approx(5 / 7) and moved[1, 2].item() == pytest.approx(2 / 7)
    assert moved.sum().item() == pytest.approx(1.0)


def test_the_kept_view_follows_the_shift():
    from fedmitr.models import Shifts, view_keep_idx

    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, [5, 6, 9, 10]] = True  # the centre 2x2 patches
    still = Shifts(dy=torch.tensor([2]), dx=torch.tensor([2]), flip=None, max_shift=2)  # an offset of 0
    assert view_keep_idx(keep, still, 7, 4).tolist() == [[5, 6, 9, 10]]
    one_left = Shifts(dy=torch.tensor([7]), dx=torch.tensor([14]), flip=None, max_shift=7)  # 7 px left, none down
    assert view_keep_idx(keep, one_left, 7, 4).tolist() == [[4, 5, 8, 9]]
