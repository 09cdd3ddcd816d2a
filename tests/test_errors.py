"""Every misuse is an `OffloadError` naming the argument and the fix, and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightlift
import weightlift.apply as apply_module
from conftest import assert_outputs_equal, assert_same, hook_counts, prompt, refused, run, snapshot, tiny
from weightlift import OffloadConfig, OffloadError


def _assert_refused(model, match, **kwargs):
    with refused(model, match):
        weightlift.offload(model, **kwargs)


def test_layers_path_that_does_not_exist():
    model = tiny("llama")
    _assert_refused(model, r"`layers`='model\.blocks' does not exist.*'model\.layers'",
                    device="cpu", config=OffloadConfig(layers="model.blocks"))  # fmt: skip


def test_layers_path_that_is_not_a_list():
    _assert_refused(tiny("llama"), "`layers`='model.norm' is a LlamaRMSNorm", config=OffloadConfig(layers="model.norm"))


def test_model_without_a_layer_stack():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _assert_refused(model, "no detectable layer stack.*`layers=", device="cpu")


def test_two_stacks_of_similar_size_are_ambiguous():
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.decoder = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    _assert_refused(EncDec(), "several layer stacks.*'encoder', 'decoder'.*`layers=", device="cpu")


def test_named_stack_resolves_ambiguity():
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.decoder = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for layer in (*self.encoder, *self.decoder):
                x = layer(x)
            return x

    model = EncDec().eval()
    x = torch.randn(2, 8)
    with torch.inference_mode():
        ref = model(x)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(layers="decoder")) as handle, torch.no_grad():
        assert torch.equal(model(x), ref)
        assert handle.report().stack == "decoder"


def test_already_offloaded():
    model = tiny("llama")
    with weightlift.offload(model, device="cpu"):
        # while offloaded, parameters are views of slots being filled: compare true weights and storages
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ptrs, hooks = [p.data_ptr() for p in model.parameters()], hook_counts(model)
        with pytest.raises(OffloadError, match="already offloaded.*remove()"):
            weightlift.offload(model, device="cpu")
        with pytest.raises(OffloadError, match="already offloaded"):
            weightlift.offload(model, device="cpu", config=OffloadConfig(layers="model.layers"))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert [p.data_ptr() for p in model.parameters()] == ptrs and hook_counts(model) == hooks


def test_parameters_on_the_meta_device():
    with torch.device("meta"):
        model = tiny("llama")
    with refused(model, "`model.embed_tokens.weight` is on the meta device"):
        weightlift.offload(model, device="cpu")
    assert all(p.is_meta for p in model.parameters())
    assert hook_counts(model) == [0] * len(hook_counts(model))


@pytest.mark.parametrize("device", ["gpu9", "cuda:x", 3.5])
def test_device_torch_does_not_know(device):
    _assert_refused(tiny("llama"), "`device`=.* is not a device torch knows", device=device)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks the message on a machine without an accelerator")
def test_device_this_machine_does_not_have():
    _assert_refused(tiny("llama"), r"`device`='cuda' is not available on this machine", device="cuda")


def test_meta_device_target():
    _assert_refused(tiny("llama"), "`device`='meta' is not available", device="meta")


def test_wrong_types():
    with pytest.raises(OffloadError, match="`model` must be a torch.nn.Module"):
        weightlift.offload("not a model")
    model = tiny("llama")
    _assert_refused(model, "`config` must be a weightlift.OffloadConfig", config={"group_size": 2})


def test_params_filter_matching_nothing():
    _assert_refused(tiny("llama"), r"`params`=\('nope',\) matches no parameter.*self_attn",
                    device="cpu", config=OffloadConfig(params=("nope",)))  # fmt: skip


class Opaque(torch.Tensor):
    """A wrapper subclass with no storage and no __tensor_flatten__: nothing says where its bytes are."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self._hidden = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x._hidden if isinstance(x, Opaque) else x

        if func is torch.ops.aten.detach.default:
            return Opaque(args[0]._hidden)
        return func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))


