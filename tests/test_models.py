from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FAMILIES as DECODERS
from conftest import assert_same, refused, snapshot, tiny
from families import FAMILIES, STACKS, build
from weightlift import OffloadError
from weightlift.models import candidate_stacks, find_stacks, no_split_classes

EXPECTED = {"gpt2": "transformer.h", "opt": "model.decoder.layers"}


def _found(model, layers=None):
    return [(name, len(stack)) for name, stack in find_stacks(model, layers)]


@pytest.mark.parametrize("family", DECODERS)
def test_finds_the_decoder_stack(family):
    model = tiny(family)
    [(name, stack)] = find_stacks(model)
    assert name == EXPECTED.get(family, "model.layers")
    assert stack is model.get_submodule(name) and len(stack) == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_every_stack_of_each_family_in_execution_order(family, caplog):
    model, _ = build(family)
    with caplog.at_level("WARNING", logger="weightlift.models"):
        assert _found(model) == STACKS[family]
    assert not [r for r in caplog.records if r.name == "weightlift.models"]  # no undeclared rival list


@pytest.mark.parametrize("family", FAMILIES)
def test_stacks_run_in_the_order_found(family):
    """The first call into each stack's layers happens in the order find_stacks returns them."""
    model, kwargs = build(family)
    stacks = find_stacks(model)
    first_calls: list[str] = []

    def record(name):
        return lambda *_: None if name in first_calls else first_calls.append(name)

    handles = [layer.register_forward_pre_hook(record(name)) for name, stack in stacks for layer in stack]
    try:
        with torch.inference_mode():
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    assert first_calls == [name for name, _ in stacks]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_one_forward_on_cpu(family):
    model, kwargs = build(family)
    with torch.inference_mode():
        out = model(**kwargs)
    first = out[0] if isinstance(out, tuple) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)
    assert torch.isfinite(first).all()


def test_families_declare_their_blocks():
    """transformers 5 gathers `_no_split_modules` into a set on the root; diffusers keeps a class-level list."""
    assert no_split_classes(build("llava")[0]) >= {"CLIPEncoderLayer", "LlamaDecoderLayer"}
    assert "FluxSingleTransformerBlock" in no_split_classes(build("flux")[0])
    assert no_split_classes(nn.ModuleList([nn.Linear(2, 2)])) == set()


def test_unet_stacks_mix_block_classes_and_leave_the_mid_block_resident():
    model, _ = build("unet")
    (_, down), (_, up) = find_stacks(model)
    assert [type(b).__name__ for b in down] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert [type(b).__name__ for b in up] == ["UpBlock2D", "CrossAttnUpBlock2D"]
    sizes = [sum(p.numel() for p in b.parameters()) for b in (*down, *up)]
    assert len(set(sizes)) == 4  # blocks of different sizes
    assert all(model.mid_block is not b for b in (*down, *up))


def test_known_layout_inside_a_wrapper_keeps_its_place():
    """A UNet inside another module: its subtree yields only down_blocks and up_blocks, after a declared stack
    registered before it."""
    unet, _ = build("unet")
    text, _ = build("bert")
    wrapper = nn.Module()
    wrapper.text = text
    wrapper.unet = unet
    assert _found(wrapper) == [("text.bert.encoder.layer", 2), ("unet.down_blocks", 2), ("unet.up_blocks", 2)]


def test_declared_lists_nested_in_a_chosen_list_are_not_stacks():
    class Block(nn.Module):
        def __init__(self, inner: bool):
            super().__init__()
            self.inner = nn.ModuleList(Block(False) for _ in range(2)) if inner else None
            self.proj = nn.Linear(4, 4)

    model = nn.Module()
    model._no_split_modules = ["Block"]
    model.blocks = nn.ModuleList(Block(True) for _ in range(3))
    assert _found(model) == [("blocks", 3)]


def test_nested_lists_lose_to_the_outer_stack():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))

    model = nn.Module()
    model.blocks = nn.ModuleList(Layer() for _ in range(3))
    assert _found(model) == [("blocks", 3)]
    assert next(n for n, _, _ in candidate_stacks(model)) == "blocks"


def test_mixed_classes_are_not_a_stack():
    model = nn.Module()
    model.parts = nn.ModuleList([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)])
    with pytest.raises(OffloadError, match="no detectable layer stack"):
        find_stacks(model)


def _two_lists(rival: int = 3) -> nn.Module:
    model = nn.Module()
    model.encoder = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
    model.decoder = nn.ModuleList(nn.Conv1d(16, 16, 1) for _ in range(rival))
    return model


def test_ambiguous_plain_module_lists_both_and_says_how_to_name_them():
    with pytest.raises(OffloadError, match=r"several layer stacks.*'encoder', 'decoder'.*KiB.*`layers='encoder'`.*"
                                           r"`layers=\['encoder', 'decoder'\]`"):  # fmt: skip
        find_stacks(_two_lists())


def test_a_small_rival_list_is_not_ambiguous():
    assert _found(_two_lists(rival=1)) == [("encoder", 4)]  # a single Conv1d is not a list of >= 2 blocks
    model = _two_lists(rival=2)
    model.encoder.extend(nn.Linear(16, 16) for _ in range(2))  # 6 vs 2 layers: below half
    assert _found(model) == [("encoder", 6)]


def _blocks(kind: type) -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(6)]
    return nn.ModuleList(blocks) if kind is nn.ModuleList else nn.Sequential(*blocks)


