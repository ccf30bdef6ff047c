"""Local client training and evaluation."""

from __future__ import annotations

import pytest
import torch

from fedmitr.clients import train_clients
from fedmitr.config import apply_overrides
from fedmitr.data import partition
from fedmitr.ensemble import Ensemble
from fedmitr.events import Progress
from fedmitr.runtime import make_accelerator

NUM_CLIENTS = 3
EPOCHS = 20  # the tiny preset has 4; a from-scratch ViT on ~200 images needs more to learn visibly


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_cfg):
    """Three clients trained on IID thirds of the tiny data, with every event recorded."""
    cfg = apply_overrides(tiny_cfg, {"clients": {"epochs": EPOCHS}}).validate()
    part = partition(tiny_data.train.labels.numpy(), NUM_CLIENTS, None, tiny_data.num_classes, seed=0)
    events = []
    results = train_clients(tiny_data, part, cfg.model, cfg.clients, accelerator=make_accelerator(), seed=0,
                            on_event=events.append)
    return cfg, part, results, events


def test_clients_come_back_in_order_with_their_own_data(trained):
    _, part, results, _ = trained
    assert [r.index for r in results] == list(range(NUM_CLIENTS))
    assert [r.num_samples for r in results] == [len(idx) for idx in part.client_indices]
    for r in results:
        assert not r.model.training
        assert r.seconds > 0
        assert len(r.losses) == EPOCHS
    # Same initialisation, different data: the trained clients differ.
    a, b = (dict(r.model.named_parameters()) for r in results[:2])
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_local_training_reduces_the_loss(trained):
    _, _, results, _ = trained
    for r in results:
        assert r.losses[0] == pytest.approx(2.3, abs=0.3)  # ln(10): a fresh model guesses
        assert r.losses[-1] < 0.9 * r.losses[0], r.losses
        assert min(r.losses[-3:]) < min(r.losses[:3]), r.losses


def test_trained_clients_beat_chance(trained, tiny_data):
    _, _, results, _ = trained
    accs = [Ensemble([r.model]).evaluate(tiny_data.test) for r in results]
    assert min(accs) > 0.2, accs  # 10 classes: chance is 0.1


def test_progress_events_count_every_optimiser_step(trained):
    cfg, part, results, events = trained
    from fedmitr.clients import client_steps

    progress = [e for e in events if isinstance(e, Progress)]
    total = sum(client_steps(len(idx), cfg.clients) for idx in part.client_indices)
    assert [e.step for e in progress] == list(range(1, total + 1))
    assert {e.total for e in progress} == {total}
    assert {e.stage for e in progress} == {"clients"}
    assert progress[0].message == f"client 1/{NUM_CLIENTS}, epoch 1/{EPOCHS}"
    assert progress[-1].message == f"client {NUM_CLIENTS}/{NUM_CLIENTS}, epoch {EPOCHS}/{EPOCHS}"
    # The last step of each epoch carries that epoch's mean loss (the curve the UI can draw).
    ends = [e for e, nxt in zip(progress, progress[1:] + [None]) if nxt is None or nxt.message != e.message]
    assert [e.values["loss"] for e in ends] == pytest.approx([loss for r in results for loss in r.losses])


def test_warmup_cosine_rises_to_the_peak_then_decays_to_zero():
    from fedmitr.training import warmup_cosine

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = warmup_cosine(optimizer, total_steps=100, warmup_frac=0.1)
    lrs = [optimizer.param_groups[0]["lr"]]
    for step in range(1, 100):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.01)  # peak / warm-up steps
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warm-up
    assert lrs[10] == pytest.approx(0.1)  # the peak, once warm-up is over
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.001  # cosine decay


# --- clients side by side in worker processes (a CPU, one process) ----------------------------------

def test_clients_in_worker_processes_have_the_weights_they_have_here(tiny_data, tiny_cfg):
    """Two workers of one thread each train every client exactly as this one-thread process does,
    report one stage that ends at 100%, and hand each client over as soon as it is trained."""
    part = partition(tiny_data.train.labels.numpy(), NUM_CLIENTS, 0.5, tiny_data.num_classes, seed=1, min_samples=10)
    args = (tiny_data, part, tiny_cfg.model, tiny_cfg.clients)
    here = train_clients(*args, accelerator=make_accelerator(), seed=1, workers=1)
    events, handed = [], []
    apart = train_clients(*args, accelerator=make_accelerator(), seed=1, workers=2, on_event=events.append,
                          on_trained=lambda r: handed.append(r.index))
    assert sorted(handed) == list(range(NUM_CLIENTS))
    assert [r.index for r in apart] == list(range(NUM_CLIENTS))
    for a, b in zip(here, apart):
        assert a.num_samples == b.num_samples and a.losses == b.losses
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[name], sb[name]) for name in sa)
        assert not b.model.training
    progress = [e for e in events if isinstance(e, Progress)]
    assert {e.stage for e in progress} == {"clients"}
    assert progress[-1].step == progress[-1].total  # every step of every client counted
    assert all(e.step <= e.total for e in progress)


def test_a_failed_client_worker_says_why(tiny_data, tiny_cfg):
    from fedmitr.clients import _Shard, _train_in_workers

    part = partition(tiny_data.train.labels.numpy(), 2, None, tiny_data.num_classes, seed=0)
    shards = [_Shard.of(k, tiny_data, part, model_cfg=tiny_cfg.model, cfg=tiny_cfg.clients, seed=0) for k in range(2)]
    with pytest.raises(RuntimeError, match="client worker process failed(.|\n)*state_dict"):
        _train_in_workers(shards, {"not": torch.zeros(1)}, 2, accelerator=make_accelerator(), on_event=lambda e: None,
                          on_trained=None)


def test_a_stop_kills_the_client_workers_at_once(tiny_data, tiny_cfg, monkeypatch):
    import fedmitr.clients as clients

    started = []

    class Recorded(clients._Worker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    class Stop(BaseException):
        pass

    def on_event(event):
        if event.step > 0:  # the first reported step: a user pressed Stop
            raise Stop()

    monkeypatch.setattr(clients, "_Worker", Recorded)
    cfg = apply_overrides(tiny_cfg, {"clients": {"epochs": 200}})  # minutes, were it not stopped
    part = partition(tiny_data.train.labels.numpy(), 2, None, tiny_data.num_classes, seed=0)
    with pytest.raises(Stop):
        train_clients(tiny_data, part, cfg.model, cfg.clients, accelerator=make_accelerator(), seed=0, workers=2,
                      on_event=on_event)
    assert len(started) == 2
    for worker in started:
        assert worker.proc.wait(timeout=5) != 0  # killed, not finished


def test_client_workers_follow_the_threads_on_a_cpu(monkeypatch):
    from fedmitr.clients import client_workers

    accelerator = make_accelerator(cpu=True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert client_workers(accelerator, 5) == 4
    assert client_workers(accelerator, 3) == 3  # never more workers than clients
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert client_workers(accelerator, 5) == 1  # one thread: the clients train here


def test_client_workers_can_be_set_and_a_bad_value_is_refused(monkeypatch):
    from fedmitr.clients import client_workers

    accelerator = make_accelerator(cpu=True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setenv("FEDMITR_CLIENT_WORKERS", "2")
    assert client_workers(accelerator, 5) == 2  # one torch thread for the server, two clients at a time
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("FEDMITR_CLIENT_WORKERS", bad)
        with pytest.raises(ValueError, match="FEDMITR_CLIENT_WORKERS must be a whole number >= 1"):
            client_workers(accelerator, 5)
