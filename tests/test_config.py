from __future__ import annotations

import pytest

from weightlift import OffloadConfig, OffloadError
from weightlift.config import format_size, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [("4GiB", 4 * 2**30), ("512 MB", 512 * 10**6), ("1.5g", 1_500_000_000), ("100000", 100_000), (7, 7),
     ("2kib", 2048), ("0", 0)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["4 GiBs", "", "-1GB", "GiB", -5, 1.5, True, None])
def test_parse_size_errors_name_the_argument(bad):
    with pytest.raises(OffloadError, match="`budget`"):
        parse_size(bad, name="budget")


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(3 * 2**20) == "3.00 MiB"


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(group_size=0), "group_size"),
        (dict(group_size=2.0), "group_size"),
        (dict(num_in_group=0), "num_in_group"),
        (dict(group_size=2, num_in_group=3), "num_in_group"),
        (dict(prefetch_step=-1), "prefetch_step"),
        (dict(prefetch_step=True), "prefetch_step"),
        (dict(params="mlp"), "params"),
        (dict(params=("",)), "params"),
        (dict(params=(3,)), "params"),
        (dict(params=5), "params"),
        (dict(layers=" "), "layers"),
        (dict(layers=3), "layers"),
        (dict(layers=()), "layers"),
        (dict(layers=("model.layers", "")), "layers"),
        (dict(indices=(1, -2)), "indices"),
        (dict(indices=(True,)), "indices"),
        (dict(indices=3), "indices"),
    ],
)
def test_invalid_config_names_the_argument(kwargs, name):
    with pytest.raises(OffloadError, match=f"`{name}`"):
        OffloadConfig(**kwargs)


def test_config_is_frozen_keyword_only_and_normalises_params():
    config = OffloadConfig(params=["mlp", "self_attn.q_proj"])
    assert config.params == ("mlp", "self_attn.q_proj")
    with pytest.raises(AttributeError):
        config.group_size = 3
    with pytest.raises(TypeError):
        OffloadConfig(2, 1)


def test_layer_rule_is_vllms():
    config = OffloadConfig(group_size=4, num_in_group=2)
    assert [i for i in range(8) if config.offloads_layer(i)] == [2, 3, 6, 7]
    config = OffloadConfig(params=("mlp",))
    assert config.offloads_param("mlp.up_proj.weight")
    assert not config.offloads_param("self_attn.q_proj.weight")
    assert not config.offloads_param("mlpx.weight")


def test_indices_override_the_group_rule_and_several_stacks_are_a_tuple():
    config = OffloadConfig(group_size=4, num_in_group=1, indices=[5, 1, 5], layers=["encoder.block", "decoder.block"])
    assert config.indices == (1, 5) and config.layers == ("encoder.block", "decoder.block")
    assert [i for i in range(8) if config.offloads_layer(i)] == [1, 5]
