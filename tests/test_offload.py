"""Offloaded equals resident, bit for bit, and `remove()` gives the model back as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gates
import weightlift
from conftest import FAMILIES, assert_outputs_equal, assert_same, hook_counts, mlp_segment, prompt, run, snapshot, tiny
from weightlift import OffloadConfig

# (group_size, num_in_group, prefetch_step) on 5 layers
CONFIGS = {
    "all-step1": (1, 1, 1),
    "all-step2-not-dividing": (1, 1, 2),
    "all-step3-not-dividing": (1, 1, 3),
    "all-step-larger-than-layers": (1, 1, 9),
    "every-other": (2, 1, 1),
    "groups-3-of-2": (3, 2, 2),
    "no-prefetch": (1, 1, 0),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_bitwise_equal_to_resident(family, cfg, monkeypatch):
    """Under gated copies (tests/gates.py): a copy lands only when waited on, so a missing wait reads old
    bytes and a synchronous load that skips the copy in flight is overwritten by it, every time."""
    model = tiny(family)
    ids = prompt()
    ref = run(model, ids)
    group, num, step = CONFIGS[cfg]
    config = OffloadConfig(group_size=group, num_in_group=num, prefetch_step=step)
    held = gates.hold(monkeypatch)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        out = run(model, ids)
        report = handle.report()
    assert_outputs_equal(out, ref)
    tokens = out[1]
    assert tokens.shape[1] == ids.shape[1] + 8
    assert held.held == (report.copies - report.prefetch_misses)  # every background copy went through a gate
    assert report.layers_offloaded == sum(1 for i in range(5) if i % group >= group - num)
    if step == 0:  # every layer loads when it runs
        assert report.prefetch_misses == report.layers_offloaded * 9 and report.prefetch_hits == 0
        return
    assert report.prefetch_misses == 0
    # the logits forward and generate's 8 forwards (prefill + 7 decode steps... one per new token) each
    # run every offloaded layer once, and every one of them found its copy started in advance
    assert report.prefetch_hits == report.layers_offloaded * 9


@pytest.mark.parametrize("family", FAMILIES)
def test_params_filter_offloads_only_matching(family):
    model = tiny(family)
    ids = prompt()
    ref_logits, ref_tokens = run(model, ids)
    segment = mlp_segment(family)
    config = OffloadConfig(prefetch_step=2, params=(segment,))
    with weightlift.offload(model, device="cpu", config=config) as handle:
        logits, tokens = run(model, ids)
        layers = handle.layers
        names = {e.qualname for layer in layers for e in layer.master.layout.entries}
    assert names and all(f".{segment}." in f".{n}." for n in names)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", ["llama", "gemma", "mixtral", "gpt2"])
def test_remove_restores_everything(family):
    model = tiny(family)
    ids = prompt()
    ref_logits, _ = run(model, ids)
    snap = snapshot(model)
    hooks = hook_counts(model)
    handle = weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2))
    run(model, ids)
    handle.remove()
    handle.remove()  # idempotent
    # on a CPU target the original storages are the masters: the very same memory comes back
    assert_same(model, snap, same_storage=True)
    assert hook_counts(model) == hooks
    assert not weightlift.hooks.is_offloaded(model)
    logits, _ = run(model, ids)
    assert torch.equal(logits, ref_logits)
    # and it can be offloaded again
    with weightlift.offload(model, device="cpu"):
        assert torch.equal(run(model, ids)[0], ref_logits)


def test_tied_embeddings_stay_one_tensor():
    model = tiny("gemma")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with weightlift.offload(model, device="cpu"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight is model.model.embed_tokens.weight


class Block(nn.Module):
    def __init__(self, dim: int, shared: nn.Linear | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.shared = shared if shared is not None else nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.tanh(self.shared(self.fc(x)))


class Stack(nn.Module):
    """Plain ModuleList model; ``order`` lets a test run layers out of order or twice."""

    def __init__(self, n: int = 6, dim: int = 32, share: bool = False) -> None:
        super().__init__()
        shared = nn.Linear(dim, dim) if share else None
        self.layers = nn.ModuleList(Block(dim, shared) for _ in range(n))
        self.head = nn.Linear(dim, 8)
        self.order = list(range(n))

    def forward(self, x):
        for i in self.order:
            x = self.layers[i](x)
        return self.head(x)


def _stack(**kw) -> Stack:
    torch.manual_seed(0)
    return Stack(**kw).eval()


def test_weights_shared_across_layers_stay_resident_and_correct():
    model = _stack(share=True)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        ref = model(x)
    shared = model.layers[0].shared.weight
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        with torch.inference_mode():
            out = model(x)
        entries = [e for layer in handle.layers for e in layer.master.layout.entries]
        assert all(e.tensor is not shared for e in entries)
        assert {e.qualname for e in entries} == {"fc.weight", "fc.bias"}
        assert all(layer.shared.weight is shared for layer in model.layers)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 1, 3, 2, 5, 5, 4]])
@pytest.mark.parametrize("step", [1, 2, 4])
@pytest.mark.parametrize("mapped", [False, True], ids=["host", "mapped"])
def test_out_of_order_execution_stays_correct(order, step, mapped, tmp_path, monkeypatch):
    """Host slots, and the mapped disk tier (where a layer not read ahead faults its pages in: a miss too).
    Copies are gated (tests/gates.py): a miss's synchronous load that skips the copy in flight is overwritten."""
    model = _stack()
    x = torch.randn(4, 32)
    model.order = order
    with torch.inference_mode():
        ref = [model(x) for _ in range(3)]
    gates.hold(monkeypatch)
    config = OffloadConfig(prefetch_step=step, **({"source": "disk", "disk_path": str(tmp_path)} if mapped else {}))
    with weightlift.offload(model, device="cpu", config=config) as handle:
        with torch.inference_mode():
            out = [model(x) for _ in range(3)]
        report = handle.report()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert report.prefetch_hits + report.prefetch_misses == 3 * len(order)
    if order == sorted(set(order)):
        assert report.prefetch_misses == 0
    elif mapped or report.slots < report.layers_offloaded:  # a slot per layer: nothing is ever evicted
        assert report.prefetch_misses >= 1


