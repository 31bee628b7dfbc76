import pytest

import nimblelm as nl


def test_from_dict_ignores_unknown_keys_and_round_trips():
    cfg = nl.ModelConfig.from_preset("moe-tiny")
    data = cfg.to_dict() | {"some_future_option": 3}
    assert nl.ModelConfig.from_dict(data) == cfg


def test_unknown_preset_lists_choices():
    with pytest.raises(nl.ConfigError, match="unknown preset 'nope'; choose one of: .*attention-tiny"):
        nl.ModelConfig.from_preset("nope")


@pytest.mark.parametrize("bad,message", [
    ({"hidden_size": 30, "num_heads": 4}, "not divisible by num_heads"),
    ({"num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"vocab_size": -1}, "vocab_size must be a positive integer"),
    ({"experts_top_k": 9, "num_experts": 8}, "experts_top_k 9"),
])
def test_inconsistent_configs_name_the_field(bad, message):
    with pytest.raises(nl.ConfigError, match=message):
        nl.ModelConfig.from_dict(bad)


def test_every_preset_builds_with_expected_size():
    for name in nl.preset_names():
        cfg = nl.ModelConfig.from_preset(name)
        if name.endswith("-small"):
            assert cfg.vocab_size == 8192
        assert cfg.layer_mixers() and len(cfg.layer_mixers()) == cfg.num_layers