def test_tensor_type_that_cannot_be_taken_apart_is_refused_before_anything_moves():
    model = tiny("llama")
    w = model.model.layers[2].mlp.up_proj.weight
    model.model.layers[2].mlp.up_proj.weight = nn.Parameter(Opaque(w.detach()), requires_grad=False)
    snap, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(OffloadError) as err:
        weightlift.offload(model, device="cpu")
    message = str(err.value)
    assert "`model.layers.2.mlp.up_proj.weight` is a test_errors.Opaque" in message
    assert "__tensor_flatten__" in message and "weightlift.adapters.Adapter" in message
    assert_same(model, snap, same_storage=False)
    assert hook_counts(model) == hooks


def test_opaque_tensor_outside_the_offloaded_layers_is_left_resident():
    model = tiny("llama")
    ids = prompt()
    w = model.model.norm.weight
    model.model.norm.weight = nn.Parameter(Opaque(w.detach()), requires_grad=False)
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        out = run(model, ids)
        assert handle.report().layers_offloaded == 5
    assert_outputs_equal(out, ref)


def test_storage_subclass_streams_like_a_plain_tensor():
    class Tagged(torch.Tensor):
        pass

    model = tiny("llama")
    ids = prompt()
    for layer in model.model.layers:
        layer.mlp.up_proj.weight = nn.Parameter(layer.mlp.up_proj.weight.detach().as_subclass(Tagged))
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)):
        assert type(model.model.layers[0].mlp.up_proj.weight) is Tagged
        out = run(model, ids)
    assert_outputs_equal(out, ref)
    assert type(model.model.layers[0].mlp.up_proj.weight) is Tagged


def test_autograd_through_offloaded_weights_fails_clearly():
    model = tiny("llama")
    ids = prompt()
    with weightlift.offload(model, device="cpu"):
        with pytest.raises(OffloadError, match=r"`model.layers.0` is offloaded.*inference-only.*inference_mode"):
            model(ids)
        logits, _ = run(model, ids)  # still works under inference mode afterwards
        with torch.no_grad():
            assert torch.equal(model(ids).logits, logits)
        model.requires_grad_(False)
        assert torch.equal(model(ids).logits, logits)  # nothing needs grad: allowed


def test_failure_during_setup_rolls_back(monkeypatch):
    """An error after weights started moving (out of memory, say) restores the model."""
    model = tiny("llama")
    snap, hooks = snapshot(model), hook_counts(model)

    def fail(*args, **kwargs):
        raise MemoryError("simulated allocation failure")

    monkeypatch.setattr(apply_module, "ThreadEngine", fail)
    with pytest.raises(MemoryError):
        weightlift.offload(model, device="cpu")
    assert_same(model, snap, same_storage=True)
    assert hook_counts(model) == hooks


