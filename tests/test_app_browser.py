"""The app in a real browser: Playwright for Python driving Debian's Chromium (/usr/bin/chromium).

Opens the page, sets the inputs, runs a small job, and checks that the gallery, the plotly plots and
the results table are on screen; saves a full-page screenshot. Skipped where Chromium is not
installed (`apt-get install -y chromium`; never `playwright install`).

The suite's run is a seconds-long `tiny` one; its screenshot goes to tests/artifacts/app.png. The
README's assets/screenshot.png is the page as a visitor finds it, with the recorded example of the
default run (assets/example, `bash scripts/make_example.sh`):

    FEDMITR_SCREENSHOT_DEMO=1 .venv/bin/python -m pytest tests/test_app_browser.py -k arrival
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app_server import serving_app

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
DEMO = os.environ.get("FEDMITR_SCREENSHOT_DEMO") == "1"
# The README's image is the page on arrival; the suite saves its screenshots where git does not look.

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_app(tmp_path_factory.mktemp("app-runs")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1440, "height": 900})  # a laptop screen
    page = context.new_page()
    page.goto(server)
    page.wait_for_selector("#run-btn", timeout=30_000)
    yield page
    context.close()


def wait_for_status(page, text: str, timeout_s: float) -> None:
    page.wait_for_function(f"document.querySelector('#status')?.innerText.includes({text!r})",
                           timeout=timeout_s * 1000)


def wait_until_idle(timeout: float = 20.0) -> None:
    from app import jobs

    assert jobs.wait_idle(timeout), f"the app still holds a job {timeout} s after it should have stopped"


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def example_metrics() -> dict:
    return json.loads((ROOT / "assets" / "example" / "run" / "metrics.json").read_text())


def test_the_recorded_example_is_there_on_arrival(page):
    """Every panel shows the recorded run of the default settings the moment the page opens."""
    from app.timeline import format_seconds

    wait_for_status(page, "Example: a recorded run of the default settings", 30)
    status = page.locator("#status").inner_text()
    assert "fedmitr run --dataset mnist5k --clients 5 --alpha 0.5" in status
    # One time (the run's own total, as the status card gives it), and the device said once.
    metrics = example_metrics()
    assert f"took {format_seconds(metrics['seconds']['total'])}" in status
    recorded = json.loads((ROOT / "assets" / "example" / "recorded.json").read_text())
    assert f"{recorded['seconds']:.0f} s" not in status
    assert page.locator("body").inner_text().count(metrics["device"]) == 1
    images = page.locator("#gallery img")
    images.first.wait_for(state="visible", timeout=10_000)
    assert images.count() >= 8
    page.wait_for_function("document.querySelector('#gallery img')?.alt.startsWith('Synthetic image 1 of round 1')",
                           timeout=10_000)  # thumbnails say what they show
    for plot in ("#partition-plot", "#clients-plot", "#relabel-plot", "#curves-plot"):
        assert page.locator(f"{plot} .js-plotly-plot").is_visible(), plot
    assert "FedMITR" in page.locator("#results").inner_text()
    assert "H is kept" in page.locator("#relabel-summary").inner_text()
    assert "on this machine" in page.locator("#estimate").inner_text()
    images.nth(1).click()  # the example is as clickable as a live run
    page.wait_for_function("document.querySelector('#relabel-plot').innerText.includes('#2')", timeout=10_000)
    assert "pixel distance" in page.locator("#privacy-text").inner_text()
    page.mouse.move(0, 0)
    page.wait_for_function("!document.querySelector('.hoverlayer g')", timeout=5_000)
    shot = ROOT / "assets" / "screenshot.png" if DEMO else ROOT / "tests" / "artifacts" / "arrival.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)


def test_the_try_tab_shows_one_box_at_a_time(page):
    page.get_by_role("tab", name="Try a checkpoint").click()
    assert page.locator("#try-own").is_visible() and not page.locator("#try-hub").is_visible()
    page.locator("#try-source").get_by_label("a model on the Hugging Face Hub").check()
    page.locator("#try-hub").wait_for(state="visible", timeout=10_000)
    assert not page.locator("#try-own").is_visible()


def test_run_shows_gallery_plots_and_results(page):
    """A seconds-long run of your own replaces the example: the tiny preset, a little more training."""
    advanced = page.get_by_role("button", name="Advanced")
    advanced.click()
    page.locator("#preset").get_by_label("tiny").check()
    # The preset fills in its knobs (the tiny preset's 12 iterations); ours come after.
    page.wait_for_function("document.querySelector('#iterations input').value === '12'", timeout=10_000)
    set_number(page, "clients", 4)
    set_number(page, "epochs", 8)
    set_number(page, "iterations", 30)
    set_number(page, "images", 20)
    set_number(page, "rounds", 3)
    methods = page.locator("#methods")
    for name in ("fedavg", "ensemble", "fedmitr", "dense-kd"):
        methods.get_by_label(name, exact=True).check()
    advanced.click()  # close it again for the screenshot
    finish_s = 150

    page.locator("#run-btn").click()
    wait_for_status(page, "Running", 30)
    # One progress display, the status card: no Gradio overlay or pulsing borders on top of it.
    assert page.locator(".eta-bar, .progress-text, .generating").count() == 0
    # The example's panels are gone, its privacy picture too.
    assert page.locator("#privacy-pair img").count() == 0 and page.locator("#results").inner_text().count("%") == 0
    page.wait_for_function("document.querySelector('#status .fm-time')?.innerText.includes('so far')",
                           timeout=30_000)
    wait_for_status(page, "Finished", finish_s)
    assert "took" in page.locator("#status .fm-time").inner_text()
    assert "This run took" in page.locator("#estimate").inner_text()

    partition = page.locator("#partition-plot .js-plotly-plot")
    curves = page.locator("#curves-plot .js-plotly-plot")
    assert partition.is_visible() and curves.is_visible()
    assert page.locator("#partition-plot .heatmaplayer, #partition-plot .hm").count() > 0 \
        or "client 1" in partition.inner_text()
    table = page.locator("#results")
    assert table.is_visible()
    assert "FedAvg" in table.inner_text() and "%" in table.inner_text()
    images = page.locator("#gallery img")
    images.first.wait_for(state="visible", timeout=10_000)
    assert images.count() >= 8
    assert page.evaluate("document.querySelector('#gallery img').naturalWidth") >= 100
    assert page.locator("#relabel-plot .js-plotly-plot").is_visible()
    # The tint switch redraws the gallery: the synthetic digits without the stop colours.
    first_src = images.first.get_attribute("src")
    page.locator("#tint input").uncheck()
    page.wait_for_function(f"document.querySelector('#gallery img').src !== {first_src!r}", timeout=10_000)
    page.locator("#tint input").check()
    # Clicking a synthetic image shows its relabel map.
    images.nth(2).click()
    page.wait_for_function("document.querySelector('#relabel-plot').innerText.includes('#3')",
                           timeout=10_000)
    assert "Device:" in page.locator("#status").inner_text()
    assert "benchmark" in page.locator("#bench-note").inner_text()
    # The privacy check: the clicked image beside its nearest real training image.
    assert "pixel distance" in page.locator("#privacy-text").inner_text()
    assert page.locator("#privacy-pair img").count() == 1
    page.mouse.move(0, 0)  # no hover labels in the screenshot
    page.wait_for_function("!document.querySelector('.hoverlayer g')", timeout=5_000)
    shot = ROOT / "tests" / "artifacts" / "app.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    wait_until_idle()


def test_share_pushes_and_try_loads_the_runs_model(page):
    """After a tiny run: push the model (the Hub mocked in-process) and evaluate it in the Try tab."""
    from pathlib import Path
    from unittest import mock

    from app import share

    run_tiny(page)
    page.get_by_text("Share the global model on the Hugging Face Hub").click()
    # A refused push empties the token box too.
    page.locator("#share-repo textarea, #share-repo input").first.fill("not a repo")
    page.locator("#share-token input").fill("hf_" + "BrowserFake0123456789abcdefghijkl")
    page.locator("#share-push").click()
    page.get_by_text("a Hub repo id is USER/NAME", exact=False).first.wait_for(state="visible", timeout=15_000)
    page.wait_for_function("document.querySelector('#share-token input').value === ''", timeout=10_000)
    page.locator("#share-repo textarea, #share-repo input").first.fill("someone/fedmitr-browser")
    page.locator("#share-token input").fill("hf_" + "BrowserFake0123456789abcdefghijkl")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        assert (Path(folder_path) / "model.safetensors").exists()
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/b0b0")

    with mock.patch("huggingface_hub.HfApi.create_repo", autospec=True), \
            mock.patch("huggingface_hub.HfApi.upload_folder", autospec=True, side_effect=upload_folder), \
            mock.patch.object(share.form, "hub_reachable", return_value=True), \
            mock.patch.dict("os.environ", {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}):
        page.locator("#share-push").click()
        page.wait_for_function("document.querySelector('#share-result')?.innerText.includes('Pushed')",
                               timeout=30_000)
    assert page.locator("#share-result a[href$='/commit/b0b0']").count() == 1
    assert page.locator("#share-token input").input_value() == ""
    page.get_by_role("tab", name="Try a checkpoint").click()
    page.locator("#try-btn").click()
    page.wait_for_function("document.querySelector('#try-summary')?.innerText.includes('test accuracy')",
                           timeout=30_000)
    assert page.locator("#try-gallery img").count() == 8
    wait_until_idle()


def run_tiny(page) -> None:
    """A seconds-long run from the page: the tiny preset, 2 clients, FedMITR."""
    advanced = page.get_by_role("button", name="Advanced")
    advanced.click()
    page.locator("#preset").get_by_label("tiny").check()
    page.wait_for_function("document.querySelector('#iterations input').value === '12'", timeout=10_000)
    advanced.click()
    page.locator("#run-btn").click()
    wait_for_status(page, "Finished", 120)


def test_bad_input_shows_an_error_and_the_page_stays_usable(page):
    alpha = page.locator("#alpha input")
    alpha.fill("-1")
    alpha.press("Enter")
    page.locator("#run-btn").click()
    error = page.get_by_text("alpha must be a number > 0", exact=False)
    error.first.wait_for(state="visible", timeout=15_000)
    from app import jobs

    assert not jobs._ACTIVE and not jobs.DEVICE.busy  # noqa: SLF001 - nothing was started
    assert page.locator("#run-btn").is_enabled()


def _open(browser, server):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.goto(server)
    page.wait_for_selector("#run-btn", timeout=30_000)
    return context, page


def test_closing_the_tab_frees_its_job_running_or_waiting(browser, server):
    from app import jobs

    running_ctx, running = _open(browser, server)
    running.locator("#run-btn").click()  # the default: cpu preset, minutes of work
    wait_for_status(running, "Running: clients", 60)
    waiting_ctx, waiting = _open(browser, server)
    waiting.locator("#run-btn").click()
    wait_for_status(waiting, "Queued: position 1", 30)
    assert jobs.DEVICE.busy and jobs.DEVICE.waiting() == 1
    waiting_ctx.close()  # a waiting session disconnects: it leaves the line
    for _ in range(100):
        if jobs.DEVICE.waiting() == 0:
            break
        running.wait_for_timeout(100)
    assert jobs.DEVICE.waiting() == 0 and jobs.DEVICE.busy  # the running one is unaffected
    running_ctx.close()  # the running session disconnects
    wait_until_idle(timeout=30)


def test_stop_on_a_waiting_run_takes_it_out_of_the_line(browser, server):
    from app import jobs

    busy_ctx, busy = _open(browser, server)
    busy.locator("#run-btn").click()
    wait_for_status(busy, "Running: clients", 60)
    _, page = _open(browser, server)
    page.locator("#run-btn").click()
    wait_for_status(page, "Queued", 30)
    page.locator("#stop-btn").click()
    for _ in range(100):
        if jobs.DEVICE.waiting() == 0:
            break
        page.wait_for_timeout(100)
    assert jobs.DEVICE.waiting() == 0
    busy_ctx.close()
    wait_until_idle(timeout=30)


def test_the_high_token_switch_goes_there_and_back(page):
    from app.form import HIGH_TOKEN_METHODS, FormValues

    page.locator("#high-token input").check()
    page.get_by_role("button", name="Advanced").click()  # the preset and its knobs live in there
    page.wait_for_function("document.querySelector('#preset input[value=\"cpu-49\"]')?.checked", timeout=10_000)
    methods = page.locator("#methods")
    for name in HIGH_TOKEN_METHODS:  # every method the switch names, the recommended variant included
        assert methods.get_by_label(name, exact=True).is_checked(), name
    # The paper's other baselines are under Advanced, offered and not ticked (they are opt-in).
    more = page.locator("#more-methods")
    for name in ("dense-gen", "co-boosting"):
        assert not more.get_by_label(name, exact=True).is_checked(), name
        assert methods.get_by_label(name, exact=True).count() == 0, name
    # The preset's knobs follow (cpu-49 trains its clients for 50 epochs).
    page.wait_for_function("document.querySelector('#epochs input').value === '50'", timeout=10_000)
    page.locator("#high-token input").uncheck()  # and back: the 16-token defaults
    defaults = FormValues.for_preset("cpu")
    page.wait_for_function("document.querySelector('#preset input[value=\"cpu\"]')?.checked", timeout=10_000)
    page.wait_for_function(f"document.querySelector('#epochs input').value === '{defaults.epochs}'", timeout=10_000)
    page.wait_for_function("() => [...document.querySelectorAll('#methods input')].filter(i => i.checked).length === "
                           f"{len(defaults.methods)}", timeout=10_000)
    for name in defaults.methods:
        assert methods.get_by_label(name, exact=True).is_checked(), name
    # Choosing the preset by hand sets the switch too.
    page.locator("#preset").get_by_label("cpu-49", exact=True).check()
    page.wait_for_function("document.querySelector('#high-token input').checked", timeout=10_000)


@pytest.fixture
def laptop(browser, server):
    """The page on a 1280x800 laptop screen, with the example drawn."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(server)
    page.wait_for_selector("#run-btn", timeout=30_000)
    wait_for_status(page, "Example: a recorded run", 30)
    yield page
    context.close()


