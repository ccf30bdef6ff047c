"""The generator baselines: DENSE (`dense-gen`) and Co-Boosting (`co-boosting`) on the same clients."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from fedmitr.config import apply_overrides, preset_config
from fedmitr.ensemble import Ensemble
from fedmitr.errors import ConfigError
from fedmitr.generators import ConvGenerator, disagreement, generate, learn_client_weights, perturb
from fedmitr.distill import GlobalModel
from fedmitr.methods import METHODS
from fedmitr.models import build_model
from fedmitr.pipeline import run

TINY = preset_config("tiny")


def test_the_generator_makes_images_of_the_right_shape_inside_the_pixel_range(bounds):
    low, high = bounds
    g = ConvGenerator(16, 1, 28, width=8, low=low, high=high)
    x = g(torch.randn(5, 16))
    assert x.shape == (5, 1, 28, 28)
    assert torch.all(x >= low) and torch.all(x <= high)
    odd = ConvGenerator(16, 3, 30, width=8, low=torch.zeros(1, 3, 1, 1), high=torch.ones(1, 3, 1, 1))
    assert odd(torch.randn(2, 16)).shape == (2, 3, 30, 30)  # a size not divisible by 4 is resized


@pytest.mark.parametrize("hard", [False, True])
def test_a_trained_generator_makes_images_the_ensemble_labels_as_asked(ensemble, bounds, hard):
    cfg = apply_overrides(TINY, {"generator": {"iterations": 40, "lr": 0.01}}).generator
    labels = torch.arange(20) % 10
    student = build_model(TINY.model, 10, 1, 28)
    batch = generate(ensemble, labels, cfg, pixel_bounds=bounds, generator=torch.Generator().manual_seed(0),
                     student=student, hard=hard)
    with torch.no_grad():
        agree = float((ensemble(batch.images).logits.argmax(1) == labels).float().mean())
    assert agree >= 0.5  # chance is 0.1
    assert batch.keep_idx.shape == (20, 16) and torch.all(batch.stop_step == -1)  # no patch mask
    # Re-initialised from the generator's seed each round: the same draw gives the same images.
    again = generate(ensemble, labels, cfg, pixel_bounds=bounds, generator=torch.Generator().manual_seed(0),
                     student=student, hard=hard)
    torch.testing.assert_close(again.images, batch.images)


def test_a_weighted_ensemble_is_the_weighted_mean_of_its_clients(teachers):
    x = torch.randn(4, 1, 28, 28)
    plain, weighted = Ensemble(teachers), Ensemble(teachers).weighted(torch.tensor([1.0, 0.0, 3.0]))
    with torch.no_grad():
        each = [m.eval()(x) for m in teachers]
        torch.testing.assert_close(plain(x).logits, sum(each) / 3, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weighted(x).logits, (each[0] + 3 * each[2]) / 4, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one non-negative weight per model"):
        Ensemble(teachers, weights=torch.zeros(3))


def test_client_weights_move_away_from_a_client_that_is_wrong_and_stay_in_0_1(teachers, tiny_data):
    good = teachers[0]
    wrong = copy.deepcopy(good)
    with torch.no_grad():  # predicts the next class: always wrong on images the good client labels
        wrong.head.weight.copy_(good.head.weight.roll(1, 0))
        wrong.head.bias.copy_(good.head.bias.roll(1, 0))
    images = tiny_data.test.images[:96]
    with torch.no_grad():
        labels = good.eval()(images).argmax(1)
    cfg = apply_overrides(TINY, {"generator": {"weight_lr": 0.1, "weight_passes": 3}}).generator
    learned = learn_client_weights(Ensemble([good, wrong]), images, labels, cfg, round_index=1,
                                   generator=torch.Generator().manual_seed(0))
    w = learned.weights
    assert w is not None and torch.all(w >= 0) and torch.all(w <= 1)
    assert w[1] < w[0] and w[1] < 1  # the wrong client counts less
    off = apply_overrides(TINY, {"generator": {"weight_lr": 0.0}}).generator
    assert learn_client_weights(Ensemble([good, wrong]), images, labels, off, round_index=1,
                                generator=torch.Generator()).weights is None


def test_perturbed_samples_are_harder_for_the_student_and_stay_valid(ensemble, bounds, tiny_data):
    torch.manual_seed(0)
    student = GlobalModel(build_model(TINY.model, 10, 1, 28), 10)
    images = tiny_data.test.images[:32]
    cfg = apply_overrides(TINY, {"generator": {"perturb_steps": 3, "perturb_eps": 0.1}}).generator
    harder = perturb(student, ensemble, images, cfg, pixel_bounds=bounds)
    low, high = bounds
    assert torch.all(harder >= low - 1e-6) and torch.all(harder <= high + 1e-6)
    assert (harder - images).abs().max() <= 3 * 0.1 + 1e-5
    with torch.no_grad():
        before = disagreement(ensemble(images).logits, student(images)[0]).mean()
        after = disagreement(ensemble(harder).logits, student(harder)[0]).mean()
    assert after > before


@pytest.mark.parametrize("overrides, message", [
    ({"iterations": 0}, "generator needs iterations >= 1"),
    ({"hard": -1.0}, "generator adv_weight, prior_weight and hard must be >= 0"),
    ({"weight_decay": 0.0}, "weight_decay in (0, 1]"),
    ({"perturb_eps": -0.1}, "generator perturb_steps and perturb_eps must be >= 0"),
])
def test_bad_generator_settings_are_refused_with_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        apply_overrides(TINY, {"generator": overrides}).validate()


def test_both_baselines_run_end_to_end_on_the_same_clients(tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, {"methods": "fedavg,ensemble,dense-gen,co-boosting",
                                     "generator": {"iterations": 8, "weight_lr": 0.05}})
    run(cfg, out_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]
    for name in ("dense-gen", "co-boosting"):
        entry = metrics[name]
        assert len(entry["curve"]) == tiny_cfg.distill.rounds and entry["seconds"] > 0
        assert entry["active_patches"] == entry["patches"]  # a generator's images have no patch mask
        assert (tmp_path / "run" / "models" / f"{name}.safetensors").is_file()
        assert (tmp_path / "run" / "synthetic" / f"{name}.safetensors").is_file()
    weights = metrics["co-boosting"]["client_weights"]
    assert len(weights) == tiny_cfg.distill.rounds
    assert all(0 <= w <= 1 for row in weights for w in row) and weights[-1] != [1.0] * len(weights[-1])
    assert "client_weights" not in metrics["dense-gen"]
    assert METHODS["dense-gen"].role == METHODS["co-boosting"].role == "baseline"
    assert "dense-gen" not in tiny_cfg.methods and "co-boosting" not in preset_config("cpu").methods  # opt-in
