"""The run directory: written and read back through one class."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedmitr.errors import ConfigError
from fedmitr.events import DeviceInfo, Metric, PartitionReady, PrivacyChecked, Progress, RunFinished, StageStarted
from fedmitr.pipeline import run
from fedmitr.rundir import RunDir, decode_event, encode_event
from fedmitr.synthetic import SyntheticSet


@pytest.fixture(scope="module")
def finished(tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("rundir") / "run"
    result = run(dataclasses.replace(tiny_cfg, methods=("ensemble", "fedavg", "sparse-kd")), out_dir=out)
    return result, out


def test_a_run_directory_round_trips(finished):
    result, out = finished
    run_dir = RunDir.open(out)
    assert run_dir.metrics == json.loads(json.dumps(result.metrics))
    assert run_dir.config == result.config
    assert run_dir.methods() == ["ensemble", "fedavg", "sparse-kd"]
    assert run_dir.global_models() == ["fedavg", "sparse-kd"]  # the ensemble is no single model
    for name in run_dir.global_models():
        from safetensors.torch import load_file

        state = load_file(run_dir.model_path(name))
        for key, value in result.methods[name].model.state_dict().items():
            torch.testing.assert_close(state[key], value.cpu())
    synthetic, extra = run_dir.synthetic("sparse-kd")
    assert isinstance(synthetic, SyntheticSet) and len(synthetic) == result.methods["sparse-kd"].synthetic_images
    assert np.array_equal(synthetic.images, result.methods["sparse-kd"].synthetic.images)
    assert extra["class_names"] == list(result.dataset.class_names) and len(extra["nearest_real_index"]) == len(synthetic)
    assert [p.name for p in run_dir.downloads()] == ["fedavg.safetensors", "sparse-kd.safetensors", "config.json",
                                                     "metrics.json"]
    for c in result.clients:
        assert run_dir.client_path(c.index).is_file()


def test_the_privacy_check_travels_as_an_event(finished):
    result, out = finished
    checks = [e for _, e in RunDir.open(out).events() if isinstance(e, PrivacyChecked)]
    assert [c.method for c in checks] == ["sparse-kd"]
    _, extra = RunDir.open(out).synthetic("sparse-kd")
    assert checks[0].nearest_index.tolist() == extra["nearest_real_index"]
    assert checks[0].summary == result.metrics["privacy"]["sparse-kd"]


def test_reading_refuses_what_is_not_a_finished_run(tmp_path, finished):
    with pytest.raises(ConfigError, match="not a finished run directory"):
        RunDir.open(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        RunDir.open(tmp_path)
    _, out = finished
    with pytest.raises(ConfigError, match="did not run"):
        RunDir.open(out).model_path("dense-kd")
    with pytest.raises(ConfigError, match="makes no single model"):
        RunDir.open(out).model_path("ensemble")
    with pytest.raises(ConfigError, match="kept no synthetic set for 'fedavg'; it has: sparse-kd"):
        RunDir.open(out).synthetic("fedavg")


@pytest.mark.parametrize("event", [
    StageStarted("clients", total=3, info="x", device=DeviceInfo("cpu", "cpu", 1, 2)),
    Progress("clients", 1, 3, "client 1/2", {"loss": 2.5}),
    Metric("accuracy", 0.5, "client 1", client=0),
    PartitionReady(np.arange(6).reshape(2, 3), ("a", "b", "c")),
    PrivacyChecked("fedmitr", np.array([3, 1]), {"pixel": np.array([0.1, 0.2], dtype=np.float32)},
                   {"pixel": {"median": 0.15}}),
    RunFinished({"methods": {"fedavg": {"accuracy": 0.4}}}),
])
def test_events_survive_json(event):
    back = decode_event(json.loads(json.dumps(encode_event(event))))
    assert type(back) is type(event)
    for field in dataclasses.fields(event):
        a, b = getattr(event, field.name), getattr(back, field.name)
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b) and a.dtype == b.dtype
        elif isinstance(a, dict) and any(isinstance(v, np.ndarray) for v in a.values()):
            assert all(np.array_equal(a[k], b[k]) for k in a)
        else:
            assert a == b


def test_a_bad_events_file_is_a_clear_error(tmp_path, finished):
    _, out = finished
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "metrics.json").write_text((out / "metrics.json").read_text())
    with pytest.raises(ConfigError, match="no events.jsonl"):
        list(RunDir.open(copy).events())
    (copy / "events.jsonl").write_text('{"t": 0, "type": "Nope", "fields": {}}\n')
    with pytest.raises(ConfigError, match="line 1 cannot be read"):
        list(RunDir.open(copy).events())
