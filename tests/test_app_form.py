"""The Run form: one definition of its fields, its UI rules, and the checks it leaves to the library."""

from __future__ import annotations

import dataclasses

import pytest

from app import form
from fedmitr.config import preset_config
from fedmitr.errors import ConfigError
from fedmitr.methods import METHODS


GOOD = form.FormValues(dataset="mnist5k", clients=5, alpha="0.5", methods=["fedavg", "ensemble"], preset="tiny",
                       epochs=2, iterations=10, images=8, keep=0.7, relabel="token", rounds=2, seed=3, init="scratch")


def config(**changes):
    return dataclasses.replace(GOOD, **changes).to_config()


def test_form_values_override_the_preset():
    cfg = config(alpha="iid", clients=7.0)
    assert cfg.preset == "tiny" and cfg.data.num_clients == 7 and cfg.data.alpha is None
    assert cfg.clients.epochs == 2 and cfg.inversion.iterations == 10 and cfg.inversion.images_per_round == 8
    assert cfg.distill.rounds == 2 and cfg.seed == 3 and cfg.methods == ("fedavg", "ensemble")
    assert cfg.data.max_train_samples == preset_config("tiny").data.max_train_samples  # untouched fields stay


def test_the_fields_are_defined_once_in_input_order():
    names = form.FormValues.names()
    assert names == ["dataset", "clients", "alpha", "methods", "preset", "epochs", "iterations", "images", "keep",
                     "relabel", "rounds", "seed", "init", "more_methods"]
    assert form.FormValues.from_inputs(GOOD.inputs()) == GOOD
    with pytest.raises(ConfigError, match="14 inputs"):
        form.FormValues.from_inputs(GOOD.inputs()[:-1])


def test_the_paper_baselines_are_listed_under_advanced_and_opt_in():
    main, more = form.main_methods(), form.more_methods()
    assert set(main) | set(more) == set(METHODS) and not set(main) & set(more)
    assert {"dense-gen", "co-boosting", "sparse-kd"} <= set(more)
    assert {"fedavg", "ensemble", "dense-kd", "fedmitr"} <= set(main)
    defaults = form.FormValues.for_preset("cpu")
    assert list(defaults.more_methods) == [] and defaults.to_config().methods == preset_config("cpu").methods
    # Chosen under Advanced, they run after the main list's methods, on the same clients.
    assert config(more_methods=["co-boosting", "dense-gen"]).methods == ("fedavg", "ensemble", "co-boosting",
                                                                         "dense-gen")
    # Either list takes any method (the API too, as a comma-separated string), and a name in both runs once.
    assert config(methods="fedavg", more_methods="sparse-kd, fedavg").methods == ("fedavg", "sparse-kd")
    # A preset whose methods include ablations shows them under Advanced.
    tiny = form.FormValues.for_preset("tiny")
    assert list(tiny.methods) + list(tiny.more_methods) == list(preset_config("tiny").methods)
    assert set(tiny.methods) <= set(main) and set(tiny.more_methods) <= set(more)


@pytest.mark.parametrize("more, message", [
    ("nope", "unknown method"),
    ([1, 2], "more_methods must be a list of method names"),
])
def test_a_bad_advanced_method_list_is_refused(more, message):
    with pytest.raises(ConfigError, match=message):
        config(more_methods=more)


def test_defaults_are_the_cpu_preset():
    assert form.FormValues.for_preset("cpu").to_config() == preset_config("cpu")
    assert form.FormValues.for_preset("cpu").methods == list(preset_config("cpu").methods)


@pytest.mark.parametrize("change, message", [
    # The app's caps, naming the field:
    ({"clients": 21}, "clients must be at most 20 in this app"),
    ({"images": form.MAX_IMAGES_PER_ROUND + 1}, "images must be at most 2,000 in this app"),
    # Parsed by the knob table, as the CLI and the Flower app parse them:
    ({"clients": 1}, "clients must be a whole number >= 2"),
    ({"clients": 2.5}, "clients must be a whole number"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"epochs": 2.5}, "epochs must be a whole number"),
    ({"rounds": 0.5}, "rounds must be a whole number"),
    ({"iterations": "ten"}, "iterations must be a number"),
    ({"epochs": 0}, "epochs must be a whole number >= 1"),
    ({"seed": -1}, "seed must be a whole number >= 0"),
    ({"keep": "half"}, "keep must be a number"),
    ({"alpha": None}, "alpha is required"),
    # Everything else comes from RunConfig.validate, exactly as the CLI reports it:
    ({"alpha": "0"}, "alpha must be a number > 0"),
    ({"alpha": "-1"}, "alpha must be a number > 0"),
    ({"alpha": "lots"}, "alpha must be a number > 0 or 'iid'"),
    ({"methods": []}, "at least one method"),
    ({"methods": ["magic"]}, "unknown method"),
    ({"dataset": "nope"}, "unknown dataset"),
    ({"dataset": "hf:foo"}, "hf:owner/name"),
    ({"preset": "huge"}, "unknown preset"),
    ({"keep": 0}, "keep_per_stop must be in \\(0, 1\\]"),
    ({"relabel": "psychic"}, "relabel mode must be one of"),
])
def test_bad_input_is_refused_clearly(change, message):
    with pytest.raises(ConfigError, match=message):
        config(**change)


