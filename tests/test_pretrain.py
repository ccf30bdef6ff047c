"""Formula-driven pretraining: drawn fractals, a backbone, and clients that start from it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import fedmitr
from fedmitr.config import ModelConfig, apply_overrides, preset_config
from fedmitr.errors import ConfigError
from fedmitr.pretrain import (PRETRAINED_DIR, PretrainConfig, architecture, checkpoint_name, fractal_set, load_backbone,
                              pretrain, read_backbone, save_backbone)
from fedmitr.training import foreground

SMALL = PretrainConfig(classes=4, instances=6, epochs=2, batch_size=8)


def test_fractals_are_drawn_the_same_for_a_seed_and_differ_between_classes():
    images, labels = fractal_set(SMALL, 28)
    again, _ = fractal_set(SMALL, 28)
    assert images.shape == (24, 28, 28) and images.dtype == np.float32 and labels.tolist() == sorted(labels.tolist())
    assert np.array_equal(images, again)
    assert 0 <= images.min() and images.max() <= 1
    ink = (images > 0.3).mean(axis=(1, 2))
    assert (ink > 0.01).all() and (ink < 0.6).all()  # neither empty nor a blob
    means = np.stack([images[labels == c].mean(0) for c in range(4)])
    within = np.mean([np.abs(images[labels == c] - means[c]).mean() for c in range(4)])
    between = np.mean([np.abs(means[a] - means[b]).mean() for a in range(4) for b in range(a + 1, 4)])
    assert between > 0.3 * within  # classes are shapes of their own, not noise


def test_foreground_marks_the_patches_with_ink():
    unit = torch.zeros(1, 1, 28, 28)
    unit[0, 0, 8:12, 8:12] = 1.0  # ink inside patch (1, 1)
    fg = foreground(unit, 7)
    assert fg.view(4, 4).nonzero().tolist() == [[1, 1]]


def _imports(module: str) -> set[str]:
    """Every fedmitr module that ``fedmitr/<module>.py`` imports, at its top or inside a function."""
    tree = ast.parse((Path(fedmitr.__file__).parent / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("fedmitr.")}


def test_clients_and_pretraining_share_their_pieces_through_one_module_not_each_other():
    """The clients start from a pretrained backbone, so clients imports pretrain; pretrain must not
    import clients back (the schedule and the foreground both live in fedmitr.training)."""
    assert "fedmitr.clients" not in _imports("pretrain")
    assert "fedmitr.training" in _imports("pretrain") and "fedmitr.training" in _imports("clients")
    assert "fedmitr.clients" not in _imports("training") and "fedmitr.pretrain" not in _imports("training")


def test_pretraining_writes_a_backbone_that_loads_into_the_clients_start(tmp_path, mnist5k):
    cfg = preset_config("tiny")
    backbone = pretrain(cfg.model, SMALL)
    assert not any(k.startswith("head.") for k in backbone.state)
    rec = backbone.record
    assert rec["architecture"] == architecture(cfg.model, 28, 1) and rec["images"] == 24
    assert 0 <= rec["held_out_image_accuracy"] <= 1 and rec["train_seconds"] >= 0  # rounded: 0.0 on a fast machine
    path = save_backbone(backbone, tmp_path)
    assert path.name == checkpoint_name(rec["architecture"]) and read_backbone(path).record == rec

    from fedmitr.clients import initial_model

    run_cfg = apply_overrides(cfg, {"model": {"init": str(path)}}).validate()
    model = initial_model(run_cfg.model, mnist5k, seed=0)
    for key, value in backbone.state.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert model.head.out_features == 10  # the head is the task's own, not the fractals'

    wrong = dataclasses.replace(cfg.model, embed_dim=48, num_heads=2)
    with pytest.raises(ConfigError, match="was made for"):
        load_backbone(initial_model(wrong, mnist5k, seed=0), str(path), wrong, image_size=28, channels=1)


def test_the_bundled_backbones_fit_the_cpu_and_cpu_49_models(mnist5k):
    from fedmitr.clients import initial_model

    for preset in ("cpu", "cpu-49"):
        cfg = preset_config(preset).model
        assert (PRETRAINED_DIR / checkpoint_name(architecture(cfg, 28, 1))).is_file()
        model = initial_model(dataclasses.replace(cfg, init="fractal"), mnist5k, seed=0)
        record = read_backbone(PRETRAINED_DIR / checkpoint_name(architecture(cfg, 28, 1))).record
        assert record["kind"] == "fractal" and record["held_out_patch_accuracy"] > 0.05  # chance: 1 in 101
        assert model.pos_embed.shape[1] == 1 + cfg.patch_grid ** 2
    with pytest.raises(ConfigError, match="no bundled fractal backbone for this architecture"):
        initial_model(dataclasses.replace(preset_config("tiny").model, init="fractal"), mnist5k, seed=0)
    with pytest.raises(ConfigError, match="model init must be"):
        apply_overrides(preset_config("cpu"), {"model": {"init": "imagenet"}}).validate()


def test_the_clients_token_loss_makes_their_patch_tokens_name_the_class(tiny_data):
    """The control of pretraining: a token loss on the clients' own data."""
    from fedmitr.clients import patch_accuracy, train_clients
    from fedmitr.data import Split, partition
    from fedmitr.runtime import make_accelerator

    cfg = preset_config("tiny")
    part = partition(tiny_data.train.labels.numpy(), 2, None, 10, seed=0)
    shard = Split(tiny_data.train.images[torch.from_numpy(part.client_indices[0])],
                  tiny_data.train.labels[torch.from_numpy(part.client_indices[0])])
    accuracy = {}
    for weight in (0.0, 1.0):
        clients_cfg = dataclasses.replace(cfg.clients, epochs=10, token_weight=weight)
        client = train_clients(tiny_data, part, cfg.model, clients_cfg, accelerator=make_accelerator(), seed=0)[0]
        accuracy[weight] = patch_accuracy(client.model, shard, (tiny_data.mean, tiny_data.std))
    assert 0 <= accuracy[0.0] <= 1 and accuracy[1.0] > accuracy[0.0] + 0.1
