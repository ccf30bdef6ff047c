"""Run configuration: presets, overrides, validation, config files, immutability."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedmitr.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config_file,
    parse_alpha,
    preset_config,
)
from fedmitr.methods import METHODS, check_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_validate(name):
    cfg = preset_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.preset == name
    assert cfg.validate() is cfg
    # The effective config survives a trip through config.json: it can be read back as overrides.
    assert apply_overrides(RunConfig(), json.loads(cfg.to_json())) == cfg


def test_preset_names_and_tiny_is_tiny():
    assert {"tiny", "cpu", "gpu"} <= set(PRESETS)
    tiny, cpu = preset_config("tiny"), preset_config("cpu")
    assert tiny.clients.epochs < cpu.clients.epochs
    assert tiny.data.max_train_samples is not None and tiny.data.max_train_samples <= 1000
    assert tiny.model.arch == "scratch" and not tiny.model.pretrained  # trains offline


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: tiny, cpu, cpu-49, gpu"):
        preset_config("nope")


def test_apply_overrides_replaces_nested_fields_only():
    base = preset_config("tiny")
    cfg = apply_overrides(base, {"seed": 3, "data": {"num_clients": 7, "dataset": "digits"},
                                 "clients": {"lr": 0.1}})
    assert (cfg.seed, cfg.data.num_clients, cfg.data.dataset, cfg.clients.lr) == (3, 7, "digits", 0.1)
    # Everything else is the preset's.
    assert cfg.data.alpha == base.data.alpha
    assert cfg.data.max_train_samples == base.data.max_train_samples
    assert cfg.clients.epochs == base.clients.epochs
    assert cfg.model == base.model and cfg.preset == "tiny"
    assert base.seed == 0 and base.data.num_clients == 5  # the input config is untouched
    assert apply_overrides(base, {}) == base


@pytest.mark.parametrize(
    "value, expected",
    [("iid", None), (" IID ", None), ("0.3", 0.3), (2, 2.0), (0.05, 0.05), (None, None)],
)
def test_alpha_override_parses_iid_and_numbers(value, expected):
    cfg = apply_overrides(preset_config("tiny"), {"data": {"alpha": value}})
    assert cfg.data.alpha == expected
    assert parse_alpha(value) == expected


@pytest.mark.parametrize("value", ["abc", "0", "-1", 0, -0.5, float("inf"), float("nan"), True, [1]])
def test_bad_alpha_is_rejected_with_the_allowed_values(value):
    with pytest.raises(ConfigError, match=r"alpha must be a number > 0 or 'iid'"):
        apply_overrides(preset_config("tiny"), {"data": {"alpha": value}})


@pytest.mark.parametrize(
    "value, expected",
    [("fedavg,ensemble", ("fedavg", "ensemble")), (" ensemble , fedavg ,", ("ensemble", "fedavg")),
     (["fedavg"], ("fedavg",))],
)
def test_methods_override_accepts_comma_strings_and_lists(value, expected):
    cfg = apply_overrides(preset_config("tiny"), {"methods": value})
    assert cfg.methods == expected
    cfg.validate()


def test_stop_at_override_parses_comma_floats():
    cfg = apply_overrides(preset_config("tiny"), {"inversion": {"stop_at": "0.1, 0.2,0.5"}})
    assert cfg.inversion.stop_at == (0.1, 0.2, 0.5)


@pytest.mark.parametrize(
    "overrides, where, allowed",
    [
        ({"bogus": 1}, "'bogus'", ["seed", "methods", "data", "clients", "distill"]),
        ({"data": {"clients": 3}}, "'data.clients'", ["dataset", "num_clients", "alpha"]),
        ({"clients": {"epoch": 3}}, "'clients.epoch'", ["epochs", "batch_size", "lr"]),
    ],
)
def test_unknown_fields_are_rejected_with_the_allowed_ones(overrides, where, allowed):
    with pytest.raises(ConfigError) as err:
        apply_overrides(preset_config("tiny"), overrides)
    message = str(err.value)
    assert f"unknown config field {where}" in message
    for name in allowed:
        assert name in message


def test_a_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="data must be a mapping of fields"):
        apply_overrides(preset_config("tiny"), {"data": 5})


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"data": {"num_clients": 1}}, r"clients must be an integer >= 2 \(got 1\)"),
        ({"data": {"num_clients": 0}}, r"clients must be an integer >= 2 \(got 0\)"),
        ({"data": {"num_clients": 2.5}}, r"clients must be an integer >= 2 \(got 2.5\)"),
        ({"data": {"num_clients": "3"}}, r"clients must be an integer >= 2 \(got '3'\)"),
        ({"data": {"alpha": 0.0}}, r"alpha must be a number > 0 \(got 0.0\); use 'iid'"),
        ({"data": {"alpha": -1.0}}, r"alpha must be a number > 0 \(got -1.0\); use 'iid'"),
        ({"data": {"alpha": float("nan")}}, r"alpha must be a number > 0"),
        ({"methods": ["fedavg"]}, r"methods must be a tuple of method names"),
        ({"seed": "0"}, r"seed must be an integer"),
        ({"model": {"embed_dim": 30, "num_heads": 4}}, r"embed_dim divisible by num_heads"),
        ({"clients": {"epochs": 0}}, r"epochs >= 1"),
        ({"relabel": {"mode": "pixel"}}, r"relabel mode must be one of token, image, neighbourhood"),
    ],
)
def test_validate_rejects_bad_values(changes, expected):
    # dataclasses.replace skips the parsing in apply_overrides, so validate() alone is tested.
    cfg = preset_config("tiny")
    for section, values in changes.items():
        if isinstance(values, dict):
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
        else:
            cfg = dataclasses.replace(cfg, **{section: values})
    with pytest.raises(ConfigError, match=expected):
        cfg.validate()


def test_every_registered_method_validates():
    cfg = apply_overrides(preset_config("tiny"), {"methods": ",".join(METHODS)})
    assert check_config(cfg).methods == tuple(METHODS)


@pytest.mark.parametrize("methods, expected", [
    (("fedavg", "bogus"), r"unknown method\(s\) 'bogus'; known: fedavg, ensemble"),
    ((), r"choose at least one method from: fedavg, ensemble"),
])
def test_method_names_are_checked_against_the_registry(methods, expected):
    cfg = dataclasses.replace(preset_config("tiny"), methods=methods)
    cfg.validate()  # the config knows no method: imports go from fedmitr.methods to fedmitr.config only
    with pytest.raises(ConfigError, match=expected):
        check_config(cfg)


def test_the_config_does_not_import_the_method_registry():
    import ast
    import inspect

    import fedmitr.config

    tree = ast.parse(inspect.getsource(fedmitr.config))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "fedmitr.methods" not in imported
    from fedmitr.config import DEFAULT_METHODS, REFERENCE_METHODS

    assert set(DEFAULT_METHODS) <= set(METHODS)  # its default names are registered methods
    assert all(not METHODS[m].synthesises for m in REFERENCE_METHODS)


@pytest.mark.parametrize(
    "overrides",
    [
        {"clients": {"epochs": "ten"}},
        {"data": {"min_client_samples": "x"}},
        {"data": {"max_train_samples": "lots"}},
        {"model": {"embed_dim": "wide"}},
        {"methods": 5},
        {"inversion": {"stop_at": "early"}},
    ],
    ids=["epochs-str", "min_client_samples-str", "max_train_samples-str", "embed_dim-str", "methods-int",
         "stop_at-str"],
)
def test_wrongly_typed_values_are_config_errors(overrides):
    """A YAML file can hold any type; a wrong one must be a ConfigError, not a TypeError/ValueError."""
    with pytest.raises(ConfigError):
        apply_overrides(preset_config("tiny"), overrides).validate()


# --- config files ----------------------------------------------------------------------------------

CONFIG_TEXTS = {
    "yaml": "seed: 4\ndata:\n  alpha: iid\n  num_clients: 3\nmethods: fedavg\n",
    "yml": "seed: 4\ndata: {alpha: iid, num_clients: 3}\nmethods: [fedavg]\n",
    "json": '{"seed": 4, "data": {"alpha": "iid", "num_clients": 3}, "methods": ["fedavg"]}',
}


@pytest.mark.parametrize("suffix", list(CONFIG_TEXTS))
def test_load_config_file_reads_yaml_and_json(suffix, tmp_path):
    path = tmp_path / f"run.{suffix}"
    path.write_text(CONFIG_TEXTS[suffix])
    cfg = apply_overrides(preset_config("tiny"), load_config_file(path)).validate()
    assert (cfg.seed, cfg.data.alpha, cfg.data.num_clients, cfg.methods) == (4, None, 3, ("fedavg",))


def test_empty_config_file_means_no_overrides(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing to change\n")
    assert load_config_file(path) == {}


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("missing.yaml", None, r"cannot read config file .*missing.yaml"),
        ("a_dir.yaml", "DIR", r"cannot read config file .*a_dir.yaml"),
        ("bad.yaml", "data: [unclosed\n", r"bad.yaml' is not valid YAML/JSON"),
        ("bad.json", '{"seed": 1,}', r"bad.json' is not valid YAML/JSON"),
        ("tab.yaml", "data:\n\tseed: 1\n", r"is not valid YAML/JSON"),
        ("list.yaml", "- seed\n- 1\n", r"must hold a mapping of fields \(got list\)"),
        ("scalar.json", "3", r"must hold a mapping of fields \(got int\)"),
    ],
)
def test_load_config_file_rejects_unusable_files(name, text, expected, tmp_path):
    path = tmp_path / name
    if text == "DIR":
        path.mkdir()
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config_file(path)


# --- immutability ----------------------------------------------------------------------------------

@pytest.mark.parametrize("section, field", [(None, "seed"), ("data", "alpha"), ("clients", "epochs"),
                                            ("model", "depth"), ("distill", "rounds")])
def test_configs_are_frozen(section, field):
    cfg = preset_config("tiny")
    target = cfg if section is None else getattr(cfg, section)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(target, field, 99)
    assert getattr(target, field) != 99


@pytest.mark.parametrize("overrides, message", [
    ({"inversion": {"stopped_fill": "grey"}}, "stopped_fill must be one of background, black, mean, noise"),
    ({"distill": {"view": "half"}}, "distill view must be one of whole, kept"),
    ({"distill": {"ema": 1.0}}, r"distill ema must be in \[0, 1\)"),
    ({"distill": {"ema": -0.1}}, r"distill ema must be in \[0, 1\)"),
])
def test_fill_view_and_average_are_checked_with_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset_config("tiny"), overrides).validate()
