"""The ensemble of the clients: one object for every question the server asks its teacher."""

from __future__ import annotations

import pytest
import torch

from fedmitr.ensemble import Ensemble, accuracy
from fedmitr.models import sparse_forward


def test_evaluate_is_the_accuracy_of_averaged_logits(ensemble, tiny_data):
    models = ensemble.models
    x, y = tiny_data.test.images, tiny_data.test.labels
    with torch.no_grad():
        mean_logits = torch.stack([m(x) for m in models]).mean(0)
        single = models[0](x)
    assert ensemble.evaluate(tiny_data.test) == pytest.approx(float((mean_logits.argmax(1) == y).float().mean()))
    assert Ensemble([models[0]]).evaluate(tiny_data.test) == pytest.approx(float((single.argmax(1) == y).float().mean()))
    # Batching does not change the averaged logits.
    assert torch.allclose(ensemble.predict_logits(x, batch_size=7), mean_logits, atol=1e-5)


def test_evaluate_restores_training_mode(model_factory, tiny_data):
    model = model_factory().train()
    Ensemble([model]).evaluate(tiny_data.test)
    assert model.training


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.5


def test_forward_averages_the_clients_on_the_view_it_is_given(ensemble, tiny_data):
    x = tiny_data.test.images[:5]
    with torch.no_grad():
        dense = ensemble(x)
        every = ensemble(x, torch.arange(16).expand(5, -1))
        kept = ensemble(x, torch.tensor([[0, 5, 10, 15]] * 5))
        by_hand = torch.stack([sparse_forward(m, x, torch.tensor([[0, 5, 10, 15]] * 5)).logits
                               for m in ensemble.models]).mean(0)
    torch.testing.assert_close(dense.logits, ensemble.predict_logits(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(every.logits, dense.logits, atol=1e-4, rtol=1e-4)  # all kept = dense
    torch.testing.assert_close(kept.logits, by_hand)
    assert dense.attention.shape == (5, 16) and kept.attention.shape == (5, 4)
    torch.testing.assert_close(kept.attention.sum(1), torch.ones(5) * kept.attention.sum(1)[0], atol=0.5, rtol=0)


def test_token_probs_are_distributions_per_patch(ensemble, tiny_data):
    probs = ensemble.token_probs(tiny_data.test.images[:3], temperature=2.0)
    assert probs.shape == (3, 16, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 16))
    kept = ensemble.token_probs(tiny_data.test.images[:3], torch.tensor([[1, 2]] * 3))
    assert kept.shape == (3, 2, 10)


def test_features_concatenate_each_clients_class_token(ensemble, tiny_data):
    feats = ensemble.features(tiny_data.test.images[:4], batch_size=3)
    width = ensemble.models[0].embed_dim
    assert feats.shape == (4, len(ensemble) * width)
    with torch.no_grad():
        first = ensemble.models[0].forward_features(tiny_data.test.images[:4])[:, 0]
    torch.testing.assert_close(feats[:, :width], first)


def test_frozen_switches_gradients_off_and_restores_them(ensemble, model_factory):
    student = model_factory().train()
    with ensemble.frozen(student):
        assert not any(p.requires_grad for m in ensemble.models for p in m.parameters())
        assert not student.training
    assert all(p.requires_grad for p in student.parameters()) and student.training


def test_an_ensemble_needs_models_and_one_count_each(model_factory):
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])
    with pytest.raises(ValueError, match="one count per model"):
        Ensemble([model_factory()], [1, 2])
