from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch

import weightlift
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
        (dict(mmap="yes"), "mmap"),
        (dict(source="ram"), "source"),
        (dict(expert_lookahead="next"), "expert_lookahead"),
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


EVERY_FIELD = dict(group_size=3, num_in_group=2, prefetch_step=1, params=("fc",), layers=("a", "b"), indices=(2, 0),
                   source="disk", disk_path=Path("/tmp/cache"), host_budget="1MiB", mmap=False,
                   experts=("mlp.experts",), expert_lookahead="router")  # fmt: skip


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_config_survives_pickle_and_copy_equal_and_usable(how, tmp_path):
    """Every field set (normalised values included: host_budget parsed, indices sorted, experts a tuple) comes
    back equal, hashing equal and still frozen; and a copied config offloads exactly as the original."""
    def again(c: OffloadConfig) -> list[OffloadConfig]:
        if how == "pickle":
            return [pickle.loads(pickle.dumps(c, protocol=p)) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
        return [copy.deepcopy(c) if how == "deepcopy" else copy.copy(c)]

    for config in (OffloadConfig(), OffloadConfig(**EVERY_FIELD)):
        for other in again(config):
            assert other == config and hash(other) == hash(config) and type(other) is OffloadConfig
            assert (other.host_budget, other.indices) == (config.host_budget, config.indices)
            with pytest.raises(AttributeError):
                other.group_size = 9
    assert OffloadConfig(**EVERY_FIELD).host_budget == 2**20
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)]).eval()
    x = torch.randn(2, 8)
    with torch.inference_mode():
        ref = model(x)
    config = OffloadConfig(layers="", indices=(1, 3), prefetch_step=1, source="disk", disk_path=tmp_path, mmap=False)
    (other,) = again(config)[-1:]
    with weightlift.offload(model, device="cpu", config=other) as handle, torch.inference_mode():
        out = model(x)
        assert [layer.index for layer in handle.layers] == [1, 3]
    assert torch.equal(out, ref)