def test_aborted_forward_counts_a_miss_and_stays_correct(monkeypatch):
    model = _stack()
    x = torch.randn(4, 32)
    with torch.inference_mode():
        ref = model(x)

    def boom(module, args):
        raise RuntimeError("boom")

    gates.hold(monkeypatch)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        h = model.layers[3].register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"), torch.inference_mode():
            model(x)
        h.remove()
        with torch.inference_mode():
            out = model(x)
            again = model(x)
        report = handle.report()
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert report.prefetch_misses >= 1


def test_state_dict_returns_true_weights_of_every_layer():
    model = tiny("llama")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)):
        run(model, prompt())
        got = model.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
        # layers 0 and 3 share slot 0 (5 layers, step 2): their views alias, the state dict does not
        layers = model.model.layers
        assert layers[0].mlp.up_proj.weight.data_ptr() == layers[3].mlp.up_proj.weight.data_ptr()
        assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], got["model.layers.3.mlp.up_proj.weight"])


@pytest.mark.parametrize("step", [1, 2])
def test_remove_with_copies_in_flight_gives_the_model_back(monkeypatch, step):
    """Gated copies (tests/gates.py) are still held when `remove()` runs: they land, then every tensor is put
    back from its master; the copy thread is gone and the model computes as before."""
    import threading

    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids)
    snap = snapshot(model)
    held = gates.hold(monkeypatch)
    before = set(threading.enumerate())
    handle = weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=step))
    with torch.inference_mode():
        model(ids)
    assert held.in_flight == step  # the next forward's first copies, started and not waited for
    handle.remove()
    assert held.in_flight == 0
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("weightlift-copy")]
    assert_same(model, snap)
    assert_outputs_equal(run(model, ids), ref)