def test_an_adapter_passed_to_offload_streams_a_type_weightlift_cannot_take_apart():
    """The fix the refusal above names: an `adapters.Adapter` for `Opaque` (its bytes in ``_hidden``)."""
    from weightlift.tensors import Parts

    class HiddenAdapter:
        name = "hidden"

        def matches(self, tensor):
            return isinstance(getattr(tensor, "_hidden", None), torch.Tensor)  # duck-typed, no class name

        def take_apart(self, tensor):
            def install(held, leaves):
                held._hidden = leaves[0]

            return Parts([tensor._hidden], lambda leaves: Opaque(leaves[0]), install, "adapter hidden")

    model = tiny("llama")
    for layer in model.model.layers:
        w = layer.mlp.up_proj.weight
        layer.mlp.up_proj.weight = nn.Parameter(Opaque(w.detach().clone()), requires_grad=False)
    ids = prompt()
    ref = run(model, ids)
    hidden = [layer.mlp.up_proj.weight._hidden.clone() for layer in model.model.layers]
    config = OffloadConfig(prefetch_step=2)
    with weightlift.offload(model, device="cpu", config=config, adapters=[HiddenAdapter()]) as handle:
        out = run(model, ids)
        kinds = {e.qualname: e.parts.kind for e in handle.layers[0].master.layout.entries}
        slot = handle.report().slot_bytes
    assert_outputs_equal(out, ref)
    assert kinds["mlp.up_proj.weight"] == "adapter hidden" and kinds["mlp.down_proj.weight"] == "plain"
    assert slot == sum((4 * p.numel() + 511) // 512 * 512 for p in tiny("llama").model.layers[0].parameters())
    for layer, before in zip(model.model.layers, hidden):
        assert type(layer.mlp.up_proj.weight) is Opaque and torch.equal(layer.mlp.up_proj.weight._hidden, before)


def test_a_skip_fails_where_every_extra_is_installed_unless_it_is_about_the_accelerator(tmp_path):
    """`make test` sets WEIGHTLIFT_NO_SKIPS=1 (tests/skips.py): a missing package is then a failure."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_inner.py").write_text(
        "import pytest\n"
        "def test_missing():\n    pytest.importorskip('weightlift_no_such_package')\n"
        "@pytest.mark.skip(reason='needs an accelerator (run on a GPU machine)')\n"
        "def test_gpu():\n    pass\n"
    )  # fmt: skip

    def inner(require: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "WEIGHTLIFT_NO_SKIPS": require}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "skips", "-p", "no:cacheprovider", "test_inner.py"]
        out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1]

    assert "1 failed, 1 skipped" in inner("1")
    assert "2 skipped" in inner("0")


class Scaled(nn.Module):
    """A layer with a parameter and a persistent buffer, both offloaded."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.register_buffer("scale", torch.rand(dim))

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale


class Lazy(Scaled):
    """Returns its result as a generator (``wrap``: inside a tuple), computed when consumed."""

    wrap = False

    def forward(self, x):
        gen = (super(Lazy, self).forward(x) for _ in range(1))
        return (gen,) if self.wrap else gen


def _blocks(cls=Scaled, n: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[cls() for _ in range(n)]).eval()


@pytest.mark.parametrize("wrap", [False, True], ids=["generator", "in-a-tuple"])
def test_a_layer_returning_a_generator_is_refused_at_its_forward(wrap):
    """Consumed later, a generator would compute on the slot after it went to the next layer: refused when
    the layer returns, naming it; remove() gives the model back as it was."""
    model = _blocks(Lazy, 1)
    model[0].wrap = wrap
    snap, hooks = snapshot(model), hook_counts(model)
    handle = weightlift.offload(model, device="cpu", config=OffloadConfig(layers="", prefetch_step=1))
    lazy = r"`0` returned a generator, computed after the layer returns.*tuple"
    with pytest.raises(OffloadError, match=lazy), torch.inference_mode():
        model(torch.randn(2, 16))
    handle.remove()
    assert_same(model, snap, same_storage=True)
    assert hook_counts(model) == hooks


CONVERSIONS = {
    "half": lambda m: m.half(),
    "double": lambda m: m.double(),
    "to-bfloat16": lambda m: m.to(torch.bfloat16),
    "to-meta": lambda m: m.to("meta"),
    "buffer-replaced": lambda m: m[2].register_buffer("scale", torch.ones(16)),
    "data-set": lambda m: setattr(m[3].fc.weight, "data", torch.zeros(16, 16)),
}


@pytest.mark.parametrize("convert", list(CONVERSIONS))
def test_converting_an_offloaded_model_is_refused_at_its_next_forward(convert):
    """torch has no per-module hook on ``Module._apply``: ``model.half()`` and friends convert whatever bytes
    the shared slots hold then, and replace buffers. The next forward (and state_dict) sees that an offloaded
    tensor left its slot and refuses, naming it and the fix; remove() puts the offloaded tensors back."""
    model = _blocks()
    x = torch.randn(2, 16)
    with torch.inference_mode():
        ref = model(x)
    snap = snapshot(model)
    handle = weightlift.offload(model, device="cpu", config=OffloadConfig(layers="", prefetch_step=1))
    with torch.inference_mode():
        model(x)
    CONVERSIONS[convert](model)
    name = {"buffer-replaced": r"`2\.scale`", "data-set": r"`3\.fc\.weight`"}.get(convert, r"`0\.(fc\.weight|scale)`")
    refusal = name + r" no longer reads the slot.*Call `handle\.remove\(\)` first"
    with pytest.raises(OffloadError, match=refusal), torch.inference_mode():
        model(x.to(model[0].fc.bias.dtype))
    with pytest.raises(OffloadError, match="no longer reads the slot"):
        model.state_dict()
    handle.remove()  # every tensor was offloaded: the model is back as it was, conversion undone
    assert_same(model, snap)
    with torch.inference_mode():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("offloaded", [True, False], ids=["offloaded-from-host", "resident"])
def test_one_layer_on_the_meta_device_is_refused_naming_its_full_name(offloaded):
    """Layer 2 left on meta (the rest loaded): offloaded from host RAM there is nothing to copy (stream it from
    disk instead); kept resident it would have no data (load it). Both name the tensor by its full name."""
    model = tiny("llama")
    model.model.layers[2].to("meta")
    config = OffloadConfig() if offloaded else OffloadConfig(indices=(0, 1, 3))
    fix = r"source='disk' or 'checkpoint', disk_path=" if offloaded else r"and is not offloaded: load the weights"
    _assert_refused(model, rf"`model\.layers\.2\.self_attn\.q_proj\.weight` is on the meta device.*{fix}",
                    device="cpu", config=config)  # fmt: skip


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "legacy quantized"])
def test_a_sparse_or_legacy_quantized_tensor_is_refused_naming_it_and_kept_resident_by_params(kind):
    """Neither has one storage of bytes to stream: refused naming the tensor (a sparse parameter once failed
    with torch's NotImplementedError while the layer stacks were being sized); the `params=` the message
    suggests leaves it resident and offloads the rest."""
    model = tiny("llama")
    up = model.model.layers[1].mlp.up_proj
    w = up.weight.detach()
    if kind == "legacy quantized":
        up.register_buffer("q", torch.quantize_per_tensor(w, 0.1, 0, torch.qint8))
        name = "model.layers.1.mlp.up_proj.q"
    else:
        up.weight = nn.Parameter(w.to_sparse() if kind == "sparse_coo" else w.to_sparse_csr(), requires_grad=False)
        name = "model.layers.1.mlp.up_proj.weight"
    match = rf"`{name}` holds a (torch\.)?{kind} tensor.*narrowing OffloadConfig\(params="
    if kind == "legacy quantized":
        _assert_refused(model, match, device="cpu")
    else:  # `refused` compares bytes with torch.equal, which sparse tensors lack: compare them here
        sparse, snap, hooks = up.weight, snapshot(model.model.layers[0]), hook_counts(model)
        with pytest.raises(OffloadError, match=match):
            weightlift.offload(model, device="cpu")
        assert up.weight is sparse and torch.equal(sparse.to_dense(), w) and hook_counts(model) == hooks
        assert_same(model.model.layers[0], snap, same_storage=True)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(params=("self_attn",))) as handle:
        assert handle.report().layers_offloaded == 5


