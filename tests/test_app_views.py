"""The app's drawing functions: plotly figures and PIL images from hand-built events.

No server and no training here: every test takes milliseconds.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from app import views
from fedmitr.methods import METHODS
from app_events import make_round


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
    assert by_name["FedAvg: 30.0%"].y == (0.3, 0.3)
    assert by_name["FedAvg: 30.0%"].x[-1] == 3  # reference spans every round
    assert "ensemble (teacher): 70.0%" in by_name  # one label, no "(teacher) (reference)"
    assert fig.layout.yaxis.tickformat == ".0%"
    # The method stands out: its own colour and the thickest line.
    assert by_name["FedMITR"].line.color == METHODS["fedmitr"].colour
    assert by_name["FedMITR"].line.width > by_name["dense inversion + KD"].line.width


def test_accuracy_curves_without_inversion_methods_say_so():
    fig = views.accuracy_curves({}, {"fedavg": 0.3})
    assert any("inversion method runs" in a.text for a in fig.layout.annotations)


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


def test_relabel_map_shows_density_and_token_targets():
    event = make_round()
    fig = views.relabel_map(event, 1, class_names=[f"c{i}" for i in range(10)])
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    density, targets = heatmaps
    np.testing.assert_allclose(np.asarray(density.z).ravel(), event.density[1])
    # What each patch was taught: the label (0) or the relabel (1), here recorded as token_relabelled.
    np.testing.assert_array_equal(np.floor(np.asarray(targets.z).ravel()), event.token_relabelled[1].astype(int))
    assert np.asarray(targets.text).ravel()[event.high_mask[1]].tolist() == ["c1"] * 5
    # The high-information set is outlined: one rectangle per high patch; stopped patches are hatched.
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(rects) == int(event.high_mask[1].sum())
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(lines) == int((event.stop_step[1] >= 0).sum()) == 7
    assert (np.asarray(density.text).ravel()[event.stop_step[1] >= 0] == "×").all()  # stopped: no density
    legend = {t.name for t in fig.data if t.name}
    assert {"the generated label y (high information)", "the ensemble's relabel (kept, low information)",
            "high-information patch (H)", "stopped patch (×, hatched)"} <= legend


def test_relabel_map_of_an_image_with_no_relabelled_patch_says_so():
    event = make_round()
    event.token_relabelled[:] = False  # H held every kept patch: nothing relabelled
    titles = [a.text for a in views.relabel_map(event, 1).layout.annotations]
    assert "what each patch is taught (none relabelled)" in titles
    event.token_relabelled[1, 0] = True
    assert "what each patch is taught" in [a.text for a in views.relabel_map(event, 1).layout.annotations]


def test_relabel_map_for_a_method_without_relabel_says_so():
    fig = views.relabel_map(make_round(method="sparse-kd"), 0, relabel_used=False)
    assert any("unused" in a.text for a in fig.layout.annotations)


def test_relabel_map_rejects_a_missing_image():
    with pytest.raises(IndexError, match="4 images"):
        views.relabel_map(make_round(batch=4), 4)


def test_relabel_map_large_grid_drops_cell_text():
    fig = views.relabel_map(make_round(grid=14, size=224, channels=3, batch=1), 0)
    assert all(t.text is None for t in fig.data if t.type == "heatmap")


def test_results_rows_from_metrics():
    metrics = {
        "methods": {"fedavg": {"accuracy": 0.3, "seconds": 0.1},
                    "fedmitr": {"accuracy": 0.55, "seconds": 12.0, "synthetic_images": 500}},
        "clients": [{"index": 0, "accuracy": 0.2, "seconds": 5.0}, {"index": 1, "accuracy": 0.4, "seconds": 6.0}],
    }
    rows = views.results_rows(metrics)
    assert rows[0][:3] == ["FedAvg", "30.0%", "0.1"]
    assert rows[1][1] == "55.0%" and "500 synthetic images" in rows[1][3]
    assert rows[2][:3] == ["clients (mean)", "30.0%", "5.5"]  # mean accuracy and mean time per client
    assert rows[3][0] == "best client (2)"
    assert all(len(r) == len(views.RESULT_HEADERS) for r in rows)
    metrics["methods"]["fedmitr"]["seconds"] = 152.8
    assert views.results_rows(metrics)[1][2] == "153"  # no decimals past 100 s: the column stays narrow


def test_the_table_gives_this_runs_paired_difference_and_the_note_under_it_the_benchmarks():
    metrics = {"methods": {"fedavg": {"accuracy": 0.3, "seconds": 0.1},
                           "fedmitr": {"accuracy": 0.75, "seconds": 90.0, "synthetic_images": 500}}}
    pair = {"method": "fedmitr", "baseline": "dense-kd", "alpha": "0.5", "seeds": [0, 1, 2],
            "accuracy": {"fedmitr": 0.78, "dense-kd": 0.76}, "seconds": {"fedmitr": 150.0, "dense-kd": 180.0},
            "paired": [0.03, -0.01, 0.04]}
    assert len(views.results_rows(metrics)) == 2 and "points against" not in views.results_rows(metrics)[1][3]
    note = views.results_note(metrics, pair)
    assert "FedMITR 78.0% (150 s) against dense inversion + KD 76.0% (180 s), +2.0 points" in note
    assert "+3.0, -1.0, +4.0" in note and "mean of 3 seed(s)" in note and "did not include" in note
    metrics["methods"]["dense-kd"] = {"accuracy": 0.7, "seconds": 120.0, "synthetic_images": 500}
    rows = views.results_rows(metrics)
    assert "+5.0 points against dense inversion + KD on the same clients (this run)" in rows[1][3]
    assert "did not include" not in views.results_note(metrics, pair) and views.results_note(metrics, None) == ""


def test_mask_overlay_without_tint_shows_the_image_itself():
    event = make_round(batch=2)
    event.images[:] = 0.0
    img = np.asarray(views.mask_overlay(event, tint=False)[0]).astype(int)
    cell = 168 // 4
    assert img[cell // 2, cell // 2].sum() == 0  # a stopped patch, untinted: black as the image is


def test_gallery_caption_sits_under_the_image_and_names_the_class():
    event = make_round(batch=2, round_=5)
    plain = views.mask_overlay(event)[1]
    captioned = views.mask_overlay(event, class_names=[f"c{i}" for i in range(10)])[1]
    assert captioned.width == plain.width and captioned.height > plain.height  # a strip below, nothing over it
    np.testing.assert_array_equal(np.asarray(captioned)[:plain.height], np.asarray(plain))
    assert views.gallery_caption(event, 1, [f"c{i}" for i in range(10)]) == "r5 #2 · class c1"


def test_legend_says_how_many_images_the_gallery_shows():
    assert "showing 8 of the 100 images of each round" in views.stop_legend_html(make_round(), shown=8, total=100)


def test_relabel_map_says_what_each_patch_taught_and_why():
    import dataclasses

    from fedmitr.relabel import BACKGROUND, GATED, LABEL, NOTHING, RELABEL

    event = make_round(batch=1)
    source = np.full((1, 16), NOTHING, dtype=np.int8)  # patches 0-6 are stopped (make_round)
    source[0, 7:12], source[0, 12], source[0, 13], source[0, 14:] = LABEL, RELABEL, GATED, LABEL
    source[0, 3] = BACKGROUND
    weight = np.where((source == NOTHING) | (source == GATED), 0.0, 1.0).astype(np.float16)
    event = dataclasses.replace(event, token_source=source, token_weight=weight)
    fig = views.relabel_map(event, 0)
    targets = [t for t in fig.data if t.type == "heatmap"][1]
    np.testing.assert_array_equal(np.floor(np.asarray(targets.z).ravel()), source[0])
    why = np.asarray(targets.customdata).reshape(16, 2)
    assert why[0, 0].startswith("nothing (stopped patch") and "stopped at iteration 2" in why[0, 0]
    assert why[3, 0].startswith("a stopped patch's target") and why[13, 0].startswith("nothing: the clients disagreed")
    assert why[0, 1] == "0.00" and why[12, 1] == "1.00"
    text = np.asarray(targets.text).ravel()
    assert text[0] == "–" and text[3] == "bg" and text[7] == str(event.token_labels[0][7])
    assert "#1 · class 0" in fig.layout.title.text



def test_captions_fit_their_panel():
    """The privacy check's captions are drawn whole, not cut at both sides."""
    from PIL import ImageDraw

    real = np.zeros((1, 28, 28), dtype=np.uint8)
    pair = views.privacy_pair(real, real, "synthetic r5 #8", "nearest real: class 7")
    assert pair.width >= 2 * 140
    # The caption strip holds dark text well inside each 140 px panel: its first and last dark
    # columns are off the panel's edges.
    strip = np.asarray(pair)[-12:, :140].min(axis=(0, 2))
    dark = np.nonzero(strip < 128)[0]
    assert dark.size and dark[0] > 1 and dark[-1] < 138
    width = ImageDraw.Draw(pair).textlength("nearest real: class 7", font_size=8)
    assert width < 140


def test_client_bar_labels_sit_inside_the_bars():
    fig = views.client_accuracy_chart([0.85, 0.4], [10, 20], {"ensemble": 0.86})
    assert fig.data[0].textposition == "inside"


def test_a_nearest_real_image_of_another_class_is_explained():
    distance = {"pixel": 0.2, "feature": 1.5}
    same = views.privacy_text(distance, None, classes=("3", "3"))
    other = views.privacy_text(distance, None, classes=("3", "7"))
    assert "Another class" not in same
    assert "made for 3" in other and "is a 7" in other and "every class" in other


def test_twenty_clients_get_short_level_labels_and_a_legend_below_them():
    fig = views.client_accuracy_chart([0.5] * 20, [10] * 20, {"fedavg": 0.4})
    bars = fig.data[0]
    assert list(bars.x) == [str(i) for i in range(1, 21)] and fig.layout.xaxis.title.text == "client"
    assert (fig.layout.xaxis.tickangle or 0) == 0 and not any(bars.text)  # no slanted names, no crowded labels
    assert fig.layout.legend.y < -0.2
    few = views.client_accuracy_chart([0.5] * 5)
    assert list(few.data[0].x)[0] == "client 1" and few.data[0].text[0] == "50%"