@pytest.mark.parametrize("change", [{"relabel": "psychic"}, {"clients": 2.5}, {"alpha": "lots"}, {"seed": -1}])
def test_the_app_and_the_command_line_give_the_same_message(change, capsys):
    from fedmitr.cli import main

    from fedmitr.errors import SettingError

    with pytest.raises(SettingError) as from_form:
        config(**change)
    (name, value), = change.items()
    assert main(["run", "--preset", "tiny", f"--{name}", str(value)]) == 2
    # One refusal, from the library's knob: the command line names its flag as typed.
    assert from_form.value.setting == name
    assert capsys.readouterr().err.strip() == f"fedmitr: error: {from_form.value.named(f'--{name}')}"


def test_hub_dataset_refused_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline"):
        form.check_hub(config(dataset="cifar10"))
    assert all("offline" in label.lower() for label, name in form.dataset_choices() if form.is_hub_dataset(name))


def test_hub_dataset_accepted_when_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert config(dataset="cifar10").data.dataset == "cifar10"
    assert config(dataset="hf:someone/some-set").data.dataset == "hf:someone/some-set"


def test_dataset_choices_list_bundled_first():
    names = [name for _, name in form.dataset_choices()]
    assert names[:3] == ["mnist5k", "mnist-canvas", "digits"] and "cifar10" in names


def test_default_methods_are_registered_methods():
    assert form.FormValues.for_preset("cpu").methods == ["fedavg", "ensemble", "dense-kd", "fedmitr"]
    assert set(form.FormValues.for_preset("cpu").methods) <= set(METHODS)


def test_preset_knobs_match_the_preset():
    k = form.FormValues.for_preset("gpu")
    cfg = preset_config("gpu")
    assert (k.epochs, k.iterations, k.images, k.rounds, k.relabel, k.keep) == (
        cfg.clients.epochs, cfg.inversion.iterations, cfg.inversion.images_per_round, cfg.distill.rounds,
        cfg.relabel.mode, cfg.inversion.keep_per_stop)


def test_check_hub_refuses_what_cannot_be_had(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cfg = config(dataset="cifar10")
    with pytest.raises(ConfigError, match="cannot reach"):
        form.check_hub(cfg, reachable=lambda: False)
    form.check_hub(cfg, reachable=lambda: True)  # online: fine
    form.check_hub(config(), reachable=lambda: pytest.fail("a bundled run must not probe the network"))
    # The gpu preset needs pretrained weights from the Hub, whatever the dataset.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="pretrained weights"):
        form.check_hub(config(preset="gpu", images=100))


def test_hub_reachable_is_false_for_a_closed_port(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert form.hub_reachable(timeout_s=1.0) is False



def test_the_49_token_switch_goes_there_and_back():
    preset, methods = form.high_token_settings(True)
    assert preset == form.HIGH_TOKEN_PRESET == "cpu-49"
    assert methods == list(form.HIGH_TOKEN_METHODS)  # exactly the list, in its order
    assert preset_config(preset).model.patch_grid == 7  # 49 tokens per image
    # Off: the 16-token defaults the form starts with.
    assert form.high_token_settings(False) == ("cpu", form.FormValues.for_preset("cpu").methods)


def test_the_49_token_methods_are_registered():
    """The switch's list is a constant to edit: every name in it must be a registered method (a
    method renamed in the library fails here, not in front of a visitor)."""
    assert set(form.HIGH_TOKEN_METHODS) <= set(METHODS), set(form.HIGH_TOKEN_METHODS) - set(METHODS)


def test_a_49_token_method_that_is_not_registered_is_named(monkeypatch):
    monkeypatch.setattr(form, "HIGH_TOKEN_METHODS", ("fedavg", "fedmitr-gone"))
    with pytest.raises(ConfigError, match="fedmitr-gone"):
        form.high_token_settings(True)


def test_the_preset_and_49_token_help_say_what_they_set():
    from app import layout
    from fedmitr.config import PRESETS

    assert all(f"{name}:" in layout.preset_info() for name in PRESETS)  # cpu-49 included
    info = layout.high_token_info()
    preset, methods = form.high_token_settings(True)
    assert f"the {preset} preset" in info and ", ".join(methods) in info  # every method it ticks, dense-kd too
    assert "Off: the cpu preset" in info
