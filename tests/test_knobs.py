"""The knob table: one parse for the command line, the app's form and the Flower app."""

from __future__ import annotations

import pytest

from fedmitr.config import preset_config
from fedmitr.errors import ConfigError
from fedmitr.knobs import KNOBS, config_from_knobs, knob_values


def test_every_knob_sets_a_real_config_field():
    cfg = preset_config("cpu")
    for knob in KNOBS.values():
        if knob.field is None:
            continue
        value = cfg
        for part in knob.field.split("."):
            value = getattr(value, part)  # raises if the table names a field that does not exist


@pytest.mark.parametrize("value", [5, 5.0, "5", " 5 "])
def test_a_whole_number_may_come_as_an_int_a_slider_float_or_a_flag_string(value):
    assert config_from_knobs({"preset": "tiny", "clients": value}).data.num_clients == 5


@pytest.mark.parametrize("values, message", [
    ({"clients": 2.5}, "clients must be a whole number >= 2 (got 2.5)"),
    ({"clients": "abc"}, "clients must be a number (got 'abc')"),
    ({"clients": True}, "clients must be a number (got a yes/no value)"),
    ({"clients": None}, "clients must be a number (got None)"),
    ({"seed": -1}, "seed must be a whole number >= 0 (got -1)"),
    ({"alpha": None}, "alpha is required"),
    ({"alpha": "abc"}, "alpha must be a number > 0 or 'iid'"),
    ({"keep": "nan"}, "keep must be a finite number"),
    ({"methods": 5}, "methods must be a comma-separated list"),
    ({"dataset": 3}, "dataset must be text"),
    ({"bogus": 1}, "unknown setting(s) 'bogus'"),
    ({"preset": "nope"}, "unknown preset 'nope'"),
    # Beyond parsing, the library's own check speaks:
    ({"keep": 1.5}, "keep_per_stop must be in (0, 1]"),
    ({"methods": "fedavg,bogus"}, "unknown method(s) 'bogus'"),
])
def test_bad_values_name_the_knob_and_what_is_allowed(values, message):
    with pytest.raises(ConfigError) as err:
        config_from_knobs({"preset": "tiny", **values})
    assert message in str(err.value)


def test_knob_values_read_a_config_back():
    cfg = config_from_knobs({"preset": "tiny", "alpha": "iid", "methods": "fedavg, fedmitr", "keep": "0.5"})
    values = knob_values(cfg)
    assert values["alpha"] == "iid" and values["methods"] == ["fedavg", "fedmitr"] and values["keep"] == 0.5
    assert config_from_knobs(values) == cfg  # a round trip
    assert knob_values(preset_config("cpu"))["alpha"] == "0.5"


def test_base_config_is_kept_where_no_knob_is_given():
    base = preset_config("cpu-49")
    cfg = config_from_knobs({"seed": "3"}, base=base)
    assert cfg.model.patch_grid == 7 and cfg.seed == 3
