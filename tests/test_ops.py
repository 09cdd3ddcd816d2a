"""`torch.compile` of offloaded models: the wait/prefetch custom ops keep the graph whole and ordered.

Compiling is slow on small CPUs, so the compiled models are tiny and there are few of them. Compiled
offloaded output is compared bit for bit with the same model compiled resident (inductor's kernels are
deterministic on the CPU); compiled against eager differs by inductor's own numerics (fused reductions
in another order), so that comparison has a tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import weightlift
from conftest import prompt, tiny
from weightlift import OffloadConfig, OffloadError, ops


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _breaks(model: nn.Module, *args) -> tuple[int, list[str]]:
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(*args)
    torch._dynamo.reset()
    return explained.graph_break_count, [r.reason for r in explained.break_reasons]


class _Noop:
    def wait(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


def test_ops_declare_what_they_mutate_and_pass_opcheck():
    for op in (torch.ops.weightlift.wait.default, torch.ops.weightlift.prefetch.default):
        x = op._schema.arguments[0]
        assert x.name == "x" and x.alias_info is not None and x.alias_info.is_write
        assert not op._schema.returns  # nothing returned: no output can alias the input
    hook = _Noop()
    key = ops.register(hook)
    for op in (torch.ops.weightlift.wait.default, torch.ops.weightlift.prefetch.default):
        torch.library.opcheck(op, (torch.randn(3, 4), key))
    del hook
    with pytest.raises(OffloadError, match="torch._dynamo.reset"):
        torch.ops.weightlift.wait(torch.zeros(1), key)  # its hook is gone: refused, never another model's


class Block(nn.Module):
    """A layer with a weight-only computation (``fc.weight * (1 + scale)``, like Gemma's norm): nothing but
    program order keeps it after the layer's wait, so a compiler that hoisted it would read another layer's
    bytes from the shared slot."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.randn(dim, 1) * 0.1)

    def forward(self, x):
        return x + torch.tanh(nn.functional.linear(x, self.fc.weight * (1 + self.scale), self.fc.bias))


class Stack(nn.Module):
    def __init__(self, n: int = 6, dim: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(dim) for _ in range(n))
        self.head = nn.Linear(dim, 8)
        self.order = [0, 1, 1, 3, 2, 5, 4]  # out of order and twice: misses, synchronous loads

    def forward(self, x):
        for i in self.order:
            x = self.layers[i](x)
        return self.head(x)


def test_compiled_stack_with_one_shared_slot_and_misses_matches_compiled_resident():
    """prefetch_step=1: every layer lives in the same slot, so the copy after layer k overwrites the
    weights layer k reads; out-of-order runs make the ops load synchronously. The model's input goes
    straight into the first layer, so ``wait`` is declared to mutate a graph input: it must stay as it was."""
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(4, 32)
    x_before = x.clone()
    with torch.inference_mode():
        eager_ref = model(x)
        compiled_ref = torch.compile(model, fullgraph=True)(x)
    torch._dynamo.reset()
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        assert handle.report().slots == 1
        assert _breaks(model, x) == (0, [])
        compiled = torch.compile(model, fullgraph=True)
        with torch.inference_mode():
            eager = model(x)
            out = [compiled(x) for _ in range(3)]
        report = handle.report()
        # grad mode on: refused under compile too (dynamo traces the check; with fullgraph=True it reports the
        # OffloadError inside its own Unsupported error, since the raise cannot be part of a graph; without
        # fullgraph the frame falls back to eager and the OffloadError itself is raised)
        with pytest.raises(torch._dynamo.exc.Unsupported, match="inference-only") as info:
            compiled(x)
        assert not isinstance(info.value, OffloadError)
        with pytest.raises(OffloadError, match="inference-only"):
            torch.compile(model)(x)
    assert torch.equal(eager, eager_ref)
    assert all(torch.equal(o, compiled_ref) for o in out)
    torch.testing.assert_close(out[0], eager_ref, rtol=0, atol=1e-5)
    assert report.prefetch_misses >= 3 and report.prefetch_hits >= 3  # the ops ran in the compiled code
    assert torch.equal(x, x_before)
    torch._dynamo.reset()  # dynamo does not guard on module hooks: recompile after offload() or remove()
    with torch.inference_mode():
        assert torch.equal(compiled(x), compiled_ref)


def test_compiled_tiny_llama_adds_no_graph_break_and_matches_compiled_resident():
    """fullgraph=True compiles the offloaded Llama in one graph; slots are reused (5 layers, step 2: 3 slots),
    and a state_dict() between runs evicts a prefetched layer, so the next run's wait loads it."""
    model = tiny("llama")
    ids = prompt()
    resident_breaks = _breaks(model, ids)
    with torch.inference_mode():
        eager_ref = model(ids).logits
        compiled_ref = torch.compile(model, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        offloaded_breaks = _breaks(model, ids)
        compiled = torch.compile(model, fullgraph=True)
        with torch.inference_mode():
            eager = model(ids).logits
            first = compiled(ids).logits
            misses = handle.report().prefetch_misses
            model.model.layers[3].state_dict()  # loads layer 3 over a prefetched layer 0
            second = compiled(ids).logits
        report = handle.report()
    assert resident_breaks == (0, [])
    assert offloaded_breaks == resident_breaks  # offloading adds no graph break
    assert torch.equal(eager, eager_ref)
    assert torch.equal(first, compiled_ref) and torch.equal(second, compiled_ref)
    assert misses == 0 and report.prefetch_misses == 1
    # inductor fuses reductions differently from eager kernels: measured max |diff| 1.8e-7 on logits ~1e-1
    torch.testing.assert_close(first, eager_ref, rtol=0, atol=1e-5)


def test_cuda_graph_capture_is_refused_where_it_cannot_work(tmp_path):
    """`cuda_graph` needs a CUDA target and a capturable tier; the GPU side is in test_gpu.py."""
    model = tiny("llama", layers=2)
    handle = weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1))
    with handle, pytest.raises(OffloadError, match="needs a CUDA target"), handle.cuda_graph(None):
        pass
    with pytest.raises(OffloadError, match="removed handle"), handle.cuda_graph(None):
        pass