def test_run_is_above_the_fold_at_1280x800(laptop):
    shot = ROOT / "tests" / "artifacts" / "fold-1280x800.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    laptop.screenshot(path=str(shot))  # the first screen, as a visitor sees it
    box = laptop.locator("#run-btn").bounding_box()
    assert box is not None and box["y"] + box["height"] <= 800, box
    assert laptop.locator("#run-btn").is_visible() and laptop.locator("#stop-btn").bounding_box()["y"] < 800


CONTRAST = """(selectors) => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length >= 3 && (c.length < 4 || c[3] > 0.5)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const out = [];
  for (const el of document.querySelectorAll(selectors)) {
    if (!el.innerText.trim() || !el.offsetParent) continue;
    const fg = lum(rgb(getComputedStyle(el).color).slice(0, 3)), bg = lum(background(el));
    out.push([el.innerText.trim().slice(0, 40), (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05)]);
  }
  return out;
}"""


def test_explanatory_text_is_readable(laptop):
    """WCAG AA: every explanation, hint and label at a contrast of at least 4.5:1 on its background."""
    measured = laptop.evaluate(CONTRAST, ".fm-explain p, .fm-meta, .fm-status-head span, .info-text, "
                                         "[data-testid='block-info'], #estimate p, .fm-legend")
    assert len(measured) > 10
    low = [(text, round(ratio, 2)) for text, ratio in measured if ratio < 4.5]
    assert not low, low


