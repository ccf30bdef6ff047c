"""Stage 4: the student, its initialisation, the pool and one distillation step."""

from __future__ import annotations

from dataclasses import replace

import torch

from fedmitr.baselines import fedavg
from fedmitr.config import apply_overrides, preset_config
from fedmitr.distill import GlobalModel, Pool, PoolTensors, TeacherCache, distill_step, kd_loss, new_student
from fedmitr.inversion import SyntheticBatch
from fedmitr.models import build_model

TINY = preset_config("tiny")


def _pool(n: int = 16, kept: int = 5, with_targets: bool = True) -> PoolTensors:
    keep = torch.zeros(n, 16, dtype=torch.bool)
    for row in keep:
        row[torch.randperm(16)[:kept]] = True
    return PoolTensors(images=torch.randn(n, 1, 28, 28), keep_mask=keep, kept=kept,
                       targets=torch.softmax(torch.randn(n, 16, 10), -1) if with_targets else None,
                       weights=keep.float() if with_targets else None)


def test_distillation_loss_decreases_on_a_fixed_batch(ensemble):
    cfg = replace(TINY, distill=replace(TINY.distill, shift_px=0))
    torch.manual_seed(0)
    student = GlobalModel(build_model(TINY.model, 10, 1, 28), 10)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    pool = _pool()
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(16)
    losses = [distill_step(student, ensemble, pool, idx, optimizer=opt, cfg=cfg, generator=gen) for _ in range(40)]
    assert set(losses[0]) == {"kd", "token", "total"}
    assert losses[-1]["kd"] < 0.5 * losses[0]["kd"]
    # Random soft targets have an entropy floor, so the token loss only has to go down.
    assert losses[-1]["token"] < losses[0]["token"] - 0.05


def test_patches_with_weight_zero_are_left_out_of_the_token_loss(ensemble):
    """Changing the target of a patch that teaches nothing changes nothing."""
    cfg = replace(TINY, distill=replace(TINY.distill, shift_px=1, token_view="full"))
    pool = _pool()
    other = replace(pool, targets=torch.where(pool.keep_mask.unsqueeze(-1), pool.targets, torch.eye(10)[3]))
    results = []
    for p in (pool, other):
        torch.manual_seed(0)
        student = GlobalModel(build_model(TINY.model, 10, 1, 28), 10)
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
        results.append(distill_step(student, ensemble, p, torch.arange(16), optimizer=opt, cfg=cfg,
                                    generator=torch.Generator().manual_seed(1)))
    assert results[0] == results[1]