def test_a_removed_handles_keys_are_refused_and_never_given_again():
    """The ops find a layer's hook by key: after `remove()` its keys name nothing, and the next handle's
    layers get new ones, so a graph compiled for the first handle can never drive the second's slots."""
    import gc

    model = tiny("llama", layers=3)
    x = torch.zeros(1)
    seen = []
    for _ in range(2):
        handle = weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1))
        keys = [hook.__self__.key for layer in handle.layers for hook in layer.module._forward_pre_hooks.values()
                if isinstance(getattr(getattr(hook, "__self__", None), "key", None), int)]  # fmt: skip
        assert len(keys) == 3
        torch.ops.weightlift.wait(x, keys[0])  # a live key runs its layer's wait
        handle.remove()
        del handle
        gc.collect()
        for key in keys:
            with pytest.raises(OffloadError, match=f"hook `{key}`, whose offloading was removed"):
                torch.ops.weightlift.wait(x, key)
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])


class State:
    """What a layer without a tensor argument passes around: its activation on an attribute."""

    x: torch.Tensor


class StateBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, state: State) -> None:  # no tensor among its arguments, none in its output
        state.x = torch.tanh(self.fc(state.x))


class StateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(StateBlock() for _ in range(4))

    def forward(self, x):
        state = State()
        state.x = x
        for layer in self.layers:
            layer(state)
        return state.x


def test_a_layer_without_tensor_arguments_falls_back_to_the_eager_hook():
    """With no activation to order the ops on, the hooks run eagerly: a graph break, and the same bits."""
    torch.manual_seed(0)
    model, x = StateNet().eval(), torch.randn(2, 16)
    with torch.inference_mode():
        compiled_ref = torch.compile(model)(x)
        resident_breaks = torch._dynamo.explain(model)(x).graph_break_count
    torch._dynamo.reset()
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("error")  # a deliberate break: dynamo does not trace into the bookkeeping
            offloaded_breaks = torch._dynamo.explain(model)(x).graph_break_count
            torch._dynamo.reset()
            out = [torch.compile(model)(x) for _ in range(2)]
        report = handle.report()
    torch._dynamo.reset()
    assert resident_breaks == 0 and offloaded_breaks >= 1
    assert all(torch.equal(o, compiled_ref) for o in out)
    assert report.prefetch_hits + report.prefetch_misses >= 2 * 4  # the eager hooks ran for every layer