class SavesATransposedView(Scaled):
    """Adds to its state dict a view of its weight in a form weightlift does not stream (transposed)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "fc_t"] = self.fc.weight.detach().t()


def test_a_state_dict_value_that_cannot_be_mapped_to_true_weights_is_refused():
    """Saved while offloaded, `0.fc_t` would be the bytes of whatever layer the shared slot holds: refused
    naming the key and the layer; after `remove()` the state dict is the model's again."""
    model = _blocks(SavesATransposedView, 3)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    handle = weightlift.offload(model, device="cpu", config=OffloadConfig(layers="", prefetch_step=1))
    unmappable = r"`0\.fc_t` of offloaded layer `0` is saved in a form weightlift cannot map back.*`handle\.remove\(\)`"
    with pytest.raises(OffloadError, match=unmappable):
        model.state_dict()
    handle.remove()
    now = model.state_dict()
    assert now.keys() == ref.keys() and all(torch.equal(now[k], v) for k, v in ref.items())


def test_cuda_graph_on_a_removed_handle_is_refused():
    handle = weightlift.offload(tiny("llama"), device="cpu")
    handle.remove()
    removed = r"`cuda_graph` on a removed handle: offload the model again"
    with pytest.raises(OffloadError, match=removed), handle.cuda_graph(None):
        pass