def test_load_state_dict_while_offloaded_is_refused():
    """Another model's weights, so that a partial write would show."""
    model = tiny("llama")
    snap = snapshot(model)
    other = tiny("llama", seed=1).state_dict()
    assert not torch.equal(other["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)
    with weightlift.offload(model, device="cpu"):
        with pytest.raises(weightlift.OffloadError, match="remove"):
            model.load_state_dict(other)
        assert all(torch.equal(v, snap[k][0][0]) for k, v in model.state_dict().items())
    assert_same(model, snap)


def _align(n: int) -> int:
    return (n + 511) // 512 * 512


def test_pool_bytes_derived_by_hand():
    # tiny llama: hidden 64, 4 heads of 16, 2 kv heads, intermediate 128, float32, 5 layers.
    # One layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128, two norms of 64.
    # Each tensor is its own storage, placed at a 512-byte-aligned offset.
    per_layer = [64 * 64, 32 * 64, 32 * 64, 64 * 64, 128 * 64, 128 * 64, 64 * 128, 64, 64]
    slot = sum(_align(4 * n) for n in per_layer)
    assert slot == 148_480
    weights = 4 * sum(per_layer)
    # step 2 on 5 layers: blocks of 3 and 2 positions -> 3 slots; step 1 -> 1; step 5 (all) -> 5.
    for step, slots in [(1, 1), (2, 3), (3, 5), (4, 5), (5, 5)]:
        model = tiny("llama")
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=step)) as handle:
            report = handle.report()
        assert (report.slots, report.slot_bytes, report.pool_bytes) == (slots, slot, slots * slot)
        assert report.offloaded_bytes == 5 * weights
        assert report.saved_bytes == 5 * weights - slots * slot
        assert report.host_bytes == 0  # CPU target: the original tensors are the master copies
    model = tiny("llama")
    total = sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))  # + rotary inv_freq buffers
    with weightlift.offload(model, device="cpu") as handle:
        report = handle.report()
    assert report.resident_bytes == total - 5 * weights  # embeddings, final norm, lm_head (untied)


def test_integer_and_packed_dtypes_stream_and_match():
    """The seed bug: integer (GPTQ-style packed int32, int8) weights must not crash, and stay exact."""

    class PackedLinear(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            q = torch.randint(-8, 8, (dim, dim), dtype=torch.int8)
            packed = torch.zeros(dim, dim // 8, dtype=torch.int32)
            for k in range(8):
                packed |= ((q[:, k::8].to(torch.int32) + 8) & 0xF) << (4 * k)
            self.register_buffer("qweight", packed)
            self.register_buffer("g_idx", torch.arange(dim, dtype=torch.int32))
            self.scales = nn.Parameter(torch.rand(dim, 1, dtype=torch.float16) / 8, requires_grad=False)
            self.bias8 = nn.Parameter(torch.randint(-3, 3, (dim,), dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            cols = [((self.qweight >> (4 * k)) & 0xF) - 8 for k in range(8)]
            w = torch.stack(cols, dim=-1).reshape(self.qweight.shape[0], -1).to(x.dtype)
            return x @ (w * self.scales.float()).T + self.bias8.float() + self.g_idx.float() * 0

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(PackedLinear(32) for _ in range(5))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(3, 32)
    with torch.inference_mode():
        ref = model(x)
    snap = snapshot(model)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        with torch.inference_mode():
            out = model(x)
        report = handle.report()
    assert torch.equal(out, ref)
    assert_same(model, snap, same_storage=True)
    per_layer = 32 * 4 * 4 + 32 * 4 + 32 * 2 + 32  # qweight int32, g_idx int32, scales fp16, bias int8
    assert report.offloaded_bytes == 5 * per_layer


def test_weights_replaced_after_load_are_taken_as_they_are():
    """Load-time processing that replaces or deletes parameters happens before offload: take them then."""
    model = tiny("llama")
    ids = prompt()
    for layer in model.model.layers:  # e.g. a repacking step: new Parameter objects, other dtype
        w = layer.mlp.down_proj.weight
        layer.mlp.down_proj.weight = nn.Parameter(w.detach().to(torch.bfloat16).float().contiguous())
    del model.model.layers[1].input_layernorm.weight  # a deleted parameter
    model.model.layers[1].input_layernorm.weight = torch.ones(64)  # now a plain attribute tensor
    ref_logits, ref_tokens = run(model, ids)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)):
        logits, tokens = run(model, ids)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)


def test_non_contiguous_and_view_weights_keep_their_layout():
    model = _stack()
    for layer in model.layers:  # a transposed weight and two params viewing one storage
        layer.fc.weight = nn.Parameter(layer.fc.weight.detach().t().contiguous().t())
        both = torch.cat([layer.shared.weight.detach().flatten(), layer.shared.bias.detach()])
        layer.shared.weight = nn.Parameter(both[: 32 * 32].view(32, 32))
        layer.shared.bias = nn.Parameter(both[32 * 32 :])
    x = torch.randn(4, 32)
    with torch.inference_mode():
        ref = model(x)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)):
        fc = model.layers[0].fc.weight
        assert fc.stride() == (1, 32)
        shared = model.layers[0].shared
        assert shared.weight.untyped_storage().data_ptr() == shared.bias.untyped_storage().data_ptr()
        with torch.inference_mode():
            out = model(x)
    assert torch.equal(out, ref)


