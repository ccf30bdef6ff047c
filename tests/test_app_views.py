"""The app's pure parts: views drawn from hand-built events, the form rules, the run view, run dirs.

No server and no training here: every test takes milliseconds.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the app/ package, under plain `pytest` too

from app import form, jobs, views  # noqa: E402
from app.runview import GALLERY_PER_ROUND, MAX_ROUNDS_KEPT, RunView  # noqa: E402
from fedmitr.config import ConfigError, preset_config  # noqa: E402
from fedmitr.events import Metric, PartitionReady, Progress, StageFinished, StageStarted, SyntheticRound  # noqa: E402
from fedmitr.methods import METHODS  # noqa: E402


def make_round(method: str = "fedmitr", round_: int = 1, batch: int = 4, grid: int = 4, channels: int = 1,
               size: int = 28, sparse: bool = True, seed: int = 0) -> SyntheticRound:
    """A SyntheticRound as an inversion method would emit it, with known stops and targets."""
    rng = np.random.default_rng(seed)
    n = grid * grid
    stop_step = np.full((batch, n), -1)
    if sparse:
        stop_step[:, :4] = 2  # first stop: patches 0-3
        stop_step[:, 4:7] = 5  # second stop: patches 4-6
    density = rng.random((batch, n))
    density /= density.sum(1, keepdims=True)
    high = np.zeros((batch, n), dtype=bool)
    high[np.arange(batch)[:, None], np.argsort(-density, axis=1)[:, :5]] = True
    labels = np.arange(batch) % 10
    token_labels = np.where(high, labels[:, None], (labels[:, None] + 1) % 10)
    return SyntheticRound(
        method=method, round=round_, images=rng.random((batch, channels, size, size)).astype(np.float32),
        labels=labels, stop_step=stop_step, density=density, high_mask=high, token_labels=token_labels,
        token_relabelled=~high, grid=grid, iterations=20,
    )


# --- partition heatmap ----------------------------------------------------------------------------

def test_partition_heatmap_shows_every_count():
    counts = np.array([[5, 0, 3], [1, 7, 2]])
    fig = views.partition_heatmap(counts, ("a", "b", "c"))
    assert isinstance(fig, go.Figure)
    heat = fig.data[0]
    assert heat.type == "heatmap"
    np.testing.assert_array_equal(np.asarray(heat.z), counts)
    assert list(heat.x) == ["a", "b", "c"]
    assert heat.y[0].startswith("client 1") and "(8)" in heat.y[0]  # the client's total is in its label
    assert "images" in heat.hovertemplate


def test_partition_heatmap_rejects_mismatched_names():
    with pytest.raises(ValueError, match="class_counts"):
        views.partition_heatmap(np.ones((2, 3)), ("a", "b"))


# --- client chart and curves ----------------------------------------------------------------------

def test_client_chart_has_a_bar_per_client_and_reference_lines():
    fig = views.client_accuracy_chart([0.5, None, 0.25], [10, 20, 30], {"fedavg": 0.4, "ensemble": 0.6})
    bars = fig.data[0]
    assert bars.type == "bar" and len(bars.x) == 3
    assert np.isnan(bars.y[1])  # client 2 not evaluated yet: no bar, no crash
    names = [t.name for t in fig.data[1:]]
    assert any("FedAvg" in n and "40.0%" in n for n in names)
    assert any("ensemble" in n and "60.0%" in n for n in names)


def test_accuracy_curves_one_line_per_method_plus_references():
    curves = {"fedmitr": {1: 0.2, 2: 0.4, 3: 0.5}, "dense-kd": {1: 0.1, 2: 0.3}}
    fig = views.accuracy_curves(curves, {"fedavg": 0.3, "ensemble": 0.7}, rounds=3)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["FedMITR"].y) == [0.2, 0.4, 0.5]
    assert list(by_name["dense inversion + KD"].x) == [1, 2]
    assert by_name["FedAvg (reference)"].y == (0.3, 0.3)
    assert by_name["FedAvg (reference)"].x[-1] == 3  # reference spans every round
    assert fig.layout.yaxis.tickformat == ".0%"
    # The method stands out: its own colour and the thickest line.
    assert by_name["FedMITR"].line.color == views.METHOD_COLOURS["fedmitr"]
    assert by_name["FedMITR"].line.width > by_name["dense inversion + KD"].line.width


def test_accuracy_curves_without_inversion_methods_say_so():
    fig = views.accuracy_curves({}, {"fedavg": 0.3})
    assert any("inversion methods" in a.text for a in fig.layout.annotations)


# --- gallery: mask overlay ------------------------------------------------------------------------

def test_mask_overlay_tints_stopped_patches_only():
    event = make_round(batch=3)
    event.images[:] = 0.0  # black images: any colour comes from the overlay
    images = views.mask_overlay(event)
    assert len(images) == 3
    img = np.asarray(images[0])
    assert img.shape == (168, 168, 3)  # 28 px x 6, RGB
    cell = 168 // 4
    palette = views.stop_palette(event)
    assert set(palette) == {2, 5}
    stopped_first = img[cell // 2, cell // 2]  # patch 0, stopped at iteration 2
    stopped_second = img[cell + cell // 2, cell // 2]  # patch 4, stopped at iteration 5
    active = img[3 * cell + cell // 2, 3 * cell + cell // 2]  # patch 15, never stopped
    assert stopped_first.sum() > 0 and stopped_second.sum() > 0
    assert not np.array_equal(stopped_first, stopped_second)  # earlier and later stops differ
    assert active.sum() == 0  # active patches are left as they are


def test_mask_overlay_dense_round_draws_no_tint_and_rgb_works():
    event = make_round(sparse=False, channels=3, size=32, batch=2)
    images = views.mask_overlay(event, max_images=1)
    assert len(images) == 1
    assert views.stop_palette(event) == {}
    assert "nothing stopped" in views.stop_legend_html(event)
    # Away from grid lines the pixels are the image's own.
    img = np.asarray(images[0]).astype(int)
    expected = (np.clip(event.images[0, :, 2, 2], 0, 1) * 255 + 0.5).astype(int)
    np.testing.assert_allclose(img[2 * 5 + 2, 2 * 5 + 2], expected, atol=1)


def test_stop_legend_lists_each_stop_iteration():
    html = views.stop_legend_html(make_round())
    assert "iteration 2 of 20" in html and "iteration 5 of 20" in html and "never stopped" in html


# --- relabel map ----------------------------------------------------------------------------------

def test_relabel_map_shows_density_and_token_targets():
    event = make_round()
    fig = views.relabel_map(event, 1, class_names=[f"c{i}" for i in range(10)])
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    density, targets = heatmaps
    np.testing.assert_allclose(np.asarray(density.z).ravel(), event.density[1])
    # Relabelled patches are the low-density ones, and their text is the relabel's class.
    np.testing.assert_array_equal(np.asarray(targets.z).ravel().astype(bool), event.token_relabelled[1])
    assert np.asarray(targets.text).ravel()[event.high_mask[1]].tolist() == ["c1"] * 5
    # The high-information set is outlined: one rectangle per high patch.
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(rects) == int(event.high_mask[1].sum())
    legend = {t.name for t in fig.data if t.name}
    assert {"generated label y (high density)", "ensemble relabel (low density)"} <= legend


def test_relabel_map_for_a_method_without_relabel_says_so():
    fig = views.relabel_map(make_round(method="sparse-kd"), 0, relabel_used=False)
    assert any("unused" in a.text for a in fig.layout.annotations)


def test_relabel_map_rejects_a_missing_image():
    with pytest.raises(IndexError, match="4 images"):
        views.relabel_map(make_round(batch=4), 4)


def test_relabel_map_large_grid_drops_cell_text():
    fig = views.relabel_map(make_round(grid=14, size=224, channels=3, batch=1), 0)
    assert all(t.text is None for t in fig.data if t.type == "heatmap")


# --- results table --------------------------------------------------------------------------------

def test_results_rows_from_metrics():
    metrics = {
        "methods": {"fedavg": {"accuracy": 0.3, "seconds": 0.1},
                    "fedmitr": {"accuracy": 0.55, "seconds": 12.0, "synthetic_images": 500}},
        "clients": [{"index": 0, "accuracy": 0.2, "seconds": 5.0}, {"index": 1, "accuracy": 0.4, "seconds": 6.0}],
    }
    rows = views.results_rows(metrics)
    assert rows[0][:3] == ["FedAvg", "30.0%", "0.1"]
    assert rows[1][1] == "55.0%" and "500 synthetic images" in rows[1][3]
    assert rows[2][:2] == ["clients (mean)", "30.0%"]
    assert rows[3][0] == "best client (2)"
    assert all(len(r) == len(views.RESULT_HEADERS) for r in rows)
    metrics["methods"]["fedmitr"]["seconds"] = 152.8
    assert views.results_rows(metrics)[1][2] == "153"  # no decimals past 100 s: the column stays narrow


# --- the run view: events -> state ----------------------------------------------------------------

def tiny_cfg(methods=("fedavg", "ensemble")):
    from fedmitr.config import apply_overrides

    return apply_overrides(preset_config("tiny"), {"methods": list(methods), "data": {"num_clients": 3}})


def test_run_view_folds_events_and_tracks_progress():
    view = RunView(tiny_cfg())
    assert view.fraction() == 0
    assert view.apply(StageStarted("data")) == {"status"}
    assert view.apply(PartitionReady(np.ones((3, 10), dtype=int), tuple("0123456789"))) == {"partition", "clients"}
    view.apply(StageFinished("data", 0.1))
    view.apply(StageStarted("clients", total=12, info="cpu (2 threads)"))
    assert view.device == "cpu (2 threads)"
    view.apply(Progress("clients", 6, 12, "client 2/3, epoch 2/4"))
    half = view.fraction()
    assert 0.3 < half < 0.6
    assert "client 2/3" in view.status_html() and "cpu (2 threads)" in view.status_html()
    assert view.apply(Metric("accuracy", 0.5, "client 2")) == {"clients"}
    assert view.client_accuracy == {1: 0.5}
    view.apply(StageFinished("clients", 1.0))
    assert view.fraction() > half
    assert view.apply(Metric("accuracy", 0.4, "fedavg")) == {"clients", "curves"}
    assert view.references() == {"fedavg": 0.4}
    view.state = "done"
    assert view.fraction() == 1.0 and "Finished" in view.status_html()


def test_run_view_keeps_rounds_small_and_bounded():
    view = RunView(tiny_cfg(("fedavg",)))
    for r in range(1, MAX_ROUNDS_KEPT + 4):
        assert view.apply(make_round(round_=r, batch=GALLERY_PER_ROUND + 5)) == {"gallery"}
    kept = view.rounds["fedmitr"]
    assert len(kept) == MAX_ROUNDS_KEPT
    assert kept[0].round == 1 and kept[-1].round == MAX_ROUNDS_KEPT + 3  # first and latest kept
    assert kept[0].images.dtype == np.uint8 and len(kept[0].images) == GALLERY_PER_ROUND
    items, index = view.gallery_items("fedmitr")
    assert len(items) == len(index) == MAX_ROUNDS_KEPT * GALLERY_PER_ROUND
    assert items[0][1] == "r1 · 0"
    method, round_pos, image = index[GALLERY_PER_ROUND + 2]
    assert (method, round_pos, image) == ("fedmitr", 1, 2)
    assert isinstance(view.relabel_figure(method, round_pos, image), go.Figure)


def test_run_view_curve_metrics_go_to_curves():
    view = RunView(tiny_cfg(("fedmitr",)) if "fedmitr" in METHODS else tiny_cfg())
    assert view.apply(Metric("accuracy", 0.2, "fedmitr", step=1)) == {"curves"}
    view.apply(Metric("accuracy", 0.3, "fedmitr", step=2))
    assert view.curves == {"fedmitr": {1: 0.2, 2: 0.3}}
    assert "fedmitr" not in view.method_accuracy


# --- the form -------------------------------------------------------------------------------------

GOOD = dict(dataset="mnist5k", clients=5, alpha="0.5", methods=["fedavg", "ensemble"], preset="tiny", epochs=2,
            iterations=10, images=8, keep=0.7, relabel="token", rounds=2, seed=3)


def test_build_config_overrides_the_preset():
    cfg = form.build_config(**{**GOOD, "alpha": "iid", "clients": 7.0})
    assert cfg.preset == "tiny" and cfg.data.num_clients == 7 and cfg.data.alpha is None
    assert cfg.clients.epochs == 2 and cfg.inversion.iterations == 10 and cfg.inversion.images_per_round == 8
    assert cfg.distill.rounds == 2 and cfg.seed == 3 and cfg.methods == ("fedavg", "ensemble")
    assert cfg.data.max_train_samples == preset_config("tiny").data.max_train_samples  # untouched fields stay


@pytest.mark.parametrize("change, message", [
    ({"alpha": "0"}, "alpha must be a number > 0"),
    ({"alpha": "-1"}, "alpha must be a number > 0"),
    ({"alpha": "lots"}, "alpha must be a number > 0 or 'iid'"),
    ({"clients": 1}, "number of clients must be 2 to 20"),
    ({"clients": 21}, "number of clients must be 2 to 20"),
    ({"clients": 2.5}, "whole number"),
    ({"methods": []}, "at least one method"),
    ({"methods": ["magic"]}, "unknown method"),
    ({"dataset": "nope"}, "unknown dataset"),
    ({"preset": "huge"}, "unknown preset"),
    ({"keep": 0}, "keep ratio"),
    ({"epochs": 0}, "local epochs must be 1 to"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"relabel": "psychic"}, "relabel must be one of"),
])
def test_build_config_refuses_bad_input_clearly(change, message):
    with pytest.raises(ConfigError, match=message):
        form.build_config(**{**GOOD, **change})


def test_hub_dataset_refused_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline"):
        form.build_config(**{**GOOD, "dataset": "cifar10"})
    assert all("offline" in label.lower() for label, name in form.dataset_choices() if form.is_hub_dataset(name))


def test_hub_dataset_accepted_when_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert form.build_config(**{**GOOD, "dataset": "cifar10"}).data.dataset == "cifar10"
    assert form.build_config(**{**GOOD, "dataset": "hf:someone/some-set"}).data.dataset == "hf:someone/some-set"


def test_dataset_choices_list_bundled_first():
    names = [name for _, name in form.dataset_choices()]
    assert names[:2] == ["mnist5k", "digits"] and "cifar10" in names


def test_default_methods_follow_the_registry():
    assert form.default_methods()[:2] == ["fedavg", "ensemble"]
    assert ("fedmitr" in form.default_methods()) == ("fedmitr" in METHODS)


def test_preset_knobs_match_the_preset():
    k = form.preset_knobs("cpu")
    cfg = preset_config("cpu")
    assert (k.epochs, k.iterations, k.rounds, k.relabel) == (
        cfg.clients.epochs, cfg.inversion.iterations, cfg.distill.rounds, cfg.relabel.mode)


# --- run directories ------------------------------------------------------------------------------

def test_run_dirs_are_per_session_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMITR_APP_RUNS", str(tmp_path))
    first = jobs.new_run_dir("session-a")
    first.mkdir()
    other = jobs.new_run_dir("session-b")
    other.mkdir()
    second = jobs.new_run_dir("session-a")  # a new run replaces the session's previous one
    assert not first.exists() and other.exists() and second != first
    # Age and count limits.
    old = tmp_path / "zzz-old"
    old.mkdir()
    os.utime(old, (time.time() - 10_000, time.time() - 10_000))
    deleted = jobs.cleanup_runs(tmp_path, max_age_s=5_000, max_dirs=10)
    assert deleted == [old] and other.exists()
    for i in range(4):
        (tmp_path / f"n{i}").mkdir()
        os.utime(tmp_path / f"n{i}", (time.time() - 100 + i, time.time() - 100 + i))
    jobs.cleanup_runs(tmp_path, max_age_s=5_000, max_dirs=2)
    assert len([p for p in tmp_path.iterdir()]) == 2


def test_check_hub_refuses_what_cannot_be_had(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cfg = form.build_config(**{**GOOD, "dataset": "cifar10"})
    with pytest.raises(ConfigError, match="cannot reach"):
        form.check_hub(cfg, reachable=lambda: False)
    form.check_hub(cfg, reachable=lambda: True)  # online: fine
    bundled = form.build_config(**GOOD)
    form.check_hub(bundled, reachable=lambda: pytest.fail("a bundled run must not probe the network"))
    # The gpu preset needs pretrained weights from the Hub, whatever the dataset.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="pretrained weights"):
        form.build_config(**{**GOOD, "preset": "gpu"})


def test_hub_reachable_is_false_for_a_closed_port(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert form.hub_reachable(timeout_s=1.0) is False
