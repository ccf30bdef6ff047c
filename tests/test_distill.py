"""Stage 4: the student, its initialisation, the pool and one distillation step."""

from __future__ import annotations

from dataclasses import replace

import torch

from fedmitr.baselines import fedavg
from fedmitr.config import apply_overrides, preset_config
from fedmitr.distill import GlobalModel, Pool, distill_step, kd_loss, new_student
from fedmitr.inversion import SyntheticBatch
from fedmitr.models import build_model

TINY = preset_config("tiny")


def test_distillation_loss_decreases_on_a_fixed_batch(ensemble):
    cfg = replace(TINY, distill=replace(TINY.distill, shift_px=0))
    torch.manual_seed(0)
    student = GlobalModel(build_model(TINY.model, 10, 1, 28), 10)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    images = torch.randn(16, 1, 28, 28)
    keep = torch.stack([torch.randperm(16)[:5] for _ in range(16)])
    targets = torch.softmax(torch.randn(16, 16, 10), -1)
    gen = torch.Generator().manual_seed(0)
    losses = [distill_step(student, ensemble, images, keep_idx=keep, targets=targets, optimizer=opt, cfg=cfg,
                           generator=gen) for _ in range(40)]
    assert set(losses[0]) == {"kd", "token", "total"}
    assert losses[-1]["kd"] < 0.5 * losses[0]["kd"]
    # Random soft targets have an entropy floor, so the token loss only has to go down.
    assert losses[-1]["token"] < losses[0]["token"] - 0.05



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
    images, keep_idx, targets = pool.tensors()
    assert len(pool) == 8 and images.shape == (8, 1, 28, 28) and keep_idx.shape == (8, 4) and targets is None
