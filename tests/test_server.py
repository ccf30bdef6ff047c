"""Server stages on the tiny preset: sparse forward, sparse inversion, token relabel, distillation."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedmitr.cli import main
from fedmitr.clients import train_clients
from fedmitr.data import partition
from fedmitr.runtime import make_accelerator
from fedmitr.config import ModelConfig, RelabelConfig, preset_config
from fedmitr.distill import GlobalModel, distill_step
from fedmitr.inversion import invert, kept_count, roll_patch_indices, stop_iterations
from fedmitr.models import build_model, patchify, sparse_forward
from fedmitr.relabel import RELABEL_MODES, neighbourhoods, relabel

TINY = preset_config("tiny")


@pytest.fixture(scope="module")
def teachers(tiny_data):
    """Three tiny clients trained for a few seconds on skewed MNIST (weak, but input-sensitive)."""
    cfg = replace(TINY.clients, epochs=8)
    part = partition(tiny_data.train.labels.numpy(), 3, 0.5, 10, seed=0)
    clients = train_clients(tiny_data, part, TINY.model, cfg, make_accelerator(), seed=0)
    return [c.model for c in clients]


@pytest.fixture(scope="module")
def bounds(tiny_data):
    return tiny_data.pixel_bounds()


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


def test_roll_patch_indices_follow_whole_patch_rolls():
    x = torch.randn(1, 1, 28, 28)
    model = build_model(ModelConfig(), 10, 1, 28)
    keep = torch.tensor([[0, 3, 6, 13]])
    rolled = torch.roll(x, shifts=(7, 14), dims=(2, 3))
    moved = roll_patch_indices(keep, 4, 1, 2)
    torch.testing.assert_close(patchify(model, rolled)[0, moved[0]], patchify(model, x)[0, keep[0]])


@pytest.mark.parametrize("sparse", [True, False])
def test_inversion_mask_bookkeeping(teachers, bounds, sparse):
    cfg = replace(TINY.inversion, iterations=20, jitter_px=2)
    labels = torch.arange(8) % 10
    batch = invert(teachers, labels, cfg, bounds, sparse, torch.Generator().manual_seed(0))
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
    torch.testing.assert_close(batch.density.sum(1), torch.ones(8))
    assert (batch.high_mask.sum(1) == kept_count(n, cfg.keep_per_stop, len(stops))).all()
    assert batch.images.min() >= bounds[0].min() - 1e-6 and batch.images.max() <= bounds[1].max() + 1e-6
    torch.testing.assert_close(batch.labels, labels)


def test_inversion_optimises_towards_the_target_labels(teachers, bounds):
    cfg = replace(TINY.inversion, iterations=60)
    labels = torch.arange(10)
    ce = []
    batch = invert(teachers, labels, cfg, bounds, True, torch.Generator().manual_seed(1),
                   on_step=lambda it, losses: ce.append(losses["ce"]))
    assert len(ce) == 60 and ce[-1] < 0.75 * ce[0]
    with torch.no_grad():
        logits = sum(sparse_forward(m, batch.images, batch.keep_idx).logits for m in teachers)
    assert (logits.argmax(1) == labels).float().mean() >= 0.3  # chance is 0.1


@pytest.mark.parametrize("mode", RELABEL_MODES)
def test_relabel_targets_are_distributions_with_label_on_high_patches(teachers, bounds, mode):
    cfg = replace(TINY.inversion, iterations=10)
    batch = invert(teachers, torch.arange(6), cfg, bounds, True, torch.Generator().manual_seed(0))
    out = relabel(teachers, batch, RelabelConfig(mode=mode), 10)
    assert out.targets.shape == (6, 16, 10)
    assert (out.targets >= 0).all()
    torch.testing.assert_close(out.targets.sum(-1), torch.ones(6, 16))
    high = batch.high_mask
    assert (out.targets[high].argmax(-1) == batch.labels.unsqueeze(1).expand(-1, 16)[high]).all()
    assert (out.targets[high].max(-1).values == 1).all()
    assert torch.equal(out.relabelled, ~high)


def test_neighbourhoods_are_nine_distinct_patches_around_each_patch():
    hood = neighbourhoods(4)
    assert hood.shape == (16, 9)
    for i, row in enumerate(hood.tolist()):
        assert len(set(row)) == 9 and i in row


def test_distillation_loss_decreases_on_a_fixed_batch(teachers):
    cfg = replace(TINY, distill=replace(TINY.distill, shift_px=0))
    torch.manual_seed(0)
    student = GlobalModel(build_model(TINY.model, 10, 1, 28), 10)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    images = torch.randn(16, 1, 28, 28)
    keep = torch.stack([torch.randperm(16)[:5] for _ in range(16)])
    targets = torch.softmax(torch.randn(16, 16, 10), -1)
    gen = torch.Generator().manual_seed(0)
    losses = [distill_step(student, teachers, images, keep, targets, opt, cfg, gen) for _ in range(40)]
    assert set(losses[0]) == {"kd", "token", "total"}
    assert losses[-1]["kd"] < 0.5 * losses[0]["kd"]
    # Random soft targets have an entropy floor, so the token loss only has to go down.
    assert losses[-1]["token"] < losses[0]["token"] - 0.05


@pytest.mark.parametrize("method", ["fedmitr", "dense-kd"])
def test_cli_tiny_inversion_method_writes_a_curve(tmp_path, method, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--methods", f"fedavg,{method}", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["methods"][method]
    assert len(m["curve"]) == TINY.distill.rounds and all(0 <= a <= 1 for a in m["curve"])
    assert m["accuracy"] == m["curve"][-1] and m["seconds"] > 0
    assert m["synthetic_images"] == TINY.distill.rounds * TINY.inversion.images_per_round
    assert (out / "models" / f"{method}.safetensors").exists()
    assert method in capsys.readouterr().out


def test_bench_tiny_writes_tables(tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--preset", "tiny", "--alphas", "0.5,iid", "--seeds", "0", "--methods",
            "fedavg,ensemble,dense-kd,fedmitr", "--out", str(out)]
    assert main(argv) == 0
    records = json.loads((out / "bench.json").read_text())["records"]
    methods = {r["method"] for r in records}
    assert methods == {"fedavg", "ensemble", "dense-kd", "fedmitr", "fedmitr@time"}
    assert {r["alpha"] for r in records} == {"0.5", "iid"}
    assert all(r["inversion_speedup"] > 0 for r in records)
    table = (out / "bench.md").read_text()
    assert "| fedmitr |" in table and "inversion_speedup" in table and "α=iid" in table
    assert (out / "tradeoff.html").exists()
    merged = tmp_path / "merged"
    assert main(["bench", "--merge", str(out / "bench.json"), str(out / "bench.json"), "--out", str(merged)]) == 0
    assert len(json.loads((merged / "bench.json").read_text())["records"]) == 2 * len(records)
    assert main(["bench", "--merge", str(tmp_path / "missing.json"), "--out", str(merged)]) == 2


def test_timm_named_model_with_resize_runs_the_whole_pipeline(tmp_path):
    """The gpu preset's path (a timm model name, inputs resized to the model) without downloads."""
    from fedmitr.config import apply_overrides
    from fedmitr.pipeline import run

    cfg = apply_overrides(TINY, {
        "data": {"dataset": "digits", "num_clients": 2},
        "model": {"arch": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32},
        "clients": {"epochs": 1}, "methods": "fedavg,fedmitr",
        "inversion": {"iterations": 4, "images_per_round": 4}, "distill": {"rounds": 1, "steps_per_round": 2},
    })
    result = run(cfg, out_dir=tmp_path / "run")
    assert result.dataset.image_size == 16
    assert result.methods["fedmitr"].model.patch_embed.img_size == (32, 32)
    assert 0 <= result.metrics["methods"]["fedmitr"]["accuracy"] <= 1
    assert result.metrics["methods"]["fedmitr"]["patches"] == 4


def test_bench_speed_only_times_dense_and_sparse(tmp_path, capsys):
    out = tmp_path / "speed"
    assert main(["bench", "--preset", "tiny", "--speed-only", "--repeats", "1", "--out", str(out)]) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert len(speed["seconds"]["dense"]) == len(speed["seconds"]["sparse"]) == 1
    assert speed["inversion_speedup"] == pytest.approx(speed["dense_mean"] / speed["sparse_mean"])
    assert speed["active_patches_at_end"] < speed["patches"] == 16
    assert "inversion_speedup" in capsys.readouterr().out