def test_three_digit_counts_fit_their_cells(laptop):
    """The client split's heatmap on a laptop screen: every count clear of its cell's edges (2 px at
    least on each side)."""
    heat = laptop.locator("#partition-plot .hm image").first
    heat.wait_for(state="visible", timeout=10_000)
    columns = len(example_metrics()["dataset"]["class_names"])
    cell = heat.bounding_box()["width"] / columns
    widths = laptop.evaluate("[...document.querySelectorAll('#partition-plot .heatmap-label text')]"
                             ".map(t => [t.textContent, t.getBBox().width])")
    assert any(len(text) >= 3 for text, _ in widths)  # the example has three-digit counts
    wide = [(text, round(w, 1)) for text, w in widths if w + 2 * 2 > cell]
    assert not wide, (cell, wide)


def test_the_example_can_be_tried_and_replayed(page):
    """The Try tab names the example's model properly and offers its Replay."""
    wait_for_status(page, "Example: a recorded run", 30)
    page.get_by_role("tab", name="Try a checkpoint").click()
    page.locator("#try-btn").click()
    page.wait_for_function("document.querySelector('#try-summary')?.innerText.includes('test accuracy')",
                           timeout=60_000)
    summary = page.locator("#try-summary").inner_text()
    assert "The recorded example's FedMITR model" in summary and "this run's" not in summary
    replay = page.locator("#try-replay")
    replay.wait_for(state="visible", timeout=10_000)
    replay.click()
    page.locator("#run-btn").wait_for(state="visible", timeout=30_000)  # back on the Run tab
    assert "Example: a recorded run" in page.locator("#status").inner_text()
    assert page.locator("#gallery img").count() >= 8


def test_a_refused_try_leaves_words_not_a_bare_error_in_the_panel(page):
    page.get_by_role("tab", name="Try a checkpoint").click()
    page.get_by_label("a model on the Hugging Face Hub").check()
    page.locator("#try-hub textarea, #try-hub input").first.fill("someone/model")
    page.locator("#try-btn").click()
    page.get_by_text("offline", exact=False).first.wait_for(state="visible", timeout=15_000)
    page.get_by_text("Nothing loaded", exact=False).first.wait_for(state="visible", timeout=15_000)
    bare = page.evaluate("""() => [...document.querySelectorAll('#try-summary *, #try-gallery *')]
        .filter(e => e.children.length === 0 && e.textContent.trim() === 'Error').length""")
    assert bare == 0