@pytest.mark.parametrize("kind", [nn.ModuleList, nn.Sequential])
@pytest.mark.parametrize("source", ["host", "disk"])
def test_the_model_itself_may_be_the_list_of_blocks(kind, source, tmp_path):
    """`offload(nn.ModuleList([...]))`, as the quick start says; the blocks are named by their positions."""
    import weightlift

    model = _blocks(kind)
    assert _found(model) == _found(model, "") == [("", 6)]
    x = torch.randn(3, 64)

    def forward(m):  # what the code that owns a ModuleList does
        with torch.inference_mode():
            y = x
            for block in m:
                y = block(y)
            return y

    ref, snap = forward(model), snapshot(model)
    disk = dict(source="disk", disk_path=tmp_path) if source == "disk" else {}
    with weightlift.offload(model, device="cpu", config=weightlift.OffloadConfig(prefetch_step=1, **disk)) as h:
        outs = [forward(model) for _ in range(2)]
        report = h.report()
        names = [layer.name for layer in h.layers]
    assert all(torch.equal(out, ref) for out in outs)
    assert names == [str(i) for i in range(6)] and (report.prefetch_hits, report.prefetch_misses) == (12, 0)
    assert_same(model, snap)


def test_a_sequential_of_blocks_is_planned_and_a_module_list_is_refused_naming_the_fix(tmp_path):
    import weightlift

    model, x = _blocks(nn.Sequential), torch.randn(3, 64)
    with torch.inference_mode():
        ref = model(x)
    layer = 64 * 65 * 4
    plan = weightlift.plan(model, device="cpu", budget=3 * layer, sample=x, disk_path=tmp_path, reps=2)
    assert plan.stacks == ("",) or list(plan.stacks) == [""]
    assert len(plan.offloaded) >= 4  # at most 2 of the 6 layers stay beside a pool of at least one layer
    with weightlift.offload(model, plan=plan), torch.inference_mode():
        assert torch.equal(model(x), ref)
    listed = _blocks(nn.ModuleList)
    with refused(listed, "has no forward for plan"):
        weightlift.plan(listed, device="cpu", budget=3 * layer, sample=x, disk_path=tmp_path)
    with refused(listed, "has no forward for plan"):
        weightlift.offload(listed, device="cpu", budget=3 * layer)


def test_explicit_single_path():
    model = tiny("llama")
    [(name, stack)] = find_stacks(model, "model.layers")
    assert name == "model.layers" and stack is model.model.layers
    assert _found(_two_lists(), "decoder") == [("decoder", 3)]


def test_explicit_list_of_paths_in_the_order_given():
    assert _found(_two_lists(), ["decoder", "encoder"]) == [("decoder", 3), ("encoder", 4)]
    assert _found(_two_lists(), ("encoder",)) == [("encoder", 4)]
    model, _ = build("t5")
    assert _found(model, ["decoder.block"]) == [("decoder.block", 2)]


@pytest.mark.parametrize("layers", [["encoder", "encoder"], ["model.layers", "model.layers.0.mlp"],
                                    ["model.layers.1.mlp", "model"]])  # fmt: skip
def test_overlapping_paths_are_refused(layers):
    model = nn.Module()
    model.encoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
    model.model = nn.Sequential()
    model.model.layers = nn.ModuleList(nn.Sequential() for _ in range(2))
    model.model.layers[1].mlp = nn.Sequential(nn.Linear(4, 4))
    model.model.layers[0].mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(OffloadError, match=r"`layers`=\[.*overlap"):
        find_stacks(model, layers)


def test_missing_path_is_refused_naming_it_and_the_stacks_found():
    model, _ = build("t5")
    with pytest.raises(OffloadError, match=r"`layers`=\['encoder.block', 'decoder.blocks'\]: 'decoder.blocks' does "
                                           r"not exist in T5ForConditionalGeneration.*'encoder.block', "
                                           r"'decoder.block'"):  # fmt: skip
        find_stacks(model, ["encoder.block", "decoder.blocks"])
    with pytest.raises(OffloadError, match=r"`layers`='model.norm' is a LlamaRMSNorm.*'model.layers'"):
        find_stacks(tiny("llama"), "model.norm")
    with pytest.raises(OffloadError, match="`layers`=.*: 'encoder' is a ModuleList, not a non-empty"):
        find_stacks(nn.ModuleDict({"encoder": nn.ModuleList()}), ["encoder"])


@pytest.mark.parametrize("layers", [[], ["", "model.layers"], ["model.layers", 3], {"model.layers"}])
def test_layers_of_the_wrong_type_are_refused(layers):
    with pytest.raises(OffloadError, match="`layers`=.*dotted module path"):
        find_stacks(tiny("llama"), layers)
    with pytest.raises(OffloadError, match="`layers`='' is a LlamaForCausalLM, not a non-empty nn.ModuleList"):
        find_stacks(tiny("llama"), "")  # '' is the model itself


def test_an_undeclared_rival_of_a_declared_stack_is_logged(caplog):
    model = nn.Module()
    model.declared = tiny("llama", layers=2)
    model.plain = nn.ModuleList(nn.Linear(64, 64) for _ in range(40))
    with caplog.at_level("WARNING", logger="weightlift.models"):
        assert _found(model) == [("declared.model.layers", 2)]
    assert "'plain'" in caplog.text and "layers=[...]" in caplog.text
