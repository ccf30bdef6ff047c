"""Sharing, offline: export in timm's Hub layout, a mocked push, loading, the synthetic set as a dataset."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from fedmitr import hub
from fedmitr.cli import main
from fedmitr.errors import ConfigError, HubError
from fedmitr.methods import METHODS
from fedmitr.models import build_model
from fedmitr.pipeline import run

TOKEN = "hf_" + "FakeToken0123456789abcdefghijklmnop"


@pytest.fixture(scope="module")
def run_dir(tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("share") / "run"
    run(dataclasses.replace(tiny_cfg, methods=("fedavg", "ensemble", "fedmitr")), out_dir=out)
    return out


def _card(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1])


def test_export_rebuilds_the_same_model_with_timm_and_reports_the_measured_accuracy(run_dir, tmp_path, tiny_cfg):
    out = hub.export(run_dir, tmp_path / "export", method="fedmitr")
    assert {"config.json", "model.safetensors", "README.md", "fedmitr_config.json", "fedmitr_metrics.json",
            "accuracy_curve.png"} <= {p.name for p in out.iterdir()}
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    original = build_model(tiny_cfg.model, 10, 1, 28)
    original.load_state_dict(load_file(str(run_dir / "models" / "fedmitr.safetensors")))
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original.eval()(x))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    card = _card(out)
    assert card["library_name"] == "timm" and card["license"] and "federated-learning" in card["tags"]
    result = card["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["split"] == "test"
    assert result["metrics"][0]["type"] == "accuracy"
    assert result["metrics"][0]["value"] == pytest.approx(metrics["methods"]["fedmitr"]["accuracy"], abs=1e-4)
    text = (out / "README.md").read_text()
    assert "# FedMITR global model (mnist5k)" in text.splitlines()  # the method's label, said once
    assert card["model-index"][0]["name"] == "FedMITR global model (mnist5k)"
    assert "FedAvg" in text or "fedavg" in text
    assert "Privacy check" in text and "Limits" in text
    model, info = hub.load(f"local-dir:{out}")
    assert info["methods"]["fedmitr"]["accuracy"] == metrics["methods"]["fedmitr"]["accuracy"]


@pytest.mark.parametrize("method", [name for name, m in METHODS.items() if m.makes_model])
def test_card_titles_use_the_method_label_once(method):
    title = hub.card_title(method, "mnist5k")
    assert METHODS[method].label in title and title.endswith("(mnist5k)")
    words = re.findall(r"[a-z0-9]+", title.lower())
    assert len(words) == len(set(words)), title  # not "FedMITR fedmitr global model"


def test_export_refuses_what_it_cannot_export_and_writes_nothing(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="makes no single model"):
        hub.export(run_dir, tmp_path / "e1", method="ensemble")
    with pytest.raises(ConfigError, match="did not run"):
        hub.export(run_dir, tmp_path / "e2", method="dense-kd")
    with pytest.raises(ConfigError, match="not a finished run directory"):
        hub.export(tmp_path / "nothing", tmp_path / "e3")
    assert not any(tmp_path.iterdir())


def test_push_uploads_exactly_the_export_in_one_commit_and_never_leaks_the_token(run_dir, tmp_path, caplog,
                                                                                  capsys, monkeypatch):
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["files"] = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                             for p in Path(folder_path).rglob("*") if p.is_file()}
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")

    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    with mock.patch("huggingface_hub.HfApi.create_repo", autospec=True) as create_repo, \
            mock.patch("huggingface_hub.HfApi.upload_folder", autospec=True, side_effect=upload_folder) as upload:
        url = hub.push(run_dir, "someone/fedmitr-tiny", token=TOKEN, private=True)
        assert main(["push", str(run_dir), "--repo", "someone/fedmitr-tiny"]) == 2  # no token in the environment
    assert url == "https://huggingface.co/someone/fedmitr-tiny/commit/abc123"
    create_repo.assert_called_once()
    assert create_repo.call_args.args[1] == "someone/fedmitr-tiny" and create_repo.call_args.kwargs["private"]
    assert upload.call_count == 1
    export = hub.export(run_dir, tmp_path / "reference", method="fedmitr")
    expected = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
    assert set(uploaded["files"]) == expected
    assert uploaded["files"]["model.safetensors"] == (export / "model.safetensors").read_bytes()
    # The token is nowhere: not in a file, a log record, the output, or an error.
    for content in uploaded["files"].values():
        assert TOKEN.encode() not in content
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes()
    out, err = capsys.readouterr()
    assert TOKEN not in out + err + caplog.text


def test_a_failed_push_is_one_clear_line_without_the_token(run_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"401 Unauthorized for token {TOKEN}")

    with mock.patch("huggingface_hub.HfApi.create_repo", autospec=True, side_effect=refuse), \
            mock.patch("huggingface_hub.HfApi.upload_folder", autospec=True) as upload:
        with pytest.raises(HubError) as err:
            hub.push(run_dir, "someone/x", token=TOKEN)
    assert TOKEN not in str(err.value) and "hf_***" in str(err.value)
    upload.assert_not_called()  # nothing half-pushed


def test_offline_push_and_load_fail_at_once(run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="OfflineModeIsEnabled"):
        hub.push(run_dir, "someone/x", token=TOKEN)
    import time

    t0 = time.monotonic()
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        hub.load("hf-hub:someone/not-cached")
    assert time.monotonic() - t0 < 2  # no retries: it took 27 s before
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import socket

    with socket.socket() as s:  # a Hub that does not answer: a port nobody listens on
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    with pytest.raises(HubError, match="does not answer"):
        hub.load("hf-hub:someone/not-cached")


@pytest.mark.parametrize("argv, message", [
    (["export", "/nonexistent/run", "/tmp/x"], "not a finished run directory"),
    (["push", "RUN", "--repo", "no-owner"], "a Hub repo id is USER/NAME"),
    (["push", "RUN", "--repo", "a/b c"], "a Hub repo id is USER/NAME"),
    (["push", "RUN", "--repo", "someone/x", "--method", "dense-kd"], "did not run"),
    (["eval", "--model", "somewhere"], "hf-hub:USER/NAME or local-dir:PATH"),
    (["eval", "--model", "local-dir:/nonexistent"], "no exported model"),
    (["export-synthetic", "RUN", "OUT", "--method", "fedavg"], "no synthetic set for 'fedavg'"),
])
def test_bad_input_is_one_error_line(argv, message, run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    argv = [str(run_dir) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and TOKEN not in err
    assert not (tmp_path / "out").exists()


def test_eval_prints_accuracy_and_a_confusion_matrix(run_dir, tmp_path, capsys):
    out = hub.export(run_dir, tmp_path / "export")
    assert main(["eval", "--model", f"local-dir:{out}"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"mnist5k: test accuracy \d{1,3}\.\d% on 1000 images", text) and "true\\pred" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 11]
    assert len(rows) == 10 and sum(int(v) for row in rows for v in row[1:]) == 1000


def test_synthetic_set_is_a_dataset_with_labels_and_patch_records(run_dir, tmp_path):
    from datasets import load_from_disk

    where = hub.export_synthetic(run_dir, tmp_path / "syn", method="fedmitr")
    ds = load_from_disk(where)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert len(ds) == cfg["distill"]["rounds"] * cfg["inversion"]["images_per_round"]
    assert ds.features["label"].names == [str(d) for d in range(10)]
    row = ds[0]
    assert row["image"].size == (28, 28) and len(row["density"]) == 16 and len(row["stop_iteration"]) == 16
    assert sum(row["high_information"]) >= 1 and "nearest_real_pixel_distance" in row
    assert "Privacy check" in (Path(where) / "README.md").read_text()
    size_mb = (run_dir / "synthetic" / "fedmitr.safetensors").stat().st_size / 1e6
    assert size_mb < 1


def test_privacy_check_flags_a_copied_training_image(tiny_data, ensemble):
    from fedmitr.privacy import nearest_real, real_set

    train = tiny_data.train
    real = real_set(tiny_data.to_unit(train.images), train.images, train.labels, ensemble)
    copies = train.images[[3, 7]]
    noise = torch.randn(2, 1, 28, 28)
    synthetic = torch.cat([copies, noise])
    check = nearest_real(tiny_data.to_unit(synthetic), synthetic, real, ensemble)
    assert check.index[:2].tolist() == [3, 7]
    assert check.distance["pixel"][:2].max() < 1e-5 and check.distance["pixel"][2:].min() > 0.1
    summary = check.summary()
    assert summary["pixel"]["closer_than_reference_p5"] == pytest.approx(0.5)
    assert summary["pixel"]["reference_median"] > 0


def test_the_run_records_the_privacy_check(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    check = metrics["privacy"]["fedmitr"]
    assert set(check) == {"pixel", "feature"}
    assert 0 <= check["pixel"]["closer_than_reference_p5"] <= 1 and check["pixel"]["median"] > 0


def test_eval_offline_is_one_line_at_once(capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    assert main(["eval", "--model", "hf-hub:someone/fedmitr-mnist"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 2 and len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err


def test_eval_on_another_dataset_warns(run_dir, tmp_path, capsys):
    out = hub.export(run_dir, tmp_path / "export", method="fedmitr")
    assert main(["eval", "--model", f"local-dir:{out}", "--dataset", "digits"]) in (0, 2)
    err = capsys.readouterr().err
    assert "trained on mnist5k" in err and "says little" in err
