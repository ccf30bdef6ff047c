"""The run view: the pipeline's events folded into what one session has seen."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from app.runview import GALLERY_PER_ROUND, MAX_ROUNDS_KEPT, RunView
from app_events import make_round
from fedmitr.config import apply_overrides, preset_config
from fedmitr.events import Metric, PartitionReady, Progress, StageFinished, StageStarted
from fedmitr.runtime import DeviceInfo


def run_cfg(methods=("fedavg", "ensemble")):
    return apply_overrides(preset_config("tiny"), {"methods": list(methods), "data": {"num_clients": 3}})


def test_run_view_folds_events_and_tracks_progress():
    view = RunView(run_cfg())
    assert view.fraction() == 0
    assert view.apply(StageStarted("data")) == {"status"}
    assert view.apply(PartitionReady(np.ones((3, 10), dtype=int), tuple("0123456789"))) == {"partition", "clients"}
    view.apply(StageFinished("data", 0.1))
    view.apply(StageStarted("clients", total=12, info="ignored text", device=DeviceInfo("cpu", "cpu", 1, 2)))
    assert view.device == "cpu (2 threads, 1 process)"
    view.apply(Progress("clients", 6, 12, "client 2/3, epoch 2/4"))
    half = view.fraction()
    assert 0.3 < half < 0.6
    assert "client 2/3" in view.status_html() and "cpu (2 threads" in view.status_html()
    assert view.apply(Metric("accuracy", 0.5, "client 2", client=1)) == {"clients"}
    assert view.client_accuracy == {1: 0.5}
    # The client index is a field: the display text is never parsed.
    assert view.apply(Metric("accuracy", 0.7, "the third one", client=2)) == {"clients"}
    assert view.client_accuracy == {1: 0.5, 2: 0.7}
    view.apply(StageFinished("clients", 1.0))
    assert view.fraction() > half
    assert view.apply(Metric("accuracy", 0.4, "fedavg")) == {"clients", "curves"}
    assert view.references() == {"fedavg": 0.4}
    view.state = "done"
    assert view.fraction() == 1.0 and "Finished" in view.status_html()


def test_run_view_keeps_rounds_small_and_bounded():
    view = RunView(run_cfg(("fedavg",)))
    for r in range(1, MAX_ROUNDS_KEPT + 4):
        assert view.apply(make_round(round_=r, batch=GALLERY_PER_ROUND + 5)) == {"gallery"}
    kept = view.rounds["fedmitr"]
    assert len(kept) == MAX_ROUNDS_KEPT
    assert kept[0].round == 1 and kept[-1].round == MAX_ROUNDS_KEPT + 3  # first and latest kept
    assert kept[0].images.dtype == np.uint8 and len(kept[0].images) == GALLERY_PER_ROUND
    items, index = view.gallery_items("fedmitr")
    assert len(items) == len(index) == MAX_ROUNDS_KEPT * GALLERY_PER_ROUND
    assert items[0][1].startswith("Synthetic image 1 of round 1 (FedMITR), made for class")  # its alt text
    assert "showing 8 of the 13 images" in view.legend_html("fedmitr")
    method, round_pos, image = index[GALLERY_PER_ROUND + 2]
    assert (method, round_pos, image) == ("fedmitr", 1, 2)
    assert isinstance(view.relabel_figure(method, round_pos, image), go.Figure)


def test_run_view_curve_metrics_go_to_curves():
    view = RunView(run_cfg(("fedmitr",)))
    assert view.apply(Metric("accuracy", 0.2, "fedmitr", step=1)) == {"curves"}
    view.apply(Metric("accuracy", 0.3, "fedmitr", step=2))
    assert view.curves == {"fedmitr": {1: 0.2, 2: 0.3}}
    assert "fedmitr" not in view.method_accuracy



def test_methods_side_by_side_are_both_shown_running():
    view = RunView(run_cfg(("fedavg", "dense-kd", "fedmitr")))
    for stage in ("data", "clients", "fedavg"):
        view.apply(StageStarted(stage))
        view.apply(StageFinished(stage, 1.0))
    view.apply(StageStarted("dense-kd"))
    view.apply(StageStarted("fedmitr"))
    view.apply(Progress("dense-kd", 3, 10, "round 1/2: inversion 3/12"))
    view.apply(Progress("fedmitr", 5, 10, "round 1/2: inversion 5/12"))
    html = view.status_html()
    assert "Running side by side" in html and "inversion 3/12" in html and "inversion 5/12" in html
    assert html.count("fm-active") == 2
    view.apply(StageFinished("fedmitr", 2.0))
    assert "Running: dense-kd" in view.status_html() and view.status_html().count("fm-active") == 1


def test_a_stop_keeps_the_finished_methods_in_the_results_and_ends_the_running_hint():
    from app import stream

    view = RunView(run_cfg(("fedavg", "ensemble", "fedmitr")))
    for stage, acc in (("fedavg", 0.3), ("ensemble", 0.8)):
        view.apply(StageStarted(stage))
        view.apply(Metric("accuracy", acc, stage))
        view.apply(StageFinished(stage, 0.2))
    view.apply(StageStarted("fedmitr"))
    status, table, hint = stream.stop_job(view, None)
    assert "Stopped" in status and "Running" not in hint and "finished are in the results" in hint
    assert list(table["model"]) == ["FedAvg", "ensemble (teacher)"] and list(table["accuracy"]) == ["30.0%", "80.0%"]
    assert stream.stop_job(view, None)[0] == stream.gr.update()  # a second Stop changes nothing


def test_the_gallery_shows_every_class_over_the_rounds_and_the_privacy_view_its_own_image():
    from app.runview import gallery_picks

    labels = np.arange(100) % 10  # a round of 100 images, the classes in turn
    shown = [set(labels[gallery_picks(labels, r)]) for r in (1, 2)]
    assert shown[0] == set(range(8)) and {8, 9} <= shown[1] and len(shown[1]) == 8
    assert len(gallery_picks(np.zeros(5, dtype=int), 1)) == 5  # one class: the round's images in order
    view = RunView(run_cfg(("fedmitr",)))
    event = make_round(round_=2, batch=12)
    view.apply(event)
    kept = view.rounds["fedmitr"][0]
    picks = view.picks[("fedmitr", 2)]
    assert (kept.labels == np.asarray(event.labels)[picks]).all()
    assert (kept.stop_step == np.asarray(event.stop_step)[picks]).all()