class RepackOnFirstUse(nn.Module):
    """Like bitsandbytes 4-bit on avx512_bf16 CPUs: the first forward replaces the weight's data."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        self.packed = False

    def forward(self, x):
        if not self.packed:
            self.weight.data = self.weight.data.t().contiguous().t()  # same values, new memory and strides
            self.packed = True
        return x @ self.weight.T


def test_weights_replaced_during_a_forward_are_detected_and_kept(caplog):
    model = _stack()
    for layer in model.layers:
        layer.fc = RepackOnFirstUse(layer.fc)
    reference = _stack()
    for layer in reference.layers:
        layer.fc = RepackOnFirstUse(layer.fc)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        ref = [reference(x) for _ in range(3)]
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        with torch.inference_mode():
            out = [model(x) for _ in range(3)]
        report = handle.report()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert report.replaced == 6
    assert "was replaced during a forward" in caplog.text and "Run one forward before offload()" in caplog.text
    assert "fc.weight" in caplog.text  # the warning names the tensor
    # after remove() the repacked weights stay (the format's state and its data agree)
    assert all(layer.fc.weight.stride() == (1, 32) for layer in model.layers)
    with torch.inference_mode():
        assert torch.equal(model(x), ref[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source", ["host", "disk"])
def test_half_precision_models(tmp_path, dtype, source):
    model = tiny("llama").to(dtype)
    ids = prompt()
    ref = run(model, ids)
    snap = snapshot(model)
    disk = {"source": "disk", "disk_path": str(tmp_path)} if source == "disk" else {}
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2, **disk)) as handle:
        out = run(model, ids)
        report = handle.report()
    assert_outputs_equal(out, ref)
    assert report.offloaded_bytes == sum(2 * p.numel() for p in model.model.layers.parameters())
    # by hand: the tensors of test_pool_bytes_derived_by_hand at 2 bytes each, the norms' 128 bytes padded
    slot = sum(_align(2 * n) for n in [64 * 64, 32 * 64, 32 * 64, 64 * 64, 128 * 64, 128 * 64, 64 * 128, 64, 64])
    slots = 5 if source == "disk" else 3  # with RAM to spare the mapped disk tier keeps every layer mapped
    assert (report.slots, report.slot_bytes, report.pool_bytes) == (slots, slot, slots * slot)
    assert_same(model, snap)


def test_offload_and_remove_inside_inference_mode():
    model = tiny("llama")
    ids = prompt()
    snap = snapshot(model)
    expected = run(model, ids)
    with torch.inference_mode():
        handle = weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2))
    got = run(model, ids)
    with torch.inference_mode():
        handle.remove()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert_same(model, snap)
    assert not any(p.is_inference() for p in model.parameters())


def test_indices_past_the_stack_are_refused_and_the_model_is_untouched():
    model = tiny("llama")
    snap, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(weightlift.OffloadError, match=r"`indices`=\(2, 5\) names position 5, but `model.layers` has 5"):
        weightlift.offload(model, device="cpu", config=OffloadConfig(indices=(2, 5)))
    assert_same(model, snap, same_storage=True)
    assert hook_counts(model) == hooks


def test_explicit_indices_offload_exactly_those_layers():
    model = tiny("llama")
    ids = prompt()
    expected = run(model, ids)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(indices=(0, 3), prefetch_step=2)) as handle:
        got = run(model, ids)
        assert [layer.index for layer in handle.layers] == [0, 3]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_attribute_tensors_outside_offloaded_layers_are_left_where_they_are():
    """Tensors in plain attributes (an HQQ-style ``meta`` dict, a bitsandbytes-style ``state`` object) stream
    with an offloaded layer; in a resident layer or outside the stack they stay the same tensor, in place."""
    from types import SimpleNamespace

    model = tiny("llama")
    holders = {"model.norm": model.model.norm, "lm_head": model.lm_head}
    holders |= {f"model.layers.{i}.mlp.up_proj": layer.mlp.up_proj for i, layer in enumerate(model.model.layers)}
    for m in holders.values():
        m.meta = {"scale": torch.randn(8)}
        m.state = SimpleNamespace(absmax=torch.randn(4, 4))
    live = {name: (m.meta["scale"], m.state.absmax) for name, m in holders.items()}
    before = {name: [(t.data_ptr(), t.clone()) for t in ts] for name, ts in live.items()}
    ids = prompt()
    ref = run(model, ids)
    config = OffloadConfig(group_size=2, num_in_group=1, prefetch_step=1)  # one layer of each two offloaded
    with weightlift.offload(model, device="cpu", config=config) as handle:
        out = run(model, ids)
        offloaded = {layer.name + ".mlp.up_proj" for layer in handle.layers}
        during = {name: [t.data_ptr() for t in ts] for name, ts in live.items()}
        streamed = {name for name, m in holders.items() if m.meta["scale"] is not live[name][0]
                    or m.meta["scale"].data_ptr() != before[name][0][0]}  # fmt: skip
    assert_outputs_equal(out, ref)
    assert len(offloaded) == 2 and offloaded < holders.keys()
    assert streamed == offloaded  # the offloaded layers' attributes point into their slots now
    for name, ts in live.items():
        if name in offloaded:
            continue
        assert holders[name].meta["scale"] is ts[0] and holders[name].state.absmax is ts[1], name
        assert during[name] == [p for p, _ in before[name]], name
    for name, m in holders.items():  # every attribute back, bitwise, after remove()
        assert torch.equal(m.meta["scale"], before[name][0][1]) and torch.equal(m.state.absmax, before[name][1][1])


class TwoStacks(nn.Module):
    """Two ModuleLists of `Block`s; ``b[1].fc.weight`` is the very Parameter ``a[1].fc.weight``."""

    def __init__(self, n: int = 3, dim: int = 32) -> None:
        super().__init__()
        self.a = nn.ModuleList(Block(dim) for _ in range(n))
        self.b = nn.ModuleList(Block(dim) for _ in range(n))
        self.b[1].fc.weight = self.a[1].fc.weight

    def forward(self, x):
        for layer in (*self.a, *self.b):
            x = layer(x)
        return x


@pytest.mark.parametrize("indices", [None, (1,), (4,), (1, 2, 3)], ids=["all", "a-side", "b-side", "a-side+others"])
def test_a_weight_tied_across_two_stacks_stays_one_resident_tensor(indices, monkeypatch):
    """Positions 1 (``a.1``) and 4 (``b.1``) share ``fc.weight``: whether both, one or neither is offloaded,
    it is one tensor, never streamed (a slot would be overwritten under the other layer), and outputs match."""
    torch.manual_seed(0)
    model = TwoStacks().eval()
    tied = model.a[1].fc.weight
    x = torch.randn(4, 32)
    with torch.inference_mode():
        ref = model(x)
    snap, where = snapshot(model), tied.data_ptr()
    gates.hold(monkeypatch)
    config = OffloadConfig(layers=("a", "b"), indices=indices, prefetch_step=1)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        with torch.inference_mode():
            out = [model(x) for _ in range(3)]
        assert all(e.tensor is not tied for layer in handle.layers for e in layer.master.layout.entries)
        assert model.b[1].fc.weight is tied and tied.data_ptr() == where  # in place, not in any slot
        assert len(handle.layers) == (6 if indices is None else len(indices))
    assert all(torch.equal(o, ref) for o in out)
    assert model.b[1].fc.weight is model.a[1].fc.weight
    assert_same(model, snap, same_storage=True)


class ViewBlock(nn.Module):
    """``w2`` is ``w1`` seen as a flat vector and ``head`` a slice of its first rows: three Parameters over one
    storage, plus a bias that is a slice of a second storage also holding ``scale``."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.w2 = nn.Parameter(self.w1.detach().view(-1))
        self.head = nn.Parameter(self.w1.detach()[4:8])
        both = torch.randn(2 * dim)
        self.bias = nn.Parameter(both[:dim])
        self.scale = nn.Parameter(both[dim:])

    def forward(self, x):
        y = x @ self.w1.T + self.bias + self.w2[: x.shape[-1]] * self.scale
        return torch.tanh(y) + (x @ self.head.T).sum(-1, keepdim=True)


