"""The FedAvg baseline: a size-weighted parameter average of the client models."""

from __future__ import annotations

import copy

import pytest
import torch

from fedmitr.baselines import fedavg


def _filled(model, value: float):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_fedavg_of_identical_models_is_that_model(model_factory, tiny_data):
    model = model_factory()
    avg = fedavg([model, copy.deepcopy(model), copy.deepcopy(model)], [5, 1, 30])
    assert avg is not model
    assert not avg.training
    for key, value in model.state_dict().items():
        assert torch.allclose(avg.state_dict()[key], value, atol=1e-6), key
    x = tiny_data.test.images[:8]
    with torch.no_grad():
        assert torch.allclose(avg(x), model.eval()(x), atol=1e-5)


@pytest.mark.parametrize("num_samples, expected", [([1, 3], 2.5), ([3, 1], 1.5), ([10, 10], 2.0), (None, 2.0)])
def test_fedavg_weights_by_client_size(model_factory, num_samples, expected):
    ones, threes = _filled(model_factory(), 1.0), _filled(model_factory(), 3.0)
    avg = fedavg([ones, threes], num_samples)
    for name, p in avg.named_parameters():
        assert torch.allclose(p, torch.full_like(p, expected)), name
    # The inputs are left as they were.
    assert all(bool((p == 1.0).all()) for p in ones.parameters())
    assert all(bool((p == 3.0).all()) for p in threes.parameters())


@pytest.mark.parametrize(
    "count, num_samples",
    [(0, None), (2, [1]), (2, [1, 2, 3]), (2, [0, 5]), (2, [-1, 5])],
)
def test_fedavg_rejects_bad_weights(model_factory, count, num_samples):
    models = [model_factory(seed=i) for i in range(count)]
    with pytest.raises(ValueError, match="fedavg needs at least one model|one positive count per model"):
        fedavg(models, num_samples)



def test_fedavg_of_trained_clients_is_their_weighted_mean(teachers, teacher_sizes):
    avg = fedavg(teachers, teacher_sizes)
    w = torch.tensor(teacher_sizes, dtype=torch.float64) / sum(teacher_sizes)
    expected = sum(wi * m.head.weight.double() for wi, m in zip(w, teachers)).float()
    assert torch.allclose(avg.head.weight, expected, atol=1e-6)
