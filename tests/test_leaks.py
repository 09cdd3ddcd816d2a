"""Offloading drops every reference to the original weights it does not serve from: their storage is freed.

Garbage collection is off in these tests, so a reference cycle cannot free (and so hide) a leak: what
must go, goes by reference counting alone. A tensor's storage is watched with a storage weakref, not
only a weakref to the tensor object: weightlift's leaves are ``detach()``-ed views of the original inner
tensors (new tensor objects over the same storage), so the original objects can die while the bytes
are still held.
"""

from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import weightlift
from conftest import assert_outputs_equal, assert_same, prompt, run, snapshot, tiny
from weightlift import OffloadConfig


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside ``t``, recursively through ``__tensor_flatten__`` (independent of weightlift)."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        return [leaf for a in attrs for leaf in _inner(getattr(t, a))]
    return [t]


def _watch(layers: nn.Module) -> tuple[list[weakref.ref], list[StorageWeakRef]]:
    """Weakrefs to the original inner tensors of the layers' parameters (a plain parameter is the object its
    module keeps holding, so only its storage is watched) and to every one's storage; no strong reference
    is left behind."""
    originals = [(p, leaf) for p in layers.parameters() for leaf in _inner(p)]
    inner = [weakref.ref(leaf) for p, leaf in originals if leaf is not p]
    return inner, [StorageWeakRef(leaf.untyped_storage()) for _, leaf in originals]


def _bitwise(model: nn.Module) -> dict:
    """Every parameter and buffer: its type, dtype, device and a copy of each inner tensor (conftest's
    `snapshot` compares whole tensors, which quantized subclasses do not all support)."""
    return {
        name: (type(t), t.dtype, t.device, [leaf.detach().clone() for leaf in _inner(t)])
        for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    }


def _assert_bitwise(model: nn.Module, before: dict) -> None:
    now = _bitwise(model)
    assert now.keys() == before.keys()
    for name, (kind, dtype, device, leaves) in before.items():
        assert now[name][:3] == (kind, dtype, device), name
        assert len(now[name][3]) == len(leaves) and all(map(torch.equal, now[name][3], leaves)), name


@contextmanager
def _no_gc():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _scaled(model: nn.Module) -> None:
    from test_quantized import Scaled

    for layer in model.model.layers:
        for lin in (layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.q_proj):
            w = lin.weight.detach()
            scale = w.abs().amax(dim=1, keepdim=True) / 127
            lin.weight = nn.Parameter(Scaled(torch.round(w / scale).to(torch.int8), scale), requires_grad=False)


def _torchao_int8(model: nn.Module) -> None:
    pytest.importorskip("torchao")
    from test_quantized import _torchao

    _torchao("int8")(model)


def _quanto_qint8(model: nn.Module) -> None:
    pytest.importorskip("optimum.quanto")
    from test_quantized import _quanto

    _quanto("qint8")(model)


FORMATS = {"plain": None, "subclass-defined-here": _scaled, "torchao-int8": _torchao_int8,
           "quanto-qint8": _quanto_qint8}  # fmt: skip


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_disk_tier_frees_the_original_weights_while_the_handle_lives(tmp_path, fmt):
    model = tiny("llama", layers=3)
    if FORMATS[fmt] is not None:
        FORMATS[fmt](model)
        assert is_traceable_wrapper_subclass(model.model.layers[0].mlp.up_proj.weight)
    ids = prompt()
    ref = run(model, ids, new_tokens=4)
    snap = _bitwise(model)
    whole = snapshot(model) if fmt == "plain" else None
    tensors, storages = _watch(model.model.layers)
    assert len(storages) >= 3 * 9 and (fmt == "plain") == (not tensors)
    config = OffloadConfig(source="disk", disk_path=str(tmp_path), prefetch_step=2)
    with _no_gc():
        with weightlift.offload(model, device="cpu", config=config) as handle:
            assert handle.report().layers_offloaded == 3
            alive = [i for i, r in enumerate(storages) if not r.expired()]
            assert alive == [], f"{len(alive)} of {len(storages)} original storages still held"
            # nor the tensor objects: a subclass's inner tensors are its leaves, not entries of their own
            qualnames = [e.qualname for layer in handle.layers for e in layer.master.layout.entries]
            inner = [q for q in qualnames if q.rpartition(".")[0] in qualnames]
            assert inner == [], f"inner tensors offloaded beside their subclass: {inner[:4]}"
            assert sum(r() is not None for r in tensors) == 0
            out = run(model, ids, new_tokens=4)
        assert_outputs_equal(out, ref)
        _assert_bitwise(model, snap)  # restored from the cache, bitwise
        if whole is not None:
            assert_same(model, whole)
        assert torch.equal(run(model, ids, new_tokens=4)[1], ref[1])


@pytest.mark.parametrize("source", ["host", "disk"])
def test_remove_lets_the_pool_and_copy_jobs_go_without_a_collection(tmp_path, source):
    """The prefetcher, its transfers (slot views) and the copy thread must not outlive `remove()` through a
    reference cycle with the handle: the pool's memory is free once the caller drops the handle."""
    model = tiny("llama")
    snap = snapshot(model)
    config = OffloadConfig(prefetch_step=2, **({"source": "disk", "disk_path": str(tmp_path), "mmap": False}
                                               if source == "disk" else {}))  # fmt: skip
    with _no_gc():
        handle = weightlift.offload(model, device="cpu", config=config)
        run(model, prompt(), new_tokens=2)
        pool = [StorageWeakRef(s.untyped_storage()) for s in handle.pool.slots]
        handle.remove()
        del handle
        assert all(r.expired() for r in pool)
    assert_same(model, snap)