def _views(layer: ViewBlock) -> tuple:
    """How the five Parameters lie: which storage (numbered in order of appearance), offset, shape, strides."""
    params = (layer.w1, layer.w2, layer.head, layer.bias, layer.scale)
    storages = list(dict.fromkeys(p.untyped_storage().data_ptr() for p in params))
    return tuple((storages.index(p.untyped_storage().data_ptr()), p.storage_offset(), p.shape, p.stride())
                 for p in params)  # fmt: skip


@pytest.mark.parametrize("source", ["host", "disk-read", "disk-mapped"])
def test_parameters_that_are_views_of_one_another_stay_views(source, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(*[ViewBlock() for _ in range(4)]).eval()
    x = torch.randn(3, 32)
    with torch.inference_mode():
        ref = model(x)
    before = [_views(layer) for layer in model]
    assert [v[0] for v in before[0]] == [0, 0, 0, 1, 1]  # two storages, views within each
    snap = snapshot(model)
    gates.hold(monkeypatch)
    disk = {} if source == "host" else {"source": "disk", "disk_path": str(tmp_path), "mmap": source == "disk-mapped"}
    with weightlift.offload(model, device="cpu", config=OffloadConfig(layers="", prefetch_step=1, **disk)):
        with torch.inference_mode():
            out = [model(x) for _ in range(3)]
        during = model[1]
        assert during.w2.untyped_storage().data_ptr() == during.w1.untyped_storage().data_ptr()
    assert all(torch.equal(o, ref) for o in out)
    assert [_views(layer) for layer in model] == before  # still views of one another, as they were
    assert_same(model, snap)
    with torch.no_grad():
        model[0].w1[0, 0] = 7.0  # one storage: a write through one view shows in the others
    assert model[0].w2[0] == 7.0


class DictBlock(Block):
    """Returns a dict of tensors (a ``ModelOutput``-like layer)."""

    def forward(self, x):
        return {"hidden": super().forward(x), "aux": self.fc.bias.sum()}


class DictStack(nn.Module):
    def __init__(self, n: int = 5, dim: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DictBlock(dim) for _ in range(n))

    def forward(self, x):
        aux = 0
        for layer in self.layers:
            out = layer(x)
            x, aux = out["hidden"], aux + out["aux"]
        return x, aux


def test_a_layer_returning_a_dict_streams_and_matches(monkeypatch):
    torch.manual_seed(0)
    model = DictStack().eval()
    x = torch.randn(4, 32)
    with torch.inference_mode():
        ref = model(x)
    gates.hold(monkeypatch)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        with torch.inference_mode():
            out = [model(x) for _ in range(3)]
        assert handle.report().prefetch_misses == 0
    assert all(torch.equal(o[0], ref[0]) and torch.equal(o[1], ref[1]) for o in out)


class ExtraBlock(Block):
    """Adds its buffer ``extra`` when it has one."""

    def forward(self, x):
        y = super().forward(x)
        return y + self.extra if hasattr(self, "extra") else y


def test_a_buffer_registered_after_offload_is_used_and_left_by_remove(monkeypatch):
    """A new buffer on an offloaded layer is the user's: resident, read by the forward, in the state dict,
    and still there (the same tensor, its bytes) after remove(), which gives back everything else."""
    torch.manual_seed(0)
    model, reference = Stack(), Stack()
    for m in (model, reference):
        m.layers = nn.ModuleList(ExtraBlock(32) for _ in range(6))
        m.eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 32)
    snap = snapshot(model)
    gates.hold(monkeypatch)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        for m in (model, reference):
            for layer in m.layers:
                layer.register_buffer("extra", torch.full((32,), 0.5))
        extra = model.layers[2].extra
        with torch.inference_mode():
            out, ref = model(x), reference(x)
        assert handle.report().layers_offloaded == 6
        assert torch.equal(model.state_dict()["layers.2.extra"], extra)
    assert torch.equal(out, ref)
    assert model.layers[2].extra is extra and torch.equal(extra, torch.full((32,), 0.5))
    for layer in model.layers:
        del layer.extra
    assert_same(model, snap, same_storage=True)  # the rest as it was


@pytest.mark.parametrize("convert", ["to-cpu", "cpu", "float", "to-float32", "type-float32"])
def test_conversions_that_change_nothing_are_handled(convert, monkeypatch):
    """``model.to("cpu")``, ``.cpu()``, ``.float()`` on a float32 model offloaded to the CPU leave every tensor
    where it is: the forward is exact and remove() gives the same storages back."""
    model = _stack()
    x = torch.randn(4, 32)
    with torch.inference_mode():
        ref = model(x)
    snap = snapshot(model)
    gates.hold(monkeypatch)
    calls = {"to-cpu": lambda m: m.to("cpu"), "cpu": lambda m: m.cpu(), "float": lambda m: m.float(),
             "to-float32": lambda m: m.to(torch.float32), "type-float32": lambda m: m.type(torch.float32)}  # fmt: skip
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)):
        with torch.inference_mode():
            model(x)
        calls[convert](model)
        with torch.inference_mode():
            out = model(x)
    assert torch.equal(out, ref)
    assert_same(model, snap, same_storage=True)
