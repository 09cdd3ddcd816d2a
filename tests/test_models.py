from __future__ import annotations

import pytest
from torch import nn

from conftest import FAMILIES, tiny
from weightlift import OffloadError
from weightlift.models import candidate_stacks, find_stack

EXPECTED = {"gpt2": "transformer.h", "opt": "model.decoder.layers"}


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_the_decoder_stack(family):
    name, stack = find_stack(tiny(family))
    assert name == EXPECTED.get(family, "model.layers")
    assert len(stack) == 5


def test_nested_lists_lose_to_the_outer_stack():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))

    model = nn.Module()
    model.blocks = nn.ModuleList(Layer() for _ in range(3))
    assert find_stack(model)[0] == "blocks"
    assert next(n for n, _, _ in candidate_stacks(model)) == "blocks"


def test_mixed_classes_are_not_a_stack():
    model = nn.Module()
    model.parts = nn.ModuleList([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)])
    with pytest.raises(OffloadError, match="no detectable layer stack"):
        find_stack(model)


def test_explicit_path():
    model = tiny("llama")
    assert find_stack(model, "model.layers")[1] is model.model.layers