def test_cached_teacher_logits_equal_the_ones_computed_at_every_step(ensemble):
    """The cache computes each view once; a step that computes the teacher itself gets the same logits,
    with the plain average or with learned client weights."""
    from fedmitr.models import apply_shifts, sample_shifts, view_keep_idx

    pool = _pool(n=40, kept=6)
    cache = TeacherCache(ensemble, shift_px=1, flip=False)
    cache.add(pool.images[:25], pool.keep_mask[:25], kept=6, patch=7)  # two rounds of the pool
    cache.add(pool.images[25:], pool.keep_mask[25:], kept=6, patch=7)
    assert cache.enabled and cache.num_views == 9 and cache.table.shape == (40, 9, len(ensemble), 10)
    weighted = ensemble.weighted(torch.linspace(0.2, 1.0, len(ensemble)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(0, 40, (16,), generator=gen)
        shifts = sample_shifts(16, 1, gen)
        view = apply_shifts(pool.images[idx], shifts)
        with torch.no_grad():
            direct = ensemble(view, view_keep_idx(pool.keep_mask[idx], shifts, 7, 6)).logits
        torch.testing.assert_close(cache.lookup(idx, shifts), direct, rtol=0, atol=1e-5)
        with torch.no_grad():  # an ensemble whose weights moved reads the same cache
            direct = weighted(view, view_keep_idx(pool.keep_mask[idx], shifts, 7, 6)).logits
        torch.testing.assert_close(cache.lookup(idx, shifts, weighted), direct, rtol=0, atol=1e-5)
        assert not torch.allclose(cache.lookup(idx, shifts), direct)
    assert not TeacherCache(ensemble, shift_px=16, flip=True).enabled  # 2,178 views: computed per step instead


def test_the_aux_head_starts_from_the_students_class_head(ensemble, tiny_data):
    student = new_student(TINY, tiny_data, ensemble, torch.device("cpu"))
    torch.testing.assert_close(student.aux_head.weight, student.vit.head.weight)
    torch.testing.assert_close(student.aux_head.bias, student.vit.head.bias)
    assert student.aux_head.weight.data_ptr() != student.vit.head.weight.data_ptr()  # a copy, trained on its own


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(6, 10)
    assert kd_loss(logits, logits, 4.0).abs() < 1e-6
    assert kd_loss(logits, logits.flip(1), 4.0) > 0


def test_student_starts_from_the_client_average_or_fresh(ensemble, teachers, tiny_data):
    avg = fedavg(teachers).state_dict()
    student = new_student(TINY, tiny_data, ensemble, torch.device("cpu"))
    for key, value in student.vit.state_dict().items():
        torch.testing.assert_close(value, avg[key])
    fresh = new_student(apply_overrides(TINY, {"distill": {"init": "fresh"}}), tiny_data, ensemble,
                        torch.device("cpu"))
    assert not torch.allclose(fresh.vit.head.weight, avg["head.weight"])


def test_pool_concatenates_rounds():
    pool = Pool()
    for b in (3, 5):
        batch = SyntheticBatch(images=torch.randn(b, 1, 28, 28), labels=torch.zeros(b, dtype=torch.long),
                               keep_idx=torch.arange(4).expand(b, -1), stop_step=torch.full((b, 16), -1),
                               iterations=1, seconds=0.0)
        pool.add(batch, None)
    tensors = pool.tensors()
    assert len(pool) == 8 and tensors.images.shape == (8, 1, 28, 28) and tensors.keep_mask.shape == (8, 16)
    assert tensors.kept == 4 and tensors.sparse and tensors.targets is None
    assert tensors.keep_mask.sum(1).tolist() == [4] * 8 and tensors.keep_mask[:, :4].all()


import pytest  # noqa: E402


@pytest.mark.parametrize("view", ["whole", "kept"])
def test_the_view_decides_which_patches_teacher_and_student_see(ensemble, monkeypatch, view):
    """``distill.view = whole``: the teacher's and the student's inputs hold every patch of a sparse
    image; ``kept``: only its kept patches (5 of 16 here), for both."""
    import fedmitr.distill
    import fedmitr.ensemble

    seen = {"teacher": [], "student": []}

    def spy(who, original):
        def forward(model, images, keep_idx=None, *rest):
            seen[who].append(16 if keep_idx is None else keep_idx.shape[1])
            return original(model, images, keep_idx, *rest)
        return forward

    monkeypatch.setattr(fedmitr.ensemble, "sparse_forward", spy("teacher", fedmitr.ensemble.sparse_forward))
    monkeypatch.setattr(fedmitr.distill, "sparse_forward", spy("student", fedmitr.distill.sparse_forward))
    cfg = apply_overrides(TINY, {"distill": {"view": view, "teacher_cache": False}})
    torch.manual_seed(0)
    student = GlobalModel(build_model(TINY.model, 10, 1, 28), 10)
    pool = _pool(kept=5)
    distill_step(student, ensemble, pool, torch.arange(8), optimizer=torch.optim.AdamW(student.parameters()),
                 cfg=cfg, generator=torch.Generator().manual_seed(0))
    expected = 16 if view == "whole" else 5
    assert seen["teacher"] and seen["student"]
    assert set(seen["teacher"]) == {expected} and set(seen["student"]) == {expected}
