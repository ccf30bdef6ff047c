"""The server: every method of the registry by name on the same trained clients (tiny preset)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from fedmitr.config import preset_config
from fedmitr.errors import ConfigError
from fedmitr.events import Metric, Progress, SyntheticRound
from fedmitr.methods import METHODS, RUNNERS
from fedmitr.server import RUNNERS as SERVER_RUNNERS
from fedmitr.server import MethodResult, ServerContext, run_method

TINY = preset_config("tiny")


@pytest.fixture(scope="module")
def context(tiny_clients, tiny_data):
    def make(on_event=lambda e: None, cfg=TINY):
        return ServerContext(cfg, tiny_data, tiny_clients, torch.device("cpu"), on_event)

    return make


def test_every_runner_named_by_a_method_exists():
    assert set(SERVER_RUNNERS) == set(RUNNERS)
    assert {spec.runner for spec in METHODS.values()} <= set(RUNNERS)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_end_to_end(name, context):
    events = []
    result = run_method(name, context(events.append))
    spec = METHODS[name]
    assert isinstance(result, MethodResult) and result.name == name
    assert 0 <= result.accuracy <= 1 and result.seconds > 0
    assert (result.model is not None) == (name != "ensemble")
    entry = result.to_dict()
    if not spec.inversion:
        assert entry == {"accuracy": result.accuracy, "seconds": result.seconds} and events == []
        return
    rounds, images = TINY.distill.rounds, TINY.inversion.images_per_round
    assert len(result.curve) == rounds and result.accuracy == result.curve[-1]
    assert result.synthetic_images == rounds * images
    assert set(result.stage_seconds) == {"inversion", "relabel", "distill", "evaluate"}
    assert result.patches == 16 and (result.active_patches < 16) == spec.sparse
    assert set(result.final_losses) == ({"kd", "token", "total"} if spec.relabel else {"kd", "total"})
    assert set(entry) >= {"curve", "stage_seconds", "synthetic_images", "active_patches", "final_losses"}

    # The events: a progress step per inversion iteration and distillation step, one synthetic
    # round and one curve point per round.
    steps = [e for e in events if isinstance(e, Progress) and "relabel" not in e.message]
    per_round = TINY.inversion.iterations + TINY.distill.steps_per_round
    assert [e.step for e in steps] == list(range(1, rounds * per_round + 1))
    assert all(e.total == rounds * per_round and e.stage == name for e in steps)
    synthetic = [e for e in events if isinstance(e, SyntheticRound)]
    assert [e.round for e in synthetic] == list(range(1, rounds + 1))
    relabel_steps = [e for e in events if isinstance(e, Progress) and "relabel" in e.message]
    assert bool(relabel_steps) == (spec.relabel and TINY.relabel.mode == "neighbourhood")
    curve = [e for e in events if isinstance(e, Metric)]
    assert [(e.source, e.step, e.value) for e in curve] == [(name, r + 1, a) for r, a in enumerate(result.curve)]
    last = synthetic[-1]
    assert last.images.shape == (images, 1, 28, 28) and 0 <= last.images.min() and last.images.max() <= 1
    np.testing.assert_allclose(last.density.sum(1), 1, rtol=1e-5)
    assert (last.token_relabelled == (~last.high_mask if spec.relabel else False)).all()
    assert ((last.stop_step >= 0).any(axis=1)).all() == spec.sparse


def test_a_method_is_deterministic_for_a_seed(context):
    a = run_method("fedmitr", context())
    b = run_method("fedmitr", context())
    assert a.curve == b.curve and a.final_losses == b.final_losses


def test_equal_time_override_changes_only_the_images_per_round(context):
    result = run_method("sparse-kd", context(), images_per_round=3)
    assert result.synthetic_images == 3 * TINY.distill.rounds


def test_unknown_method_is_a_clear_error(context):
    with pytest.raises(ConfigError, match="unknown method 'magic'; known: fedavg, ensemble"):
        run_method("magic", context())
