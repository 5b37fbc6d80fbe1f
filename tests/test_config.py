import json

import pytest
import transformers

from hf_autoround import AutoRoundConfig
from hf_autoround.scheme import QuantScheme


def test_is_a_transformers_autoround_config_of_the_same_name():
    cfg = AutoRoundConfig()
    assert isinstance(cfg, transformers.AutoRoundConfig)
    assert type(cfg).__name__ == "AutoRoundConfig"
    assert cfg.scheme == QuantScheme(4, 128, True)


@pytest.mark.parametrize("field,value,needle", [
    ("bits", 5, "one of (2, 3, 4, 8)"),
    ("bits", 1, "one of (2, 3, 4, 8)"),
    ("group_size", 0, "-1 (per channel) or a positive int"),
    ("group_size", -2, "-1 (per channel) or a positive int"),
    ("group_size", "128", "-1 (per channel) or a positive int"),
    ("sym", "yes", "True or False"),
    ("data_type", "fp8", "one of ('int',)"),
    ("packing_format", "zip", "one of"),
    ("iters", -1, "an int >= 0"),
    ("nsamples", 0, "a positive int"),
    ("lr", -0.1, "positive float"),
    ("extra_config", {"mlp": {"bits": 5}}, "extra_config['mlp']['bits']=5"),
    ("extra_config", {"mlp": 8}, "extra_config['mlp']=8"),
])
def test_bad_values_name_the_field_and_what_is_allowed(field, value, needle):
    with pytest.raises(ValueError) as err:
        AutoRoundConfig(**{field: value})
    message = str(err.value)
    assert field in message and needle in message


def test_unusual_group_size_warns(caplog):
    with caplog.at_level("WARNING"):
        AutoRoundConfig(group_size=48)
    assert "group_size=48" in caplog.text


def test_runtime_objects_are_refused():
    with pytest.raises(ValueError, match="model.quantize"):
        AutoRoundConfig(dataset="x.txt")


def test_round_trips_through_a_dict_and_keeps_unknown_keys():
    cfg = AutoRoundConfig(bits=2, group_size=64, sym=False, extra_config={"lm_head": {"bits": 16}},
                          autoround_version="0.16.1")
    d = cfg.to_dict()
    json.dumps(d)
    assert d["quant_method"] == "auto-round" and "backend" not in d
    back = AutoRoundConfig.from_dict(d)
    assert back.to_dict() == d and back.autoround_version == "0.16.1"


def test_base_class_instances_are_rewrapped():
    base = transformers.AutoRoundConfig(bits=2, group_size=32, sym=False)
    cfg = AutoRoundConfig.coerce(base)
    assert isinstance(cfg, AutoRoundConfig) and cfg.scheme == QuantScheme(2, 32, False)


@pytest.mark.parametrize("value,expected", [
    ("model.layers", ["model.layers"]),
    ("a.layers, b.layers", ["a.layers", "b.layers"]),
    (["a.layers", ["b.layers"]], ["a.layers", "b.layers"]),
    (None, None),
])
def test_block_names_accept_every_shape(value, expected):
    assert AutoRoundConfig(block_name_to_quantize=value).block_names == expected


def test_layer_overrides_exact_then_regex():
    cfg = AutoRoundConfig(bits=4, extra_config={
        "model.layers.0.mlp.down_proj": {"bits": 8},
        r"mlp\.(up|gate)_proj": {"bits": 2, "group_size": 32, "sym": False},
        "self_attn.o_proj": {"bits": 16},
    })
    assert cfg.scheme_for("model.layers.0.mlp.down_proj") == QuantScheme(8, 128, True)
    assert cfg.scheme_for("model.layers.3.mlp.up_proj") == QuantScheme(2, 32, False)
    assert cfg.scheme_for("model.layers.3.self_attn.o_proj") is None
    assert cfg.scheme_for("model.layers.3.self_attn.q_proj") == QuantScheme(4, 128, True)
