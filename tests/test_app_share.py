"""The app's Share panel and Try tab over its API (gradio_client), with the Hub mocked in-process."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from app import share
from app.form import FormValues
from app_server import serving_app

TOKEN = "hf_" + "AppFakeToken0123456789abcdefghijklm"
TINY = FormValues(dataset="mnist5k", clients=3, alpha="0.5", methods=["fedavg", "ensemble", "fedmitr"],
                  preset="tiny", epochs=2, iterations=8, images=8, keep=0.8, relabel="token", rounds=2, seed=0, init="scratch")


RUNS: list[Path] = []  # the app's run folder of this module's server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    RUNS[:] = [tmp_path_factory.mktemp("app-runs")]
    with serving_app(RUNS[0]) as url:
        yield url


@pytest.fixture(scope="module")
def session(server):
    """One browser-like session that has finished a tiny run (Share and Try work on it)."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    updates = list(client.submit(*TINY.inputs(), api_name="/run"))
    assert "Finished" in updates[-1][0]
    return client


def test_push_sends_one_commit_and_never_returns_the_token(session, capfd):
    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name for p in Path(folder_path).rglob("*") if p.is_file()}
        assert {"model.safetensors", "config.json", "README.md"} <= files
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/c0ffee")

    with mock.patch("huggingface_hub.HfApi.create_repo", autospec=True) as create_repo, \
            mock.patch("huggingface_hub.HfApi.upload_folder", autospec=True, side_effect=upload_folder) as upload, \
            mock.patch.object(share.form, "hub_reachable", return_value=True), \
            mock.patch.dict("os.environ", {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}):
        message, token_box = session.predict("fedmitr", "someone/fedmitr-tiny", False, TOKEN, api_name="/push")
    assert "someone/fedmitr-tiny" in message and "c0ffee" in message
    assert token_box == ""  # the token box is cleared, not echoed
    create_repo.assert_called_once()
    upload.assert_called_once()
    out, err = capfd.readouterr()
    assert TOKEN not in message + out + err


@pytest.mark.parametrize("method, repo, token, expected", [
    ("fedmitr", "not a repo", TOKEN, "a Hub repo id is USER/NAME"),
    ("fedmitr", "", TOKEN, "Give a repo id"),
    (None, "someone/x", TOKEN, "Choose which global model"),
    ("fedmitr", "someone/x", TOKEN, "offline"),  # the suite runs with HF_HUB_OFFLINE=1
])
def test_push_refusals_are_clear_and_quick(session, method, repo, token, expected, capfd):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=expected) as err:
        session.predict(method, repo, False, token, api_name="/push")
    out, errors = capfd.readouterr()
    assert TOKEN not in str(err.value) + out + errors and "Traceback" not in out + errors


def test_push_without_a_finished_run_says_so(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Run the pipeline first"):
        Client(server, verbose=False).predict(None, "someone/x", False, TOKEN, api_name="/push")


def test_try_evaluates_this_runs_model_and_shows_attention(session):
    summary, gallery = session.predict(share.OWN, "fedmitr", "", "mnist5k", None, api_name="/try")
    assert "test accuracy" in summary and "1000 images" in summary
    assert len(gallery) == 8 and all(Path(item["image"]).exists() for item in gallery)


def test_try_a_hub_model_while_offline_says_so_at_once(session):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="offline"):
        session.predict(share.HUB, None, "someone/model", "mnist5k", None, api_name="/try")
    with pytest.raises(AppError, match="USER/NAME"):
        session.predict(share.HUB, None, "no slash", "mnist5k", None, api_name="/try")


def test_try_loads_a_downloaded_model_and_says_what_is_missing(session):
    """What a visitor downloaded from the results (a model and metrics.json) loads in the Try tab,
    as the offline Hub's message suggests."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Try the run on the Run tab instead, or a downloaded model"):
        session.predict(share.HUB, None, "someone/model", "mnist5k", None, api_name="/try")
    metrics = next(RUNS[0].rglob("metrics.json"))
    model = metrics.parent / "models" / "fedmitr.safetensors"
    summary, gallery = session.predict(share.FILE, None, "", "mnist5k", [handle_file(str(model)), handle_file(str(metrics))],
                                       api_name="/try")
    assert "The downloaded FedMITR model" in summary and "test accuracy" in summary and len(gallery) == 8
    with pytest.raises(AppError, match="Upload two files"):
        session.predict(share.FILE, None, "", "mnist5k", [handle_file(str(model))], api_name="/try")
